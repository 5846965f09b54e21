"""Heads fitted from caches larger than memory: bounded reads, and the same result as in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import read_cache
from pipeline.cache import write_features
from pipeline.fit import HeadConfig, fit_head
from pipeline.heads import SpatialPool
from pipeline.stream import fit_streaming, minibatches, streaming_scaler

SETTINGS = {"model": "synthetic", "weights": "none", "weights_sha256": None, "taps": ["features:output"], "preprocess": {}, "amp": False}


def _blobs(n: int, seed: int, d: int = 24, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(0).normal(scale=1.5, size=(k, d))
    rng = np.random.default_rng(seed)
    y = np.sort(rng.integers(0, k, n))  # sorted by class, as real caches are
    return (np.maximum(centres[y] + rng.normal(size=(n, d)), 0) * 3 + 1).astype(np.float32), y


@pytest.fixture
def caches(tmp_path: Path) -> tuple[str, str]:
    classes = ["a", "b", "c", "d"]
    train = write_features(tmp_path / "train.h5", *_blobs(3000, 1), classes, SETTINGS, block_rows=500)
    val = write_features(tmp_path / "val.h5", *_blobs(400, 2), classes, SETTINGS)
    return str(train), str(val)


class _CountingSource:
    """A row-sliceable stand-in for an h5py dataset that records how many rows each read asks for."""

    def __init__(self, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        self.data, self.chunks, self.reads = data, chunks, []
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, s: slice) -> np.ndarray:
        self.reads.append(s.stop - s.start)
        return self.data[s]


def test_minibatches_read_small_pieces_and_hold_one_buffer() -> None:
    X, y = _blobs(1000, 3)
    source = _CountingSource(X, (50, 24))
    seen = []
    for xb, yb in minibatches(source, y, np.random.default_rng(0), block_rows=200, batch_size=64, transform=lambda a: a):
        seen.append(yb)
    assert max(source.reads) <= 200 // 64 and sum(source.reads) == 1000  # small reads, each row read once per epoch
    # Every row is served exactly once per epoch, in an order that mixes the (sorted) classes.
    assert np.array_equal(np.sort(np.concatenate(seen)), np.sort(y))
    first = np.concatenate(seen)[:200]
    assert len(np.unique(first)) > 1


def test_streaming_from_hdf5_equals_streaming_from_memory(caches: tuple[str, str]) -> None:
    with read_cache(caches[0]) as train, read_cache(caches[1]) as val:
        ds, y, X, Xv, yv = train.dataset(), train.labels, train.features(), val.features(), val.labels
        pool = SpatialPool().fit(X[:1])
        scaler_disk, scaler_mem = streaming_scaler(ds, 400, pool), streaming_scaler(X, 400, pool)
        np.testing.assert_array_equal(scaler_disk.mean_, scaler_mem.mean_)
        transform = lambda a: scaler_mem.transform(a).astype(np.float32)  # noqa: E731
        evals = (transform(Xv), yv)
        for clf in ("linear", "logreg"):
            disk = fit_streaming(clf, 1e-3 if clf == "linear" else 1.0, ds, y, np.arange(4), evals, transform, block_rows=400, epochs=2)
            mem = fit_streaming(clf, 1e-3 if clf == "linear" else 1.0, X, y, np.arange(4), evals, transform, block_rows=400, epochs=2)
            np.testing.assert_array_equal(disk.coef_, mem.coef_)


@pytest.mark.parametrize("clf", ["linear", "logreg", "svm"])
def test_streamed_fit_matches_in_memory_fit(caches: tuple[str, str], tmp_path: Path, clf: str) -> None:
    grid = (1e-3,) if clf == "linear" else (1.0,)
    common = dict(clf=clf, train_cache=caches[0], val_cache=caches[1], grid=grid, refine=0, epochs=5)
    mem = fit_head(HeadConfig(**common, stream=False), out=tmp_path / f"{clf}-mem")
    streamed = fit_head(HeadConfig(**common, stream=True, block_mb=1), out=tmp_path / f"{clf}-stream")
    assert mem.val_accuracy > 0.8
    assert abs(streamed.val_accuracy - mem.val_accuracy) <= 0.03
    meta = json.loads(streamed.path.read_text())
    assert meta["streamed"] is True and json.loads(mem.path.read_text())["streamed"] is False


def test_streaming_is_chosen_above_the_memory_budget(caches: tuple[str, str], tmp_path: Path) -> None:
    result = fit_head(HeadConfig(clf="linear", train_cache=caches[0], val_cache=caches[1], grid=(1e-3,), refine=0, epochs=2, memory_budget_mb=0), out=tmp_path / "auto")
    assert json.loads(result.path.read_text())["streamed"] is True


def test_streaming_refuses_what_it_cannot_do(caches: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="tree cannot stream a cache this large; use one of linear, logreg, svm or raise --memory-budget-mb"):
        fit_head(HeadConfig(clf="tree", train_cache=caches[0], val_cache=caches[1], stream=True))
    with pytest.raises(ValueError, match="streaming supports --preprocessing standardize or none, not pca"):
        fit_head(HeadConfig(clf="linear", preprocessing="pca", train_cache=caches[0], val_cache=caches[1], stream=True))


def test_streaming_refuses_non_finite_features(tmp_path: Path) -> None:
    X, y = _blobs(600, 4)
    X[123, 5] = np.inf
    train = write_features(tmp_path / "train.h5", X, y, list("abcd"), SETTINGS)
    val = write_features(tmp_path / "val.h5", *_blobs(100, 5), list("abcd"), SETTINGS)
    with pytest.raises(ValueError, match=r"train.h5 has NaN or inf features \(first at row 123\)"):
        fit_head(HeadConfig(clf="linear", train_cache=str(train), val_cache=str(val), stream=True))
