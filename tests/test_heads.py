"""Heads as estimators: the scikit-learn contract, the torch linear head, spatial pooling, and head artifacts."""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import skops.io
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.artifacts import TRUSTED_TYPES, HeadArtifact, TamperedArtifactError, UntrustedArtifactError, load_head, save_head
from pipeline.heads import HEADS, PREPROCESSING, SpatialPool, TorchLinearHead, build_head

from .helpers import small_value

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, k: int = 4, d: int = 16, sep: float = 4.0, seed: int = 0, centre_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points per class around ``k`` Gaussian centres (fixed by ``centre_seed``), unit noise."""
    centres = np.random.default_rng(centre_seed).normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), n)
    X = centres[y] + np.random.default_rng(1000 + seed).normal(size=(len(y), d))
    return X.astype(np.float32), y


# ---------------------------------------------------------------- the scikit-learn contract

def _expected_failed_checks(estimator: object) -> dict[str, str]:
    if isinstance(estimator, SpatialPool):
        # SpatialPool is a reshaping step that only ever sees arrays read from a feature cache, which
        # load_split_features has already checked (empty split, NaN/inf, with the file named); HDF5 features are
        # dense real arrays. Re-validating dtype and finiteness here would copy the largest array in the pipeline
        # (N x C x H x W) for nothing, and the estimators after it validate their own input.
        not_applicable = "SpatialPool reshapes cache arrays that load_split_features has already validated"
        return {
            "check_complex_data": not_applicable,
            "check_dtype_object": not_applicable,
            "check_estimators_empty_data_messages": not_applicable,
            "check_estimators_nan_inf": not_applicable,
            "check_estimator_sparse_tag": "cache features are dense HDF5 arrays; sparse input never reaches the pool",
            "check_estimator_sparse_array": "cache features are dense HDF5 arrays; sparse input never reaches the pool",
            "check_estimator_sparse_matrix": "cache features are dense HDF5 arrays; sparse input never reaches the pool",
            # The pool checks the whole per-sample shape (C x H x W matters, not just the count), and its message
            # names both shapes; see test_spatial_pool_refuses_other_shapes.
            "check_n_features_in_after_fitting": "the pool compares per-sample shapes, with its own message",
            "check_fit2d_predict1d": "BUG (message): a 1-D array given to transform is reported as 'features of shape ()' "
                                     "instead of asking to reshape it to N x D",
        }
    return {}


@parametrize_with_checks([TorchLinearHead(), SpatialPool()], expected_failed_checks=_expected_failed_checks, xfail_strict=True)
def test_sklearn_check_estimator(estimator: object, check: object) -> None:
    check(estimator)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_is_a_clonable_estimator_with_its_swept_parameter(name: str) -> None:
    spec = HEADS[name]
    value = spec.grid[0]
    pipe = build_head(name, value, seed=3)
    assert isinstance(pipe, Pipeline) and pipe.steps[0][0] == "pool" and pipe.steps[-1][0] == "clf"
    clf = pipe.named_steps["clf"]
    # The swept value lands on the estimator parameter the head reports.
    assert clf.get_params()[spec.param] == value
    # get_params / set_params / clone round trip, on the estimator and on the whole pipeline.
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params()
    other = type(value)(value * 2)
    assert twin.set_params(**{spec.param: other}) is twin and twin.get_params()[spec.param] == other
    assert clf.get_params()[spec.param] == value
    assert clone(pipe).get_params(deep=False).keys() == pipe.get_params(deep=False).keys()
    assert clone(pipe).named_steps["clf"].get_params() == clf.get_params()
    # The family's default preprocessing becomes pipeline steps, in order.
    expected = [s for s in spec.preprocessing.split("+") if s != "none"]
    assert [n for n, _ in pipe.steps[1:-1]] == expected


@pytest.mark.parametrize("estimator", [TorchLinearHead(weight_decay=0.5, lr=0.2, epochs=3, batch_size=7, random_state=9), SpatialPool("max")])
def test_init_only_stores_parameters(estimator: object) -> None:
    assert vars(estimator) == estimator.get_params()
    assert not [k for k in vars(estimator) if k.endswith("_")]
    assert clone(estimator).get_params() == estimator.get_params()


@pytest.mark.parametrize(
    "name",
    [
        n for n in HEADS
    ],
)
def test_predict_before_fit_raises_not_fitted(name: str) -> None:
    X, _ = blobs(3)
    pipe = build_head(name, small_value(name))
    with pytest.raises(NotFittedError):
        pipe.predict(X)
    with pytest.raises(NotFittedError):
        pipe.named_steps["clf"].predict(X)


def test_build_head_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'nope'; expected one of linear, logreg"):
        build_head("nope", 1.0)
    with pytest.raises(ValueError, match=r"unknown preprocessing 'zca'; expected one of none, standardize"):
        build_head("logreg", 1.0, preprocessing="zca")


@pytest.mark.parametrize("preprocessing", PREPROCESSING)
def test_preprocessing_steps(preprocessing: str) -> None:
    X, y = blobs(10, d=12)
    pipe = build_head("logreg", 1.0, preprocessing=preprocessing, pca=5).fit(X, y)
    names = [n for n, _ in pipe.steps[1:-1]]
    assert names == [s for s in preprocessing.split("+") if s != "none"]
    Z = Pipeline(pipe.steps[:-1]).transform(X)
    assert Z.shape == (len(X), 5 if "pca" in preprocessing else 12)
    if preprocessing == "l2":
        np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)
    if preprocessing == "standardize":
        np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-5)


def test_pca_is_capped_by_the_data() -> None:
    X, y = blobs(3, k=2, d=40)  # 6 rows: at most 6 components
    pipe = build_head("logreg", 1.0, preprocessing="pca", pca=256).fit(X, y)
    assert Pipeline(pipe.steps[:-1]).transform(X).shape == (6, 6)


# ---------------------------------------------------------------- the torch linear head


def _noisy() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping classes, so val accuracy moves from epoch to epoch."""
    Xt, yt = blobs(30, sep=0.5, seed=0)
    Xv, yv = blobs(15, sep=0.5, seed=1)
    return Xt, yt, Xv, yv


def test_torch_head_history_and_best_epoch() -> None:
    Xt, yt, Xv, yv = _noisy()
    head = TorchLinearHead(epochs=15, lr=0.01, batch_size=16, random_state=0).fit(Xt, yt, eval_set=(Xv, yv))
    h = head.history_
    assert [r["epoch"] for r in h] == list(range(1, 16))
    for r in h:
        assert set(r) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        assert np.isfinite(r["train_loss"]) and r["train_loss"] > 0 and np.isfinite(r["val_loss"]) and r["val_loss"] > 0
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    val_acc = [r["val_acc"] for r in h]
    assert head.best_epoch_ == 1 + int(np.argmax(val_acc))
    assert head.best_epoch_ < 15, "the data should make a later epoch worse, or this test shows nothing"
    # The weights kept are those of the best epoch: a run that stops there ends with the very same weights.
    short = TorchLinearHead(epochs=head.best_epoch_, lr=0.01, batch_size=16, random_state=0).fit(Xt, yt, eval_set=(Xv, yv))
    np.testing.assert_array_equal(short.coef_, head.coef_)
    np.testing.assert_array_equal(short.intercept_, head.intercept_)
    assert (head.predict(Xv) == yv).mean() == pytest.approx(max(val_acc), abs=1e-6)
    assert head.coef_.shape == (4, 16) and head.intercept_.shape == (4,)
    assert head.n_features_in_ == 16 and head.classes_.tolist() == [0, 1, 2, 3]


def test_torch_head_without_eval_set_keeps_the_best_train_epoch() -> None:
    Xt, yt, _, _ = _noisy()
    head = TorchLinearHead(epochs=6, lr=0.05, batch_size=16).fit(Xt, yt)
    assert all(set(r) == {"epoch", "train_loss", "train_acc"} for r in head.history_)
    assert head.best_epoch_ == 1 + int(np.argmax([r["train_acc"] for r in head.history_]))


def test_torch_head_is_deterministic_for_a_fixed_seed() -> None:
    Xt, yt, Xv, yv = _noisy()
    make = lambda seed: TorchLinearHead(epochs=5, lr=0.01, batch_size=16, random_state=seed).fit(Xt, yt, eval_set=(Xv, yv))  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)
    assert a.history_ == b.history_
    assert not np.array_equal(a.coef_, c.coef_)


def test_torch_head_labels_probabilities_and_string_classes() -> None:
    X, y = blobs(20, k=3)
    names = np.array(["ant", "bee", "cat"])[y]
    head = TorchLinearHead(epochs=20, lr=0.05).fit(X, names)
    assert head.classes_.tolist() == ["ant", "bee", "cat"]
    assert (head.predict(X) == names).mean() > 0.95
    p = head.predict_proba(X)
    assert p.shape == (60, 3) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(head.classes_[p.argmax(axis=1)], head.predict(X))
    with pytest.raises(ValueError, match="a classifier needs at least 2 classes"):
        TorchLinearHead().fit(X, np.zeros(len(X)))


def test_fit_stream_equals_fit_on_the_same_batches() -> None:
    X, y = blobs(10)
    whole = TorchLinearHead(epochs=4, lr=0.05, batch_size=len(X)).fit(X, y, eval_set=(X, y))
    seen = []

    def batches(rng: np.random.Generator):
        seen.append(rng)
        yield X, y  # one batch per epoch, in order: what fit does when batch_size covers the data

    streamed = TorchLinearHead(epochs=4, lr=0.05).fit_stream(batches, X.shape[1], np.unique(y), eval_set=(X, y))
    assert len(seen) == 4
    np.testing.assert_array_equal(streamed.coef_, whole.coef_)
    assert streamed.history_ == whole.history_
    assert streamed.n_features_in_ == 16 and streamed.classes_.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- spatial pooling


def test_spatial_pool_avg_max_flatten() -> None:
    X = np.random.default_rng(0).normal(size=(5, 3, 2, 4)).astype(np.float32)
    avg = SpatialPool("avg").fit(X)
    assert avg.n_features_in_ == 24 and avg.input_shape_ == (3, 2, 4)
    out = avg.transform(X)
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out[2, 1], X[2, 1].mean(), rtol=1e-6)
    out = SpatialPool("max").fit_transform(X)
    assert out.shape == (5, 3) and out[4, 2] == X[4, 2].max()
    out = SpatialPool("flatten").fit_transform(X)
    assert out.shape == (5, 24)
    assert out[1, 8 + 1 * 4 + 3] == X[1, 1, 1, 3]  # channel-major, then row, then column
    flat = np.arange(35.0).reshape(5, 7)
    np.testing.assert_array_equal(SpatialPool("max").fit_transform(flat), flat)  # N x D passes through


def test_spatial_pool_refuses_other_shapes() -> None:
    pool = SpatialPool("avg").fit(np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"features of shape \(4, 2, 2\) given to a head fitted on \(4, 3, 3\)"):
        pool.transform(np.zeros((2, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"features must be N x D or N x C x H x W, got shape \(2, 3, 4\)"):
        SpatialPool().fit(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"pool must be one of avg, max, flatten, got 'sum'"):
        SpatialPool("sum").fit(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        SpatialPool().transform(np.zeros((2, 3)))


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
def test_heads_learn_on_spatial_features(pool: str) -> None:
    X, y = blobs(15, k=3, d=8 * 2 * 2)
    X = X.reshape(-1, 8, 2, 2)
    pipe = build_head("logreg", 1.0, pool=pool).fit(X, y)
    assert (pipe.predict(X) == y).mean() > 0.9
    assert pipe.named_steps["pool"].input_shape_ == (8, 2, 2)


# ---------------------------------------------------------------- artifacts


def _fit_and_save(name: str, path: Path, preprocessing: str | None = None, X: np.ndarray | None = None,
                  y: np.ndarray | None = None, **kw: object) -> tuple[Pipeline, Path]:
    """Fit a head on small blobs (or X, y) and save it at ``path``; returns the pipeline and its metadata path."""
    if X is None:
        X, y = blobs(12, k=3)
    pipe = build_head(name, small_value(name), preprocessing=preprocessing, pca=8, **kw).fit(X, y)
    return pipe, save_head(pipe, {"clf": name, "classes": ["ant", "bee", "cat"]}, path)


def _same_outputs(a: Pipeline, b: Pipeline, X: np.ndarray) -> None:
    """Same labels; same scores up to float32 rounding (BLAS may take another path on reloaded arrays)."""
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    for method in ("predict_proba", "decision_function"):
        if hasattr(a, method):
            assert hasattr(b, method)
            np.testing.assert_allclose(getattr(a, method)(X), getattr(b, method)(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(HEADS))
def test_saved_head_reloads_and_predicts_identically(name: str, tmp_path: Path) -> None:
    pipe, meta_path = _fit_and_save(name, tmp_path / "heads" / name)
    assert meta_path == tmp_path / "heads" / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    suffix = ".pt" if name == "linear" else ".skops"
    # Named by its content: the first 16 hex digits of the sha256 the metadata records.
    assert meta["artifact"] == f"{name}.{meta['artifact_sha256'][:16]}{suffix}"
    assert meta["format"] == "pipeline-head" and meta["classes"] == ["ant", "bee", "cat"]
    assert not list(meta_path.parent.glob(".*.tmp"))
    art = load_head(meta_path)
    assert isinstance(art, HeadArtifact) and art.classes == ["ant", "bee", "cat"] and art.path == meta_path
    X, _ = blobs(7, k=3, seed=5)
    _same_outputs(pipe, art.pipeline, X)
    # The artifact path itself is accepted too.
    _same_outputs(pipe, load_head(_artifact(meta_path)).pipeline, X)


@pytest.mark.parametrize(
    "preprocessing",
    [
        "none",
        "standardize",
        "l2",
        "pca",
    ],
)
def test_torch_head_round_trip_for_each_preprocessing(preprocessing: str, tmp_path: Path) -> None:
    pipe, meta_path = _fit_and_save("linear", tmp_path / "linear", preprocessing=preprocessing)
    artifact = meta_path.with_name(json.loads(meta_path.read_text())["artifact"])
    # Tensors-only heads go to .pt; a PCA step is not expressed in tensors and goes to skops.
    assert artifact.suffix == (".skops" if "pca" in preprocessing else ".pt")
    if artifact.suffix == ".pt":
        state = torch.load(artifact, weights_only=True)
        assert state["steps"][-1] == "linear" and state["classes"] == [0, 1, 2]
        np.testing.assert_array_equal(state["weight"].numpy(), pipe.named_steps["clf"].coef_)
    X, _ = blobs(7, k=3, seed=5)
    art = load_head(meta_path)
    _same_outputs(pipe, art.pipeline, X)
    clf = art.pipeline.named_steps["clf"]
    assert clf.history_ == pipe.named_steps["clf"].history_ and clf.best_epoch_ == pipe.named_steps["clf"].best_epoch_
    assert clf.get_params() == pipe.named_steps["clf"].get_params()


def test_torch_head_on_spatial_features_round_trips(tmp_path: Path) -> None:
    X, y = blobs(12, k=3, d=4 * 3 * 3)
    X = X.reshape(-1, 4, 3, 3)
    pipe, meta_path = _fit_and_save("linear", tmp_path / "linear", X=X, y=y, pool="flatten")
    assert _artifact(meta_path).suffix == ".pt"
    art = load_head(meta_path)
    _same_outputs(pipe, art.pipeline, X)
    with pytest.raises(ValueError, match=r"features of shape \(4, 2, 2\) given to a head fitted on \(4, 3, 3\)"):
        art.pipeline.predict(np.zeros((1, 4, 2, 2), np.float32))


def _artifact(meta_path: Path) -> Path:
    """The artifact a head's metadata names."""
    return meta_path.with_name(json.loads(meta_path.read_text())["artifact"])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, suffix", [("logreg", ".skops"), ("linear", ".pt")])
def test_tampered_artifact_is_refused_without_unpickling(name: str, suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, meta_path = _fit_and_save(name, tmp_path / name)
    artifact = _artifact(meta_path)
    assert artifact.suffix == suffix
    _flip_a_byte(artifact)

    def never(*args: object, **kwargs: object) -> None:
        pytest.fail("a tampered artifact was deserialised")

    monkeypatch.setattr(skops.io, "load", never)
    monkeypatch.setattr(skops.io, "loads", never)
    monkeypatch.setattr(skops.io, "get_untrusted_types", never)
    monkeypatch.setattr(torch, "load", never)
    pattern = (rf"{artifact.name} does not match the sha256 recorded when it was written "
               r"\([0-9a-f]{16}\.\.\. expected, [0-9a-f]{16}\.\.\. found\); refusing to load it")
    with pytest.raises(TamperedArtifactError, match=pattern):
        load_head(meta_path)
    with pytest.raises(TamperedArtifactError):
        load_head(artifact)


def test_swapped_artifact_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another valid head's file put in place of this one's is refused just the same."""
    _, a = _fit_and_save("logreg", tmp_path / "a")
    _, b = _fit_and_save("knn", tmp_path / "b")
    _artifact(a).write_bytes(_artifact(b).read_bytes())
    monkeypatch.setattr(skops.io, "load", lambda *args, **kw: pytest.fail("deserialised"))
    monkeypatch.setattr(skops.io, "loads", lambda *args, **kw: pytest.fail("deserialised"))
    with pytest.raises(TamperedArtifactError, match="refusing to load it"):
        load_head(a)


def test_foreign_missing_and_malformed_metadata(tmp_path: Path) -> None:
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"name": "something else", "artifact": "x.skops"}))
    with pytest.raises(ValueError, match=r"other.json is not a pipeline head"):
        load_head(foreign)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        load_head(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"no head metadata at .*missing.json; fit a head with pipeline fit-head first"):
        load_head(tmp_path / "missing.skops")


def test_metadata_naming_an_artifact_elsewhere_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, meta_path = _fit_and_save("logreg", tmp_path / "sub" / "h")
    outside = tmp_path / "h.skops"
    outside.write_bytes(_artifact(meta_path).read_bytes())
    meta = json.loads(meta_path.read_text())
    meta["artifact"] = "../h.skops"
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setattr(skops.io, "load", lambda *args, **kw: pytest.fail("deserialised"))
    monkeypatch.setattr(skops.io, "loads", lambda *args, **kw: pytest.fail("deserialised"))
    with pytest.raises(ValueError):
        load_head(meta_path)


def test_artifact_elsewhere_message_names_the_metadata_file(tmp_path: Path) -> None:
    _, meta_path = _fit_and_save("logreg", tmp_path / "sub" / "h")
    meta = json.loads(meta_path.read_text())
    meta["artifact"] = "../h.skops"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"h.json names an artifact '\.\./h\.skops' that is not beside it"):
        load_head(meta_path)


def test_head_refuses_features_of_another_backbone(tmp_path: Path) -> None:
    settings = {"model": "mobilenet_v2", "weights": "none", "weights_sha256": None, "taps": ["classifier:input"],
                "preprocess": {"crop": 32}, "amp": False}
    art = HeadArtifact(Pipeline([("pool", SpatialPool())]), {"features": settings}, tmp_path / "h.json")
    art.check_features({"settings": {**settings, "dtype": "float16"}})  # storage dtype is not part of the features
    with pytest.raises(ValueError, match=r"h.json was fitted on other features \(model: head 'mobilenet_v2', features 'resnet18'\)"):
        art.check_features({"settings": {**settings, "model": "resnet18"}})
    with pytest.raises(ValueError, match=r"taps: head \['classifier:input'\], features \['features:output'\]"):
        art.check_features({"settings": {**settings, "taps": ["features:output"]}})


# ---------------------------------------------------------------- skops files: only the types heads are made of


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("k, labels", [(2, "int"), (3, "str")], ids=["2-int", "3-str"])
def test_every_head_family_round_trips_through_skops(name: str, k: int, labels: str, tmp_path: Path) -> None:
    X, y = blobs(12, k=k)
    if labels == "str":
        y = np.array(["ant", "bee", "cat"])[y]
    # With PCA the linear head is not expressible in tensors, so it too goes through skops.
    preprocessing = "standardize+pca" if name == "linear" else None
    pipe = build_head(name, small_value(name), preprocessing=preprocessing, pca=8).fit(X, y)
    meta_path = save_head(pipe, {"clf": name, "classes": np.unique(y).tolist()}, tmp_path / name)
    artifact = _artifact(meta_path)
    assert artifact.suffix == ".skops"
    # What skops would not load by default is on the list, named one by one.
    assert set(skops.io.get_untrusted_types(file=artifact)) <= set(TRUSTED_TYPES)
    X_new, _ = blobs(7, k=k, seed=5)
    _same_outputs(pipe, load_head(meta_path).pipeline, X_new)


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_streamed_sgd_heads_round_trip_through_skops(name: str, tmp_path: Path) -> None:
    from pipeline.stream import fit_streaming, streaming_scaler

    X, y = blobs(12, k=3)
    pool = SpatialPool().fit(X)
    pre = Pipeline([("pool", pool), ("standardize", streaming_scaler(X, 16, pool))])
    clf = fit_streaming(name, 1.0, X, y, np.unique(y), (pre.transform(X), y), lambda b: pre.transform(b).astype(np.float32),
                        block_rows=16, epochs=2)
    pipe = Pipeline([*pre.steps, ("clf", clf)])
    meta_path = save_head(pipe, {"clf": name, "classes": ["ant", "bee", "cat"]}, tmp_path / name)
    assert _artifact(meta_path).suffix == ".skops"
    _same_outputs(pipe, load_head(meta_path).pipeline, blobs(7, k=3, seed=5)[0])


def test_every_trusted_type_names_a_class_that_exists() -> None:
    """A class scikit-learn moved would leave a stale name on the list (and its heads unloadable): caught here."""
    assert len(set(TRUSTED_TYPES)) == len(TRUSTED_TYPES)
    for name in TRUSTED_TYPES:
        module, _, cls = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls, None), type), name


class _Payload:
    """Creates the file ``marker`` when unpickled (``__reduce__``), or when skops builds it (``__setstate__``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


# How a hostile file is planted as a head's artifact: its suffix, and bytes whose loading would create ``marker``.
PLANTED = {
    "pickle-as-skops": ".skops",  # a pickle under the new suffix
    "pickle-as-joblib": ".joblib",  # a pickle under the old suffix
    "pickle-as-pt": ".pt",  # a pickle under the torch suffix
    "skops-with-payload": ".skops",  # a real skops head with one more object inside
}
# What each is refused with, ``{h}`` standing for the head's name.
REFUSED = {
    "pickle-as-skops": r"{h}\.skops is not a readable skops file \(BadZipFile: File is not a zip file\); refusing to load it",
    "pickle-as-joblib": r"{h}\.json names a joblib \(pickle\) head, which is no longer loaded because unpickling can run code; "
                        r"fit it again: pipeline fit-head --clf logreg --refit",
    "pickle-as-pt": r"{h}\.pt holds more than tensors and plain values \(it names [\w.]*open\); refusing to load it",
    "skops-with-payload": r"{h}\.skops holds types that no head is made of: tests\.test_heads\._Payload; refusing to load it",
}


def _hostile(kind: str, marker: Path) -> bytes:
    if kind == "skops-with-payload":
        X, y = blobs(12, k=3)
        head = build_head("logreg", 1.0, pca=8).fit(X, y)
        head.named_steps["clf"].payload_ = _Payload(str(marker))
        return skops.io.dumps(head)
    return pickle.dumps(_Payload(str(marker)), protocol=2)  # torch's reader knows protocol 2 without a warning


def _plant(meta_path: Path, suffix: str, data: bytes) -> Path:
    """Put ``data`` in place of the head's artifact, with the sidecar naming it and its digest updated to match."""
    artifact = meta_path.with_suffix(suffix)
    for old in meta_path.parent.glob(meta_path.stem + ".*"):
        if old != meta_path:
            old.unlink()
    artifact.write_bytes(data)
    meta = json.loads(meta_path.read_text())
    meta["artifact"], meta["artifact_sha256"] = artifact.name, hashlib.sha256(data).hexdigest()
    meta_path.write_text(json.dumps(meta))
    return artifact


def _would_run(kind: str, tmp_path: Path) -> None:
    """The payload is live: loaded the unsafe way, it creates its marker."""
    control = tmp_path / f"control-{kind}"
    data = _hostile(kind, control)
    assert not control.exists()
    if kind == "skops-with-payload":
        skops.io.loads(data, trusted=[*TRUSTED_TYPES, f"{__name__}._Payload"])
    else:
        pickle.loads(data)
    assert control.exists()


@pytest.mark.parametrize("kind", list(PLANTED))
def test_a_file_whose_loading_would_run_code_is_refused(kind: str, tmp_path: Path) -> None:
    _would_run(kind, tmp_path)
    _, meta_path = _fit_and_save("logreg", tmp_path / "h")
    marker = tmp_path / "pwned"
    _plant(meta_path, PLANTED[kind], _hostile(kind, marker))
    with pytest.raises(ValueError, match=REFUSED[kind].format(h="/h")):
        load_head(meta_path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(PLANTED))
def test_the_cli_refuses_a_file_whose_loading_would_run_code(kind: str, tmp_path: Path) -> None:
    from .helpers import error, invoke
    from .test_fit import _fit, make_caches

    head = _fit(make_caches(k=3)).path
    marker = tmp_path / "pwned"
    _plant(head, PLANTED[kind], _hostile(kind, marker))
    refused = REFUSED[kind].format(h="/logreg")
    assert re.search(refused, error(invoke("evaluate", head)))
    assert re.search(refused, error(invoke("predict", "--head", head, "image.png")))
    assert not marker.exists()


def test_an_old_joblib_head_is_refused_with_how_to_refit_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head written by an older version: a genuine joblib pickle with an intact digest, never unpickled."""
    import joblib

    pipe, meta_path = _fit_and_save("svm", tmp_path / "h")
    buffer = tmp_path / "old.joblib"
    joblib.dump(pipe, buffer)
    _plant(meta_path, ".joblib", buffer.read_bytes())
    monkeypatch.setattr(joblib, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(UntrustedArtifactError, match=r"h\.json names a joblib \(pickle\) head.*: pipeline fit-head --clf svm --refit$"):
        load_head(meta_path)
    # Named by its artifact as well; and a metadata file naming a joblib file that is gone gets the same advice.
    with pytest.raises(UntrustedArtifactError, match="--refit"):
        load_head(meta_path.with_suffix(".joblib"))
    meta_path.with_suffix(".joblib").unlink()
    with pytest.raises(UntrustedArtifactError, match="--refit"):
        load_head(meta_path)


def test_a_truncated_skops_file_is_refused(tmp_path: Path) -> None:
    _, meta_path = _fit_and_save("hgb", tmp_path / "h")
    artifact = _artifact(meta_path)
    cut = artifact.read_bytes()[: artifact.stat().st_size // 2]
    artifact.write_bytes(cut)
    with pytest.raises(TamperedArtifactError, match="refusing to load it"):
        load_head(meta_path)
    # With its digest rewritten to match, the skops reader itself refuses it.
    _plant(meta_path, ".skops", cut)
    with pytest.raises(ValueError, match=r"h\.skops is not a readable skops file \(BadZipFile: .*\); refusing to load it"):
        load_head(meta_path)


def test_a_truncated_or_malformed_torch_head_is_refused(tmp_path: Path) -> None:
    import io

    _, meta_path = _fit_and_save("linear", tmp_path / "h")
    _plant(meta_path, ".pt", _artifact(meta_path).read_bytes()[:100])
    with pytest.raises(ValueError, match=r"h\.pt is not a readable torch head \(RuntimeError: .*\); refusing to load it"):
        load_head(meta_path)
    buffer = io.BytesIO()
    torch.save({"steps": ["bogus"]}, buffer)
    _plant(meta_path, ".pt", buffer.getvalue())
    with pytest.raises(ValueError, match=r"h\.pt is not a torch head's tensors \(ValueError: unknown step 'bogus'\)"):
        load_head(meta_path)


def test_a_skops_file_of_other_scikit_learn_objects_is_refused(tmp_path: Path) -> None:
    """skops trusts every scikit-learn estimator by default; a head is a Pipeline of its own steps only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer

    X, y = blobs(12, k=3)
    _, meta_path = _fit_and_save("logreg", tmp_path / "h")
    other = Pipeline([("pool", SpatialPool()), ("f", FunctionTransformer(np.tanh)), ("clf", LogisticRegression())]).fit(X, y)
    _plant(meta_path, ".skops", skops.io.dumps(other))
    with pytest.raises(UntrustedArtifactError, match=r"h\.skops is not a head's Pipeline \(found sklearn\.preprocessing\._function_transformer\.FunctionTransformer\)"):
        load_head(meta_path)
    _plant(meta_path, ".skops", skops.io.dumps(LogisticRegression().fit(X, y)))
    with pytest.raises(UntrustedArtifactError, match=r"is not a head's Pipeline \(found a sklearn\.linear_model\._logistic\.LogisticRegression\)"):
        load_head(meta_path)


def test_a_sweep_value_whose_solver_stopped_early_is_noted_on_its_row_not_printed_as_a_raw_warning() -> None:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from pipeline.config import HeadConfig
    from pipeline.sweep import search

    def trial(value: float) -> float:
        if value == 1.0:
            warnings.warn("Liblinear failed to converge, increase the number of iterations.", ConvergenceWarning)
        warnings.warn(f"other {value:g}", UserWarning)
        return value

    lines: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        best, _, sweep = search("svm", HeadConfig(clf="svm", grid=(0.1, 1.0), refine=0), trial, lambda v: 0.5 + v / 10, log=lines.append)
    assert best == 1.0 and [row.get("converged", True) for row in sweep] == [True, False]
    assert lines[1].endswith("s; the solver stopped at its iteration limit)") and "stopped" not in lines[0]
    assert sorted(str(w.message) for w in seen) == ["other 0.1", "other 1"]  # the rest pass through, once each


def test_a_sweep_on_threads_equals_the_sweep_one_value_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RBF SVM fits a round's values side by side; the rows, the choice and the model are the same."""
    clf = "svm-rbf"
    from pipeline import sweep as sweep_mod
    from pipeline.config import HeadConfig

    X, y = blobs(120, k=4, sep=1.5)
    Xv, yv = blobs(80, k=4, sep=1.5, seed=1)
    config = HeadConfig(clf=clf, grid=(0.01, 1.0, 100.0), refine=1)
    results = {}
    for cores in (1, 3):
        monkeypatch.setattr(sweep_mod, "usable_cores", lambda: cores)
        lines: list[str] = []
        value, fitted, rows = sweep_mod.run_sweep(clf, config, X, y, Xv, yv, log=lines.append)
        results[cores] = (value, [(r["value"], r["val_accuracy"]) for r in rows], fitted.decision_function(Xv), len(lines))
    one, three = results[1], results[3]
    assert one[0] == three[0] and one[1] == three[1] and one[3] == three[3] == 5
    np.testing.assert_array_equal(one[2], three[2])


def test_a_solver_that_stopped_early_on_a_thread_is_noted_on_its_own_row() -> None:
    import warnings

    from pipeline.config import HeadConfig
    from pipeline.sweep import search

    X, y = blobs(200, k=3, sep=0.5)
    from sklearn.svm import LinearSVC

    def trial(C: float) -> LinearSVC:  # a tiny iteration limit stops the large C early, not the small one
        return LinearSVC(C=C, max_iter=3 if C > 1 else 1000, tol=1e-6).fit(X, y)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, _, rows = search("svm", HeadConfig(clf="svm", grid=(1e-3, 1e3), refine=0), trial, lambda c: c.score(X, y), workers=2)
    assert [r.get("converged", True) for r in rows] == [True, False]
    assert not any("converge" in str(w.message) for w in seen)


def test_an_svm_predicts_the_same_in_row_blocks_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import heads as heads_mod

    X, y = blobs(300, k=4, sep=1.0)
    pipe = build_head("svm-rbf", 1.0).fit(X, y)
    Xq, _ = blobs(275, k=4, sep=1.0, seed=2)  # 1,100 rows
    calls: list[int] = []
    svc = pipe.steps[-1][1]
    real = type(svc).decision_function
    monkeypatch.setattr(type(svc), "decision_function", lambda self, Z: (calls.append(len(Z)), real(self, Z))[1])
    monkeypatch.setattr(heads_mod, "usable_cores", lambda: 3)
    blocks = heads_mod.in_row_blocks(pipe, "decision_function", Xq)
    assert sorted(calls) == [366, 367, 367]
    np.testing.assert_array_equal(blocks, real(svc, pipe[:-1].transform(Xq)))
    np.testing.assert_array_equal(heads_mod.in_row_blocks(pipe, "predict", Xq), pipe.predict(Xq))
