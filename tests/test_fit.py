"""Stage two: fit_head's sweep, metadata and refusals, evaluate, compare and predict, through the Python API and the CLI.

Most tests write small synthetic feature caches (Gaussian classes) through the cache writer, so no backbone
runs; one module fixture runs a real tiny extraction for the end-to-end and predict tests.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

from pipeline import ExtractConfig, extract, read_cache
from pipeline.artifacts import feature_identity, load_head
from pipeline.cache import FeatureCache, PartialRun, write_cache
from pipeline.evaluate import compare, evaluate
from pipeline.data import stratified_subset
from pipeline.evaluate import load_predictions
from pipeline.fit import HeadConfig, fit_head, paths_digest
from pipeline.heads import HEADS, head_probabilities
from pipeline.predict import predict, write_predictions
from pipeline.stats import expected_calibration_error, wilson_interval

from .conftest import CLASSES, make_image_folder, tiny, working_in
from .helpers import error, invoke, ok, small_value, usage_error

# Where extract would put caches of dataset "ds" with random-weight MobileNetV2 and the default tap, so that
# fit-head, evaluate and compare find them without path options.
CACHE_DIR = Path("features/ds/mobilenet_v2-none/classifier-input")
SOURCE = ExtractConfig(data="ds", weights="none")
TAP = "classifier:input"


def small(name: str) -> tuple:
    """A one-value grid for a head: fast and independent of the default grids."""
    return (small_value(name),)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- synthetic caches


def settings_for(split: str, **overrides: object) -> dict:
    """What extract records about a cache of tiny() settings; ``overrides`` change single fields."""
    settings = {
        "dataset": "ds", "dataset_fingerprint": hashlib.sha256(split.encode()).hexdigest(), "split": split, "carved": None,
        "model": "mobilenet_v2", "weights": "none", "weights_sha256": None, "taps": [TAP],
        "preprocess": {"resize": 36, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "interpolation": "bilinear", "antialias": True},
        "dtype": "float32", "compression": "none", "amp": False, "engine": "eager",
    }
    settings.update(overrides)
    return settings


def write_features(path: Path, X: np.ndarray, y: np.ndarray, classes: list[str], *, split: str | None = None,
                   settings: dict | None = None, attrs: dict | None = None, paths: list[str] | None = None) -> Path:
    """Write a complete cache the way extract does: a partial run with one shard, then the final file."""
    path = Path(path)
    split = split or path.stem
    settings = settings or settings_for(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialRun(path)
    partial.start(settings)
    partial.write(0, len(X), [np.asarray(X)], np.arange(len(X)), [])
    if paths is None:
        paths = [f"{split}/{classes[c]}/{i:03d}.png" for i, c in enumerate(np.asarray(y).tolist())]
    base = {"settings": settings, "dataset": settings["dataset"], "split": split, "model": settings["model"],
            "weights": settings["weights"], "taps": settings["taps"], "preprocess": settings["preprocess"],
            "dtype": settings["dtype"], "dataset_fingerprint": settings["dataset_fingerprint"], "created": "2024-01-01T00:00:00+00:00"}
    return write_cache(partial, tap_names=settings["taps"], paths=paths, labels=np.asarray(y), classes=classes,
                       rejected=[], attrs={**base, **(attrs or {})})


def blobs(counts: list[int], d: int = 32, sep: float = 4.0, seed: int = 0, spatial: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around fixed centres (the same for every split), ``counts[c]`` rows of class c."""
    centres = np.random.default_rng(12345).normal(size=(len(counts), d)) * sep
    y = np.repeat(np.arange(len(counts)), counts)
    X = (centres[y] + np.random.default_rng(seed).normal(size=(len(y), d))).astype(np.float32)
    if spatial:
        X = X.reshape(len(y), d // (spatial[0] * spatial[1]), *spatial)
    return X, y


def make_caches(k: int = 4, n: tuple[int, int, int] = (20, 10, 10), d: int = 32, sep: float = 4.0,
                splits: tuple[str, ...] = ("train", "val", "test"), root: Path = CACHE_DIR,
                spatial: tuple[int, int] | None = None) -> SimpleNamespace:
    """Train/val/test caches of ``k`` classes with n[i] rows per class; returns paths, arrays and class names."""
    classes = [f"c{i}" for i in range(k)]
    out = SimpleNamespace(classes=classes, root=Path(root))
    for seed, (split, per_class) in enumerate(zip(("train", "val", "test"), n)):
        if split in splits:
            X, y = blobs([per_class] * k, d=d, sep=sep, seed=seed, spatial=spatial)
            setattr(out, split, write_features(Path(root) / f"{split}.h5", X, y, classes))
            setattr(out, f"X_{split}", X)
            setattr(out, f"y_{split}", y)
    return out


def emptied(path: Path) -> Path:
    """Rewrite a cache in place with zero rows (write_cache itself refuses to write an empty split)."""
    with h5py.File(path, "a") as f:
        tap = list(f["features"])[0]
        shape = f["features"][tap].shape[1:]
        for name in (f"features/{tap}", "index", "labels", "paths"):
            dtype = f[name].dtype
            del f[name]
            f.create_dataset(name, shape=(0, *shape) if name.startswith("features") else (0,), dtype=dtype)
        f.attrs["n_rows"] = 0
    return path


def _fit(c: SimpleNamespace, clf: str = "logreg", **kw: object):
    config = HeadConfig(clf=clf, grid=kw.pop("grid", small(clf)), refine=kw.pop("refine", 0), train_cache=str(c.train), val_cache=str(c.val), **kw)
    return fit_head(config)


# ---------------------------------------------------------------- every head learns


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_learns_separable_features(name: str) -> None:
    c = make_caches(k=4)
    result = fit_head(HeadConfig(clf=name, grid=small(name), refine=0), SOURCE)
    assert result.path == CACHE_DIR / "heads" / f"{name}.json"
    assert result.clf == name and result.param == HEADS[name].param and result.value == small(name)[0]
    assert result.val_accuracy >= 0.9  # chance is 0.25
    pipe = load_head(result.path).pipeline
    assert accuracy_score(c.y_test, pipe.predict(c.X_test)) >= 0.9
    assert accuracy_score(c.y_val, pipe.predict(c.X_val)) == pytest.approx(result.val_accuracy)


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
def test_linear_head_on_spatial_caches(pool: str) -> None:
    c = make_caches(k=3, d=16 * 2 * 2, spatial=(2, 2))
    assert c.X_train.shape == (60, 16, 2, 2)
    result = fit_head(HeadConfig(clf="linear", grid=(1e-3,), refine=0, pool=pool), SOURCE)
    assert result.val_accuracy >= 0.9
    art = load_head(result.path)
    assert re.fullmatch(r"linear\.[0-9a-f]{16}\.pt", art.meta["artifact"]) and art.meta["config"]["pool"] == pool
    assert art.pipeline.named_steps["pool"].input_shape_ == (16, 2, 2)
    m = evaluate(result.path)
    assert m["top1"] >= 0.9 and m["n"] == 30


# ---------------------------------------------------------------- the sweep


def test_sweep_chooses_the_best_val_value_and_is_saved() -> None:
    c = make_caches(k=4, sep=0.4, n=(30, 30, 5))  # overlapping classes: the sweep's accuracies differ
    grid = (1e-4, 1e-2, 1.0)
    result = _fit(c, grid=grid, refine=0)
    values = [row["value"] for row in result.sweep]
    assert values == list(grid)
    accs = [row["val_accuracy"] for row in result.sweep]
    assert len(set(accs)) > 1, "the data should make the grid values differ"
    best = max(accs)
    assert result.val_accuracy == best
    assert result.sweep[values.index(result.value)]["val_accuracy"] == best
    assert all(row["seconds"] >= 0 for row in result.sweep)
    meta = json.loads(result.path.read_text())
    assert meta["sweep"] == result.sweep and meta["value"] == result.value and meta["val_accuracy"] == best
    assert meta["param"] == "C"
    # The saved head is the chosen one, and scores on val what the sweep reported.
    pipe = load_head(result.path).pipeline
    assert pipe.named_steps["clf"].get_params()["C"] == result.value
    assert accuracy_score(c.y_val, pipe.predict(c.X_val)) == pytest.approx(best)


def test_refinement_adds_values_around_the_best_on_a_log_grid() -> None:
    c = make_caches(k=4, sep=0.4, n=(30, 30, 5))
    grid = (1e-4, 1e-2, 1.0)
    coarse = {row["value"]: row["val_accuracy"] for row in _fit(c, grid=grid, refine=0).sweep}
    result = _fit(c, grid=grid, refine=1)
    values = [row["value"] for row in result.sweep]
    assert values == sorted(values)
    assert all(v in values for v in grid)
    added = sorted(set(values) - set(grid))
    # One halving round on a grid 2 decades apart tries the best coarse value / 10 and * 10.
    assert added and _around(added, coarse, 1.0, exclude=grid), (added, coarse)
    accs = {row["value"]: row["val_accuracy"] for row in result.sweep}
    assert result.val_accuracy == max(accs.values()) == accs[result.value]
    # A second round halves the step again: half a decade either side of the best value so far.
    deeper = [row["value"] for row in _fit(c, grid=grid, refine=2).sweep]
    assert set(values) <= set(deeper)
    assert _around(sorted(set(deeper) - set(values)), accs, 0.5, exclude=values), (deeper, accs)


def _around(added: list[float], accs: dict[float, float], decades: float, exclude: object) -> bool:
    """Whether ``added`` are the neighbours, ``decades`` away and rounded to 3 digits, of a best value of ``accs``."""
    tops = [v for v, a in accs.items() if a == max(accs.values())]
    return any(added == sorted({float(f"{v * 10 ** (s * decades):.3g}") for s in (-1, 1)} - set(exclude)) for v in tops)


def test_no_refinement_on_linear_scales_or_with_refine_0() -> None:
    c = make_caches(k=3)
    assert not HEADS["knn"].log
    assert [r["value"] for r in _fit(c, "knn", grid=(1, 3, 5), refine=3).sweep] == [1, 3, 5]
    assert [r["value"] for r in _fit(c, "logreg", grid=(0.1, 1.0), refine=0).sweep] == [0.1, 1.0]


def test_linear_head_sweep_records_best_epochs_and_history() -> None:
    c = make_caches(k=3)
    result = _fit(c, "linear", grid=(1e-3, 1e-2))
    assert all(isinstance(row["best_epoch"], int) and row["best_epoch"] >= 1 for row in result.sweep)
    clf = load_head(result.path).pipeline.named_steps["clf"]
    history = CACHE_DIR / "heads" / "linear-history.csv"
    with open(history, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == clf.epochs == len(clf.history_)
    assert [int(r["epoch"]) for r in rows] == list(range(1, clf.epochs + 1))
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(rows[0])
    assert float(rows[-1]["val_acc"]) == pytest.approx(clf.history_[-1]["val_acc"])


def test_fit_never_reads_the_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    c = make_caches(k=3, splits=("train", "val"))
    assert not (CACHE_DIR / "test.h5").exists()
    opened = []
    original = FeatureCache.__init__

    def spy(self: FeatureCache, path: object) -> None:
        opened.append(Path(path).name)
        original(self, path)

    monkeypatch.setattr(FeatureCache, "__init__", spy)
    result = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE)
    assert result.val_accuracy >= 0.9
    assert "test.h5" not in opened and {"train.h5", "val.h5"} <= set(opened)
    assert c.train.is_file()


# ---------------------------------------------------------------- metadata


def test_head_metadata_records_how_it_was_made() -> None:
    make_caches(k=3)
    result = fit_head(HeadConfig(clf="logreg", grid=(0.1, 1.0), refine=0, seed=4), SOURCE)
    meta = json.loads(result.path.read_text())
    with read_cache(CACHE_DIR / "train.h5") as train:
        attrs = train.attrs
    assert meta["format"] == "pipeline-head" and meta["artifact"] == f"logreg.{meta['artifact_sha256'][:16]}.skops"
    assert meta["artifact_sha256"] == hashlib.sha256((CACHE_DIR / "heads" / meta["artifact"]).read_bytes()).hexdigest()
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["tap"] == TAP
    assert meta["clf"] == "logreg" and meta["param"] == "C" and meta["value"] == result.value
    assert meta["preprocessing"] == HEADS["logreg"].preprocessing
    assert meta["config"]["grid"] == [0.1, 1.0] and meta["config"]["seed"] == 4 and meta["config"]["clf"] == "logreg"
    assert meta["train_cache"] == {"path": str((CACHE_DIR / "train.h5").resolve()), "dataset_fingerprint": attrs["dataset_fingerprint"], "rows": 60}
    with read_cache(CACHE_DIR / "val.h5") as val:
        val_fingerprint = val.attrs["dataset_fingerprint"]
    assert meta["val_cache"] == {"path": str((CACHE_DIR / "val.h5").resolve()), "dataset_fingerprint": val_fingerprint, "rows": 30}
    assert meta["overlap"] == []
    assert meta["features"] == feature_identity(attrs) and meta["features"]["model"] == "mobilenet_v2"
    assert meta["extract_settings"] == attrs["settings"]
    assert meta["val_accuracy"] == result.val_accuracy and 0.9 <= meta["train_accuracy"] <= 1
    assert meta["fit_seconds"] == result.fit_seconds > 0
    assert {"pipeline", "torch", "numpy", "python"} <= set(meta["versions"])
    assert meta["created"].endswith("+00:00")


def test_a_head_saved_in_the_old_pickle_format_is_fitted_again_not_reused() -> None:
    make_caches(k=3)
    config = HeadConfig(clf="logreg", grid=(0.1, 1.0), refine=0)
    first = fit_head(config, SOURCE)
    assert fit_head(config, SOURCE).status == "up-to-date"
    # What an older version left: the same inputs, but a joblib artifact (with an intact digest).
    meta = json.loads(first.path.read_text())
    old = first.path.with_suffix(".joblib")
    old.write_bytes(b"an old pickle")
    meta.update(artifact=old.name, artifact_sha256=hashlib.sha256(old.read_bytes()).hexdigest())
    first.path.write_text(json.dumps(meta))
    again = fit_head(config, SOURCE)
    assert again.status == "fitted" and json.loads(again.path.read_text())["artifact"].endswith(".skops")
    assert not old.exists()  # the replaced artifact is removed once the new metadata is in place


def test_head_metadata_records_the_scikit_learn_version() -> None:
    make_caches(k=3)
    meta = json.loads(fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE).path.read_text())
    assert "scikit-learn" in meta["versions"] or "sklearn" in meta["versions"]


# ---------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    "field, change, message",
    [
        ("model", {"model": "resnet18"}, r"model: train 'mobilenet_v2', val 'resnet18'"),
        ("weights", {"weights": "IMAGENET1K_V1"}, r"weights: train 'none', val 'IMAGENET1K_V1'"),
        ("tap", {"taps": ["features:output"]}, r"taps: train \['classifier:input'\], val \['features:output'\].*tap 'classifier:input': not in val"),
        ("preprocessing", {"preprocess": {**settings_for("val")["preprocess"], "crop": 64}}, r"preprocess: train \{.*'crop': 32.*\}, val \{.*'crop': 64"),
        ("classes", None, r"classes: train \['c0', 'c1', 'c2'\], val \['c0', 'c1', 'dog'\]"),
    ],
)
def test_train_and_val_caches_that_differ_are_refused(field: str, change: dict | None, message: str) -> None:
    c = make_caches(k=3, splits=("train",))
    X, y = blobs([5, 5, 5])
    classes = ["c0", "c1", "dog"] if change is None else c.classes
    val = write_features(CACHE_DIR / "val.h5", X, y, classes, settings=settings_for("val", **(change or {})))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(c.train))} and {re.escape(str(val))} do not match: .*{message}"):
        fit_head(HeadConfig(clf="logreg", grid=(1.0,)), SOURCE)
    assert not (CACHE_DIR / "heads").exists()
    if field == "model":
        assert error(invoke("fit-head", "--data", "ds", "--weights", "none", "--grid", "1")).startswith(f"{c.train} and {val} do not match: model:")


@pytest.mark.parametrize(
    "change, classes, message",
    [
        ({"model": "resnet18"}, None, r"logreg.json was fitted on other features \(model: head 'mobilenet_v2', features 'resnet18'\)"),
        ({"taps": ["features:output"]}, None, r"was fitted on other features \(taps: head \['classifier:input'\], features \['features:output'\]\)"),
        ({}, ["c0", "c1", "dog"], r"test.h5 has classes \['c0', 'c1', 'dog'\], the head was fitted on \['c0', 'c1', 'c2'\]"),
    ],
)
def test_evaluate_refuses_features_the_head_was_not_fitted_on(change: dict, classes: list[str] | None, message: str) -> None:
    c = make_caches(k=3, splits=("train", "val"))
    head = _fit(c).path
    X, y = blobs([4, 4, 4])
    other = write_features(Path("other/test.h5"), X, y, classes or c.classes, settings=settings_for("test", **change))
    with pytest.raises(ValueError, match=message):
        evaluate(head, other)
    assert not (CACHE_DIR / "heads" / "logreg-test.json").exists()
    assert re.search(message, error(invoke("evaluate", head, "--test-cache", other)))


# ---------------------------------------------------------------- bad input, one clear line


def _incomplete(c: SimpleNamespace) -> None:
    c.train.unlink()
    partial = PartialRun(c.train)
    partial.start(settings_for("train"))
    partial.write(0, 7, [np.zeros((7, 32), np.float32)], np.arange(7), [])


def _single_class(c: SimpleNamespace) -> None:
    X, _ = blobs([10])
    write_features(c.train, X, np.zeros(10, int), c.classes)


def _nan(c: SimpleNamespace) -> None:
    X = c.X_train.copy()
    X[13, 5] = np.nan
    write_features(c.train, X, c.y_train, c.classes)


def _inf(c: SimpleNamespace) -> None:
    X = c.X_val.copy()
    X[0, 0] = np.inf
    X[7, 1] = -np.inf
    write_features(c.val, X, c.y_val, c.classes)


def _val_has_more_classes(c: SimpleNamespace) -> None:
    keep = c.y_train != 3
    write_features(c.train, c.X_train[keep], c.y_train[keep], c.classes)


BAD_INPUT = {
    "missing cache": (lambda c: c.train.unlink(), r"no feature cache at features/ds/mobilenet_v2-none/classifier-input/train.h5; run pipeline extract first"),
    "incomplete cache": (_incomplete, r"train.h5 is incomplete: its extraction stopped after 7 images; re-run pipeline extract with the same settings to finish it"),
    "single class": (_single_class, r"the train split in .*train.h5 has a single class \(c0\); a classifier needs two or more"),
    "nan": (_nan, r"train.h5 has NaN or inf features in 1 of 80 rows \(first: train/c0/013.png\)"),
    "inf": (_inf, r"val.h5 has NaN or inf features in 2 of 40 rows \(first: val/c0/000.png\)"),
    "empty split": (lambda c: emptied(c.val), r"the val split in .*val.h5 is empty"),
    "val classes train lacks": (_val_has_more_classes, r"the val split has classes the train split lacks: \['c3'\]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case: str) -> None:
    c = make_caches(k=4, splits=("train", "val"))
    spoil, message = BAD_INPUT[case]
    spoil(c)
    with pytest.raises(ValueError, match=message):
        fit_head(HeadConfig(clf="logreg", grid=(1.0,)), SOURCE)
    line = error(invoke("fit-head", "--data", "ds", "--weights", "none", "--grid", "1"))
    assert re.search(message, line), line
    assert not (CACHE_DIR / "heads").exists()


def test_bad_options_are_usage_errors() -> None:
    make_caches(k=3, splits=("train", "val"))
    assert "Invalid value for '--clf': 'nope' is not one of" in usage_error(invoke("fit-head", "--clf", "nope"))
    assert "expected comma-separated numbers, got '1,x'" in usage_error(invoke("fit-head", "--grid", "1,x"))
    assert "Invalid value for '--pool'" in usage_error(invoke("fit-head", "--pool", "sum"))
    with pytest.raises(ValueError, match=r"unknown head 'nope'; expected one of linear, logreg"):
        HeadConfig(clf="nope")
    with pytest.raises(ValueError, match=r"pool must be one of avg, max, flatten, got 'sum'"):
        HeadConfig(pool="sum")
    with pytest.raises(ValueError, match=r"train.h5 has no tap 'nope'; it holds classifier:input"):
        fit_head(HeadConfig(tap="nope"), SOURCE)
    assert error(invoke("evaluate", "nowhere.json")) == "no head metadata at nowhere.json; fit a head with pipeline fit-head first"
    assert error(invoke("compare", "empty")) == "no heads in empty; fit one with pipeline fit-head"


def test_zero_in_a_log_grid_is_handled() -> None:
    make_caches(k=3, splits=("train", "val"))
    result = invoke("fit-head", "--data", "ds", "--weights", "none", "--clf", "linear", "--grid", "0,0.01", "--refine", "1")
    if result.exit_code != 0:
        error(result)


def test_knn_default_grid_on_a_small_train_split() -> None:
    k_max = max(HEADS["knn"].grid)
    if k_max < 5:
        pytest.skip("the default knn grid fits any train split of 4 or more rows")
    per_class = (k_max - 1) // 2
    c = make_caches(k=2, n=(per_class, 5, 5), splits=("train", "val"))
    result = fit_head(HeadConfig(clf="knn", train_cache=str(c.train), val_cache=str(c.val)))
    assert all(row["value"] <= 2 * per_class for row in result.sweep if "val_accuracy" in row)
    skipped = [row for row in result.sweep if "skipped" in row]
    assert skipped and all(row["value"] > 2 * per_class and row["skipped"] == f"more neighbours than the {2 * per_class} train rows" for row in skipped)


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("clf", ["logreg", "svm"])
def test_evaluate_metrics_match_sklearn(clf: str) -> None:
    # Seven overlapping classes and an unbalanced test split: top-1 < top-5 and balanced != plain accuracy.
    classes = [f"c{i}" for i in range(7)]
    for split, counts, seed in (("train", [25] * 7, 0), ("val", [10] * 7, 1), ("test", [3, 5, 8, 10, 12, 15, 20], 2)):
        X, y = blobs(counts, d=16, sep=0.7, seed=seed)
        write_features(CACHE_DIR / f"{split}.h5", X, y, classes)
    head = fit_head(HeadConfig(clf=clf, grid=small(clf), refine=0), SOURCE).path
    m = evaluate(head)  # the test cache is found beside the train cache
    assert m["test_cache"] == str((CACHE_DIR / "test.h5").resolve()) and m["n"] == 73 and m["clf"] == clf

    art = load_head(head)
    with read_cache(CACHE_DIR / "test.h5") as cache:
        X, y = cache.features(), cache.labels
    pred = art.pipeline.predict(X)
    scores = art.pipeline.predict_proba(X) if clf == "logreg" else art.pipeline.decision_function(X)
    assert m["top1"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(7)))
    assert m["top1"] > 1 / 7, "the head should beat chance on 7 classes"
    assert m["top5"] > m["top1"], "the overlapping classes leave right answers in the top 5 that top-1 misses"
    assert m["balanced_accuracy"] != pytest.approx(m["top1"]), "unequal class sizes should separate the two metrics"
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert m["per_class"]["c6"]["support"] == 20
    assert m["per_class"]["c2"]["recall"] == pytest.approx(m["confusion_matrix"][2][2] / 8)
    assert m["val_accuracy"] == art.meta["val_accuracy"] and m["value"] == art.meta["value"]
    # The 95 % interval of top-1, and the calibration error of the probabilities predict gives (at the head's temperature).
    assert m["top1_ci"] == list(wilson_interval(int((pred == y).sum()), 73)) and m["top1_ci"][0] < m["top1"] < m["top1_ci"][1]
    assert m["ece"] == pytest.approx(expected_calibration_error(head_probabilities(art.pipeline, X, art.temperature), y))

    saved = json.loads((CACHE_DIR / "heads" / f"{clf}-test.json").read_text())
    assert m["json"] == str(CACHE_DIR / "heads" / f"{clf}-test.json")
    assert saved == {k: v for k, v in m.items() if k not in ("json", "status")} and m["status"] == "evaluated"
    preds = load_predictions(head)
    assert np.array_equal(preds["y"], y) and np.array_equal(preds["pred"], pred)
    with read_cache(CACHE_DIR / "test.h5") as cache:
        assert preds["paths"] == cache.paths
    png = Path(m["confusion_png"])
    assert png == CACHE_DIR / "heads" / f"{clf}-confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and min(img.size) > 100

    out = ok(invoke("evaluate", head))
    lo, hi = m["top1_ci"]
    assert out.splitlines()[0] == (f"{clf}: test top-1 {m['top1']:.4f} (95 % CI {lo:.4f}-{hi:.4f}), top-5 {m['top5']:.4f}, "
                                   f"balanced accuracy {m['balanced_accuracy']:.4f}, ECE {m['ece']:.4f} on 73 images")
    assert f"metrics {m['json']}" in out and f"confusion matrix {png}" in out


def test_evaluate_reuses_its_result_until_the_head_or_the_test_cache_changes() -> None:
    c = make_caches(k=3)
    head = _fit(c).path
    first = evaluate(head)
    out = Path(first["json"])
    stamp = out.stat().st_mtime_ns
    again = evaluate(head)
    assert again["status"] == "up-to-date" and out.stat().st_mtime_ns == stamp
    assert {k: v for k, v in again.items() if k != "status"} == {k: v for k, v in first.items() if k != "status"}
    assert "up to date" in ok(invoke("evaluate", head))
    assert evaluate(head, force=True)["status"] == "evaluated"
    _fit(c, grid=(0.5,))  # a new head at the same path
    assert evaluate(head)["status"] == "evaluated"
    X, y = blobs([10] * 3, seed=2)
    write_features(c.test, X[::-1], y[::-1], c.classes, attrs={"created": "2025-06-01T00:00:00+00:00"})
    m = evaluate(head)
    assert m["status"] == "evaluated" and np.array_equal(load_predictions(head)["y"], y[::-1])
    Path(str(head).replace(".json", "-test-predictions.npz")).unlink()  # a lost predictions file is remade
    assert evaluate(head)["status"] == "evaluated"


def test_evaluate_without_top5_for_five_classes_or_fewer() -> None:
    c = make_caches(k=5, n=(10, 5, 4))
    head = _fit(c).path
    m = evaluate(head, c.test)
    assert "top5" not in m and m["top1"] >= 0.9 and m["n"] == 20
    assert "top5" not in json.loads(Path(m["json"]).read_text())
    out = ok(invoke("evaluate", head, "--test-cache", c.test))
    assert "top-5" not in out and out.startswith(f"logreg: test top-1 {m['top1']:.4f} (95 % CI ")


def test_evaluate_refuses_a_tampered_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import skops.io

    c = make_caches(k=3)
    head = _fit(c).path
    artifact = head.with_name(json.loads(head.read_text())["artifact"])
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x01
    artifact.write_bytes(bytes(data))
    monkeypatch.setattr(skops.io, "load", lambda *a, **k: pytest.fail("a tampered head was deserialised"))
    monkeypatch.setattr(skops.io, "loads", lambda *a, **k: pytest.fail("a tampered head was deserialised"))
    message = error(invoke("evaluate", head))
    assert message.startswith(f"{artifact} does not match the sha256 recorded when it was written")
    assert message.endswith("refusing to load it")


def test_evaluate_from_another_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_caches(k=3)
    head = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE).path.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate(head)["top1"] >= 0.9


def test_train_split_without_a_class() -> None:
    classes = [f"c{i}" for i in range(7)]
    for split, seed in (("train", 0), ("val", 1)):
        X, y = blobs([0, 10, 10, 10, 10, 10, 10], d=16, seed=seed)
        write_features(CACHE_DIR / f"{split}.h5", X, y, classes)
    X, y = blobs([3] * 7, d=16, seed=2)
    write_features(CACHE_DIR / "test.h5", X, y, classes)
    try:
        head = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE).path
    except ValueError as e:  # refusing clearly is a fix too
        assert "c0" in str(e)
        return
    m = evaluate(head)
    assert m["top5"] >= m["top1"] >= 5 / 7 * 0.9


# ---------------------------------------------------------------- compare


def test_compare_lists_every_head() -> None:
    make_caches(k=3)
    fits = {clf: fit_head(HeadConfig(clf=clf, grid=grid, refine=0), SOURCE) for clf, grid in
            (("logreg", (0.1, 1.0)), ("knn", (1, 3)), ("linear", (1e-3,)))}
    m = evaluate(fits["knn"].path)
    rows = compare(source=SOURCE)
    assert sorted(r["clf"] for r in rows) == ["knn", "linear", "logreg"]
    assert rows == compare(CACHE_DIR / "heads")
    for r in rows:
        fit = fits[r["clf"]]
        meta = json.loads(fit.path.read_text())
        assert r["val_accuracy"] == fit.val_accuracy and r["fit_seconds"] == meta["fit_seconds"] > 0
        assert r["param"] == fit.param and r["value"] == fit.value and r["path"] == str(fit.path)
        assert r["preprocessing"] == meta["preprocessing"] and r["config"] == meta["config"] and r["subset"] is None
        if r["clf"] == "knn":
            assert r["top1"] == m["top1"] and r["balanced_accuracy"] == m["balanced_accuracy"] and r["top1_ci"] == m["top1_ci"]
        else:
            assert r["top1"] is None and r["top5"] is None and r["top1_ci"] is None
    key = [r["top1"] if r["top1"] is not None else r["val_accuracy"] for r in rows]
    assert key == sorted(key, reverse=True)

    out = ok(invoke("compare", "--data", "ds", "--weights", "none")).splitlines()
    assert out[0].split() == ["head", "test", "top-1", "95", "%", "CI", "top-5", "bal.", "acc", "val", "acc", "fit", "s", "chosen"]
    assert len(out) == 4
    for r, line in zip(rows, out[1:]):
        cells = line.split()
        assert cells[0] == r["clf"]
        assert cells[5] == f"{r['val_accuracy']:.4f}" and cells[6] == f"{r['fit_seconds']:.1f}"
        assert cells[7] == f"{r['param']}={r['value']:g}" and cells[8] == f"({r['preprocessing']})"
        assert cells[1] == (f"{r['top1']:.4f}" if r["top1"] is not None else "-")
        assert cells[2] == (f"{r['top1_ci'][0]:.4f}-{r['top1_ci'][1]:.4f}" if r["top1"] is not None else "-")
    assert ok(invoke("compare", CACHE_DIR / "heads")) == "\n".join(out) + "\n"


# ---------------------------------------------------------------- the fit-head command


def test_fit_head_command() -> None:
    make_caches(k=3)
    out = ok(invoke("fit-head", "--data", "ds", "--weights", "none", "--clf", "knn", "--grid", "1,3", "--refine", "0")).splitlines()
    head = CACHE_DIR / "heads" / "knn.json"
    meta = json.loads(head.read_text())
    # Both values are right on every val image: a tie, said last, on stderr.
    assert out.pop().startswith("warning: every n_neighbors of the sweep (1, 3) gave the same val accuracy 100.00%")
    assert [line.split()[:2] for line in out[:-1]] == [["knn", "n_neighbors=1"], ["knn", "n_neighbors=3"]]  # live, one per value
    assert out[-1].startswith(f"knn: n_neighbors={meta['value']}, val accuracy {meta['val_accuracy']:.4f}, fit ")
    assert out[-1].endswith(f" s -> {head}")
    assert meta["config"]["grid"] == [1, 3]

    # Explicit cache files, another output, and [head] settings from pipeline.toml.
    Path("pipeline.toml").write_text('[head]\nclf = "logreg"\ngrid = [0.5]\nrefine = 0\n')
    out = ok(invoke("fit-head", "--train-cache", CACHE_DIR / "train.h5", "--val-cache", CACHE_DIR / "val.h5", "-o", "mine/h"))
    assert out.splitlines()[-1].endswith("-> mine/h.json") and out.startswith("  logreg C=0.5 ")
    assert json.loads(Path("mine/h.json").read_text())["value"] == 0.5

    # The same command again reuses the head; --refit fits it anew.
    again = ok(invoke("fit-head", "--train-cache", CACHE_DIR / "train.h5", "--val-cache", CACHE_DIR / "val.h5", "-o", "mine/h"))
    assert again == "logreg: up to date (C=0.5, val accuracy 1.0000); nothing to do, --refit to fit again -> mine/h.json\n"
    refit = ok(invoke("fit-head", "--train-cache", CACHE_DIR / "train.h5", "--val-cache", CACHE_DIR / "val.h5", "-o", "mine/h", "--refit"))
    assert refit.startswith("  logreg C=0.5 ") and "up to date" not in refit


# ---------------------------------------------------------------- reuse of fitted heads, subsets


def test_fit_head_reuses_a_head_only_while_its_inputs_are_unchanged() -> None:
    c = make_caches(k=3)
    first = _fit(c)
    assert first.status == "fitted"
    stamp = first.path.stat().st_mtime_ns
    again = _fit(c)
    assert again.status == "up-to-date" and again.path == first.path and first.path.stat().st_mtime_ns == stamp
    assert (again.value, again.val_accuracy, again.sweep) == (first.value, first.val_accuracy, json.loads(json.dumps(first.sweep)))
    assert fit_head(HeadConfig(clf="logreg", grid=small("logreg"), refine=0, train_cache=str(c.train), val_cache=str(c.val)), refit=True).status == "fitted"

    # Another setting, a re-extracted train cache, or a damaged artifact: fitted again.
    assert _fit(c, grid=(0.5,)).status == "fitted"
    assert _fit(c, grid=(0.5,)).status == "up-to-date"
    X, y = blobs([20] * 3, seed=0)
    write_features(c.train, X, y, c.classes, attrs={"created": "2025-06-01T00:00:00+00:00"})
    assert _fit(c, grid=(0.5,)).status == "fitted"
    artifact = first.path.with_name(json.loads(first.path.read_text())["artifact"])
    artifact.write_bytes(artifact.read_bytes()[:-8])
    assert _fit(c, grid=(0.5,)).status == "fitted"
    assert load_head(first.path).meta["value"] == 0.5


def test_fit_head_progress_lines_arrive_while_fitting() -> None:
    c = make_caches(k=3)
    lines: list[str] = []
    fit_head(HeadConfig(clf="logreg", grid=(0.1, 1.0), refine=0, train_cache=str(c.train), val_cache=str(c.val)), log=lines.append)
    assert [line.split()[:2] for line in lines] == [["logreg", "C=0.1"], ["logreg", "C=1"]]
    assert all("val acc" in line for line in lines)


def test_subset_heads_fit_a_stratified_draw() -> None:
    c = make_caches(k=3, n=(20, 10, 10))
    result = _fit(c, subset=4, seed=3)
    meta = json.loads(result.path.read_text())
    assert meta["subset"]["rows"] == 12 and meta["train_cache"]["rows"] == 12 and meta["subset"]["per_class"] == 4
    with read_cache(c.train) as cache:
        rows = stratified_subset(cache.labels, 4, 3)
        expected = paths_digest([cache.paths[i] for i in rows])
        assert np.bincount(cache.labels[rows]).tolist() == [4, 4, 4]
    assert meta["subset"]["paths_sha256"] == expected
    assert _fit(c, subset=4, seed=4).status == "fitted"  # another draw is another head


def test_subset_head_and_finetune_subset_are_the_same_images(real: SimpleNamespace) -> None:
    from pipeline.data import DatasetSpec
    from pipeline.finetune.inputs import _part

    result = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0, subset=2, seed=5), real.source, out=real.root / "subset-head")
    part, _ = _part("train", DatasetSpec(root=real.source.data), "train", 2, 5, None)
    assert json.loads(result.path.read_text())["subset"]["paths_sha256"] == paths_digest(part.paths)


# ---------------------------------------------------------------- end to end, through a real backbone


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny real extraction (random-weight MobileNetV2 at 32 px) of train, val (carved) and test, and a head."""
    root = tmp_path_factory.mktemp("real")
    with working_in(root):
        data = make_image_folder(root / "ds", {"train": 10, "test": 3})
        source = ExtractConfig(data=str(data), cache_dir=str(root / "features"), **tiny())
        caches = {s: extract(replace(source, split=s), progress=False).path for s in ("train", "val", "test")}
        head = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), source, out=root / "heads" / "logreg").path
    return SimpleNamespace(root=root, data=data, source=source, caches=caches, head=head)


def _new_images(root: Path) -> Path:
    """Two fresh images per class, in class folders (the folder name is the truth, not read by predict)."""
    return make_image_folder(root, {"batch": 2}, seed=7) / "batch"


def test_end_to_end_extract_fit_evaluate_predict(real: SimpleNamespace) -> None:
    cache_opts = ["--data", real.data, "--weights", "none", "--cache-dir", real.root / "features"]
    out = ok(invoke("fit-head", *cache_opts, "--clf", "logreg", "--grid", "1", "--refine", "0", "-o", "e2e"))
    head = Path("e2e.json")
    # One val image per class, carved from ten: fit-head says so after the head's line.
    assert out.splitlines()[-2].endswith("-> e2e.json") and out.splitlines()[-1].startswith("warning: the val split has fewer than 5")
    meta = json.loads(head.read_text())
    assert meta["train_cache"]["path"] == str(real.caches["train"]) and meta["classes"] == list(CLASSES)

    ok(invoke("evaluate", head, "--test-cache", real.caches["test"]))
    metrics = json.loads(Path("e2e-test.json").read_text())
    assert metrics["n"] == 9 and metrics["top1"] > 1 / 3  # chance; a random-weight backbone at 32 px is no better than fair
    assert Path("e2e-confusion.png").read_bytes()[:4] == b"\x89PNG"

    new = _new_images(Path("new"))
    ok(invoke("predict", new, "--head", head, "-o", "preds.csv"))
    ok(invoke("predict", new, "--head", head, "-o", "preds.json"))
    with open("preds.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = json.loads(Path("preds.json").read_text())
    assert [r["path"] for r in table] == [r["path"] for r in rows] == sorted(str(p) for p in new.rglob("*.png"))
    assert len(rows) == 6
    assert list(table[0]) == ["path", "label", "score", "error", "p_ant", "p_bee", "p_cat"]
    for t, r in zip(table, rows):
        assert t["label"] == r["label"] in CLASSES and not t["error"] and "error" not in r
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-6)
        assert sum(float(t[f"p_{c}"]) for c in CLASSES) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["score"] == pytest.approx(r["probabilities"][r["label"]]) and float(t["score"]) == pytest.approx(r["score"], abs=1e-6)
    right = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert right >= 4, rows  # tinted classes: above chance (2 of 6)

    # Predicting the test images reproduces the head applied to their cached features.
    pred_rows, classes = predict(head, [real.data / "test"])
    art = load_head(head)
    with read_cache(real.caches["test"]) as cache:
        proba = art.pipeline.predict_proba(cache.features())
        paths = [str(real.data / p) for p in cache.paths]
    assert [r["path"] for r in pred_rows] == paths and classes == list(CLASSES)
    got = np.array([[r["probabilities"][c] for c in CLASSES] for r in pred_rows])
    np.testing.assert_allclose(got, proba, atol=1e-5)


def _bad_folder(root: Path) -> Path:
    folder = root / "incoming"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    return folder


def test_predict_bad_image_fails_by_default_naming_the_file(real: SimpleNamespace) -> None:
    folder = _bad_folder(Path("."))
    with pytest.raises(ValueError, match=r"broken.png: .*; fix or remove the file, or pass --on-error skip"):
        predict(real.head, [folder])
    message = error(invoke("predict", folder, "--head", real.head))
    assert message.startswith(f"{folder / 'broken.png'}: ") and message.endswith("; fix or remove the file, or pass --on-error skip")
    assert not Path("predictions.csv").exists()
    (folder / "broken.png").unlink()
    (folder / "notes.txt").write_text("not an image")  # in a folder: ignored, as ImageFolder does
    (folder / ".DS_Store").write_bytes(b"Bud1")
    assert ok(invoke("predict", folder, "--head", real.head)).strip().splitlines()[-1] == "2 images predicted, 0 skipped -> predictions.csv"
    # Named on its own, a file that is not an image is refused, as every one of them is, in one message.
    Path("a.txt").write_text("x")
    message = error(invoke("predict", folder / "notes.txt", "a.txt", "--head", real.head))
    assert message == (f"2 files cannot be read: {folder / 'notes.txt'}: not an image file (extension '.txt'); "
                       "a.txt: not an image file (extension '.txt'); remove or fix them, or pass --on-error skip")


def test_predict_skips_and_lists_bad_images_on_request(real: SimpleNamespace) -> None:
    folder = _bad_folder(Path("."))
    (folder / ".DS_Store").write_bytes(b"Bud1")  # ignored
    Path("notes.txt").write_text("not an image")  # named: refused, and skipped on request
    out = ok(invoke("predict", folder, "notes.txt", "--head", real.head, "--on-error", "skip", "-o", "p.csv"))
    assert out.strip().splitlines()[-1] == "2 images predicted, 2 skipped -> p.csv"
    # The terminal table: a row per file in input order, skipped files with their reason.
    lines = out.strip().splitlines()
    assert lines[0].split() == ["file", "label", "probability", "next"]
    assert [line.split()[0].rsplit("/", 1)[-1] for line in lines[1:-1]] == ["broken.png", "good0.png", "good1.png", "notes.txt"]
    assert "skipped: not an image file (extension '.txt')" in out
    with open("p.csv", newline="") as f:
        table = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert set(table) == {"good0.png", "good1.png", "broken.png", "notes.txt"}
    assert table["broken.png"]["error"] and not table["broken.png"]["label"] and not table["broken.png"]["p_ant"]
    assert table["notes.txt"]["error"] == "not an image file (extension '.txt')"
    assert table["good0.png"]["label"] in CLASSES and not table["good0.png"]["error"]
    rows, classes = predict(real.head, [folder, "notes.txt"], on_error="skip")
    errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.png", "notes.txt"} and all(errors.values())
    assert write_predictions(rows, classes, "p.json") == Path("p.json")
    assert json.loads(Path("p.json").read_text()) == rows
    with pytest.raises(ValueError, match="on_error must be fail or skip, got 'maybe'"):
        predict(real.head, [folder], on_error="maybe")
    assert error(invoke("predict", "nowhere", "--head", real.head)) == "nowhere not found"


def _derived_head(real: SimpleNamespace, clf: str, keep: list[str], classes: list[str], folder: str) -> Path:
    """A head fitted on the real caches' rows of the classes ``keep``, in caches that list ``classes``."""
    for split in ("train", "val"):
        with read_cache(real.caches[split]) as cache:
            attrs = {k: v for k, v in cache.attrs.items() if k not in ("format", "format_version", "complete", "n_rows", "n_skipped")}
            names = [cache.classes[i] for i in cache.labels]
            rows = [i for i, n in enumerate(names) if n in keep]
            X, paths = cache.features()[rows], [cache.paths[i] for i in rows]
            y = np.array([classes.index(names[i]) for i in rows])
        write_features(Path(folder) / f"{split}.h5", X, y, classes, split=split, settings=attrs["settings"], attrs=attrs, paths=paths)
    return fit_head(HeadConfig(clf=clf, grid=small(clf), refine=0, train_cache=f"{folder}/train.h5", val_cache=f"{folder}/val.h5")).path


def _head_on_test_images(real: SimpleNamespace, head: Path, images: list[str]) -> list[str]:
    """What the head says of the cached features of these test images, as class names."""
    art = load_head(head)
    with read_cache(real.caches["test"]) as cache:
        rows = [cache.paths.index(p) for p in images]
        return [art.classes[i] for i in art.pipeline.predict(cache.features()[rows])]


def _cached(real: SimpleNamespace, images: list[str]) -> np.ndarray:
    """The cached test features of these images."""
    with read_cache(real.caches["test"]) as cache:
        return cache.features()[[cache.paths.index(p) for p in images]]


def test_predict_with_a_two_class_svm(real: SimpleNamespace) -> None:
    head = _derived_head(real, "svm", ["ant", "bee"], ["ant", "bee"], "binary")
    images = [f"test/{c}/{i:03d}.png" for c in ("ant", "bee") for i in range(3)]
    expected = _head_on_test_images(real, head, images)
    assert "bee" in expected, "the head should tell the classes apart, or this test shows nothing"
    rows, _ = predict(head, [real.data / "test" / "ant", real.data / "test" / "bee"])
    assert [r["label"] for r in rows] == expected
    # A head without predict_proba: probabilities are the softmax of its decision value d over the temperature
    # fitted on val, softmax([0, d] / T).
    art = load_head(head)
    d, t = art.pipeline.decision_function(_cached(real, images)), art.temperature
    assert t == art.meta["temperature"] != 1
    p_bee = np.array([r["probabilities"]["bee"] for r in rows])
    np.testing.assert_allclose(p_bee, 1 / (1 + np.exp(-d / t)), atol=1e-6)
    assert all(set(r["probabilities"]) == {"ant", "bee"} and r["score"] == max(r["probabilities"].values()) for r in rows)


def test_predict_names_classes_right_when_train_lacks_one(real: SimpleNamespace) -> None:
    try:
        head = _derived_head(real, "logreg", ["bee", "cat"], list(CLASSES), "lacking")
    except ValueError as e:  # refusing the train split clearly is a fix too
        assert "ant" in str(e)
        return
    images = [f"test/{c}/{i:03d}.png" for c in ("bee", "cat") for i in range(3)]
    expected = _head_on_test_images(real, head, images)
    rows, _ = predict(head, [real.data / "test" / "bee", real.data / "test" / "cat"])
    assert [r["label"] for r in rows] == expected
    for r in rows:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-6)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)


# ---------------------------------------------------------------- several taps: joined, flip-averaged, chosen on val


@pytest.fixture(scope="module")
def taps_real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny real extraction with two taps (a spatial map and the pooled features), flip-averaged, and its plain twin."""
    root = tmp_path_factory.mktemp("taps")
    with working_in(root):
        data = make_image_folder(root / "ds", {"train": 12, "val": 6, "test": 3})
        source = ExtractConfig(data=str(data), cache_dir=str(root / "features"), layers=("features.16", "classifier:input"), flip=True, **tiny())
        caches = {s: extract(replace(source, split=s), progress=False).path for s in ("train", "val", "test")}
        plain = extract(replace(source, split="test", flip=False), progress=False).path
        config = HeadConfig(clf="logreg", grid=(0.1, 10.0), refine=0, seed=0)
        auto = fit_head(replace(config, tap="auto"), source, out=root / "heads" / "auto")
        each = {t: fit_head(replace(config, tap=t), source, out=root / "heads" / t.replace(":", "-").replace("+", "_"))
                for t in ("features.16:output", "classifier:input", "features.16:output+classifier:input")}
    return SimpleNamespace(root=root, data=data, source=source, caches=caches, plain=plain, auto=auto, each=each)


def test_auto_tap_keeps_the_best_on_val_of_each_tap_and_all_joined(taps_real: SimpleNamespace) -> None:
    auto, each = taps_real.auto, taps_real.each
    # Each candidate is fitted as an explicit --tap would be: the same sweep, the same val accuracy.
    assert [t["tap"] for t in auto.taps] == list(each)
    assert [t["val_accuracy"] for t in auto.taps] == [each[t].val_accuracy for t in each]
    assert [t["value"] for t in auto.taps] == [each[t].value for t in each]
    best = max(auto.taps, key=lambda t: t["val_accuracy"])  # the first of equals, as fit_head keeps
    meta = json.loads(auto.path.read_text())
    assert auto.tap == meta["tap"] == best["tap"] and auto.val_accuracy == best["val_accuracy"] and meta["taps_tried"] == auto.taps
    with read_cache(taps_real.caches["test"]) as cache:
        X = cache.features(auto.tap)
    np.testing.assert_allclose(load_head(auto.path).pipeline.predict_proba(X), load_head(each[auto.tap].path).pipeline.predict_proba(X), atol=1e-6)
    assert fit_head(replace(HeadConfig(clf="logreg", grid=(0.1, 10.0), refine=0, seed=0), tap="auto"), taps_real.source,
                    out=taps_real.root / "heads" / "auto").status == "up-to-date"


def test_a_flip_cache_sits_beside_the_plain_one_and_plain_heads_refuse_it(taps_real: SimpleNamespace) -> None:
    test = taps_real.caches["test"]
    assert test.parent.name == "features.16-output+classifier-input.flip" and taps_real.plain.parent.name == "features.16-output+classifier-input"
    with read_cache(test) as flipped, read_cache(taps_real.plain) as plain:
        assert flipped.attrs["settings"]["flip"] is True and "flip" not in plain.attrs["settings"]
        assert not np.allclose(flipped.features("features.16:output"), plain.features("features.16:output"))
    with pytest.raises(ValueError, match="flip: head True, features None"):
        evaluate(taps_real.each["classifier:input"].path, taps_real.plain)


def test_predict_with_a_joined_flip_head_is_the_head_on_the_cached_features(taps_real: SimpleNamespace) -> None:
    head = taps_real.each["features.16:output+classifier:input"].path
    rows, classes = predict(head, [taps_real.data / "test"])
    art = load_head(head)
    with read_cache(taps_real.caches["test"]) as cache:
        X, paths = cache.features("features.16:output+classifier:input"), [str(taps_real.data / p) for p in cache.paths]
    assert X.shape[1] == 160 + 1280 and [r["path"] for r in rows] == paths
    got = np.array([[r["probabilities"][c] for c in classes] for r in rows])
    np.testing.assert_allclose(got, head_probabilities(art.pipeline, X, art.temperature), atol=1e-5)


def test_unknown_or_repeated_parts_of_a_joined_tap_are_refused(taps_real: SimpleNamespace) -> None:
    with read_cache(taps_real.caches["val"]) as cache:
        with pytest.raises(ValueError, match="no tap 'features.15:output'; it holds features.16:output, classifier:input"):
            cache.features("features.15:output+classifier:input")
        with pytest.raises(ValueError, match="a repeated tap"):
            cache.features("classifier:input+classifier:input")


def test_the_onnx_engine_and_an_exported_model_flip_and_join_as_eager_torch_does(taps_real: SimpleNamespace, tmp_path: Path) -> None:
    from pipeline.export import export
    from pipeline.onnx_model import predict_onnx

    onnx_source = replace(taps_real.source, split="test", engine="onnx", cache_dir=str(tmp_path / "features"))
    result = extract(onnx_source, progress=False)
    assert result.engine.startswith("onnx")
    with read_cache(result.path) as got, read_cache(taps_real.caches["test"]) as eager:
        for tap in eager.taps:
            np.testing.assert_allclose(got.features(tap), eager.features(tap), atol=1e-4)
    head = taps_real.each["features.16:output+classifier:input"].path
    expected, classes = predict(head, [taps_real.data / "test"])
    rows, onnx_classes = predict_onnx(export(head, tmp_path / "joined.onnx"), [taps_real.data / "test"])
    assert onnx_classes == classes and [r["path"] for r in rows] == [r["path"] for r in expected]
    p = lambda rows: np.array([[r["probabilities"][c] for c in classes] for r in rows])  # noqa: E731
    np.testing.assert_allclose(p(rows), p(expected), atol=1e-4)


def test_compare_names_each_heads_tap_and_what_auto_tried(taps_real: SimpleNamespace) -> None:
    out = ok(invoke("compare", taps_real.root / "heads"))
    auto = taps_real.auto
    assert f"on {auto.tap}" in out and "on features.16:output+classifier:input" in out
    for t in auto.taps:
        assert f"tap {t['tap']}: val acc {t['val_accuracy']:.4f}{'  <- chosen' if t['tap'] == auto.tap else ''}\n" in out


def test_auto_and_joined_taps_refuse_what_they_cannot_do_and_info_shows_flip(taps_real: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.fit
    from pipeline.cache import describe

    base = HeadConfig(clf="logreg", grid=(1.0,), refine=0)
    with pytest.raises(ValueError, match=r"^joined taps are averaged over space; --pool max applies to one tap: name it with --tap$"):
        fit_head(replace(base, tap="auto", pool="max"), taps_real.source, out=taps_real.root / "refused")
    monkeypatch.setattr(pipeline.fit, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"^--tap auto loads .* of train features for its 3 candidates, more than the 1000 bytes of memory available"):
        fit_head(replace(base, tap="auto"), taps_real.source, out=taps_real.root / "refused")
    assert not list(taps_real.root.glob("refused*"))  # a refused fit leaves nothing behind
    assert "  features   each image averaged with its mirror (flip)" in describe(taps_real.caches["test"]).splitlines()
