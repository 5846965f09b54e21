"""Streaming: fit heads from feature caches larger than memory, reading HDF5 in bounded blocks."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler

from .heads import HEADS, SpatialPool

__all__ = ["STREAMING_HEADS", "block_rows_for", "minibatches", "streaming_scaler", "fit_streaming"]

# Heads that can learn from minibatches: the torch linear layer, and SGD forms of logreg and the linear SVM.
STREAMING_HEADS = ("linear", "logreg", "svm")
_SGD_LOSS = {"logreg": "log_loss", "svm": "hinge"}
_PIECES_PER_BUFFER = 64


def block_rows_for(source: Any, block_bytes: int) -> int:
    """Rows per read so that one block of ``source`` (N x ...) takes about ``block_bytes``, in whole HDF5 chunks."""
    row_bytes = int(np.prod(source.shape[1:])) * np.dtype(source.dtype).itemsize
    rows = max(1, block_bytes // max(1, row_bytes))
    chunk = getattr(source, "chunks", None)
    if chunk:
        rows = max(chunk[0], rows // chunk[0] * chunk[0])
    return int(min(rows, source.shape[0]))


def _blocks(n: int, block_rows: int, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    starts = list(range(0, n, block_rows))
    if rng is not None:
        starts = [starts[i] for i in rng.permutation(len(starts))]
    return [(s, min(s + block_rows, n)) for s in starts]


def minibatches(
    source: Any, labels: np.ndarray, rng: np.random.Generator, *, block_rows: int, batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled minibatches from a shuffle buffer of about ``block_rows`` rows.

    Caches are sorted by class, so a contiguous block holds one class or two: the buffer is filled with 64
    small pieces drawn in random order from the whole dataset, then its rows are shuffled. ``source`` is
    anything sliceable by rows (an ``h5py.Dataset`` or a numpy array): the same code, and so the same batches,
    whether the features are on disk or in memory. Memory holds one buffer at a time.
    """
    piece = max(1, block_rows // _PIECES_PER_BUFFER)
    pieces = _blocks(len(labels), piece, rng)
    per_buffer = max(1, block_rows // piece)
    for i in range(0, len(pieces), per_buffer):
        group = pieces[i : i + per_buffer]
        X = np.concatenate([np.asarray(source[a:b], dtype=np.float32) for a, b in group])
        # Without standardization nothing else reads every row first; a NaN would silently poison the weights.
        if not np.isfinite(X).all():
            row = next(a + int(np.argmax(~np.isfinite(source[a:b]).reshape(b - a, -1).all(axis=1))) for a, b in group
                       if not np.isfinite(source[a:b]).all())
            raise ValueError(f"NaN or inf features in the streamed cache (first at row {row})")
        X = transform(X)
        y = np.concatenate([labels[a:b] for a, b in group])
        order = rng.permutation(len(y))
        for j in range(0, len(y), batch_size):
            sel = order[j : j + batch_size]
            yield X[sel], y[sel]


def streaming_scaler(source: Any, block_rows: int, pool: SpatialPool, path: str = "the cache") -> StandardScaler:
    """A StandardScaler fitted from block sums in float64, checking for NaN/inf on the way.

    Raises:
        ValueError: non-finite features.
    """
    n, total, total_sq = 0, None, None
    for a, b in _blocks(source.shape[0], block_rows, None):
        X = pool.transform(np.asarray(source[a:b], dtype=np.float32)).astype(np.float64)
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise ValueError(f"{path} has NaN or inf features (first at row {a + int(np.argmax(bad))})")
        total = X.sum(axis=0) if total is None else total + X.sum(axis=0)
        total_sq = (X**2).sum(axis=0) if total_sq is None else total_sq + (X**2).sum(axis=0)
        n += len(X)
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    scaler = StandardScaler()
    scaler.mean_, scaler.var_ = mean, var
    scaler.scale_ = np.where(var > 0, np.sqrt(var), 1.0)
    scaler.n_features_in_, scaler.n_samples_seen_ = len(mean), n
    return scaler


def fit_streaming(
    clf_name: str, value: float, source: Any, labels: np.ndarray, classes: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray],
    transform: Callable[[np.ndarray], np.ndarray], *, seed: int = 0, block_rows: int, epochs: int = 10, batch_size: int = 256,
) -> Any:
    """Fit one streaming head for one value of its hyper-parameter.

    Args:
        clf_name: ``linear`` (value: its swept hyper-parameter, as in memory), ``logreg`` or ``svm`` (value: C, mapped to
            SGD's alpha = 1 / (C n)).
        value: the swept hyper-parameter.
        source: N x ... features, sliceable by rows.
        labels: N labels, in memory.
        classes: every class.
        eval_set: preprocessed (X_val, y_val) in memory, for the linear head's best epoch.
        transform: pooling and scaling applied to each block.
        seed: random state.
        block_rows: rows read at once.
        epochs: passes over the data.
        batch_size: minibatch size.
    """
    if clf_name == "linear":
        head = HEADS["linear"].make(value, seed).set_params(epochs=epochs, batch_size=batch_size)
        n_features = eval_set[0].shape[1]
        return head.fit_stream(
            lambda rng: minibatches(source, labels, rng, block_rows=block_rows, batch_size=batch_size, transform=transform),
            n_features, classes, eval_set=eval_set,
        )
    if clf_name not in _SGD_LOSS:
        raise ValueError(f"{clf_name} cannot stream; streaming heads are {', '.join(STREAMING_HEADS)}")
    clf = SGDClassifier(loss=_SGD_LOSS[clf_name], alpha=1.0 / (value * len(labels)), random_state=seed, learning_rate="optimal")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for xb, yb in minibatches(source, labels, rng, block_rows=block_rows, batch_size=max(batch_size, 1024), transform=transform):
            clf.partial_fit(xb, yb, classes=classes)
    return clf
