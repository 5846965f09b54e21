"""Duplicates and outliers among cached features: content hashes, and a blocked cosine search that never holds all similarities.

The search compares centred, L2-normalised features (optionally projected by PCA) two blocks of rows at a time.
The projected rows are written to a memory-mapped file first, so a cache larger than memory is searched with the
memory of a few blocks. One pass yields both the pairs above the similarity threshold and each row's k nearest
neighbours, whose mean similarity gives the outlier score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import h5py
import numpy as np

from .heads import SpatialPool

if TYPE_CHECKING:
    import torch

__all__ = ["content_hashes", "exact_pairs", "project", "search", "Neighbours", "outlier_scores"]

# Rows of the sample that fixes the centre and the PCA basis: enough for 256 components, cheap on any cache.
_SAMPLE_ROWS = 20_000


def content_hashes(root: str | os.PathLike | None, paths: Sequence[str], progress: bool = False) -> list[str | None]:
    """The sha256 of each image file, ``root/path``; None for a file that cannot be read (or no ``root``)."""
    from tqdm.auto import tqdm

    from .files import file_sha256

    out: list[str | None] = []
    for p in tqdm(paths, desc="hashing images", unit="file", disable=not progress, leave=False):
        try:
            out.append(None if root is None else file_sha256(Path(root) / p))
        except OSError:
            out.append(None)
    return out


def exact_pairs(hashes: Sequence[str | None]) -> list[tuple[int, int]]:
    """Every pair of rows (a < b) whose files have the same content."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            groups.setdefault(h, []).append(i)
    return [(a, b) for rows in groups.values() for i, a in enumerate(rows) for b in rows[i + 1:]]


def _blocks(datasets: Sequence[h5py.Dataset], pool: str, block_rows: int) -> Iterator[np.ndarray]:
    """The pooled N x D float32 rows of several datasets, one after the other, in blocks."""
    for d in datasets:
        pooler = SpatialPool(pool).fit(d[:1]) if len(d) else None
        for start in range(0, len(d), block_rows):
            yield pooler.transform(d[start:start + block_rows]).astype(np.float32, copy=False)


def project(datasets: Sequence[h5py.Dataset], out: str | os.PathLike, *, pool: str = "avg", dims: int = 256, seed: int = 0,
            block_rows: int = 4096) -> np.memmap:
    """Centre, project and L2-normalise the rows of ``datasets`` (in order) into a memory-mapped ``.npy`` at ``out``.

    The centre and the PCA basis come from a sample of at most 20,000 rows drawn from every dataset. Centring matters:
    backbone features after a ReLU all lie in one orthant, where every pair of images looks alike to cosine.

    Args:
        datasets: N_i x ... feature datasets (HDF5, read block by block).
        out: the ``.npy`` file to write.
        pool: pooling of spatial features.
        dims: PCA components; 0 (or at least the feature width) keeps every dimension.
        seed: seed of the sample and of the randomised PCA.
        block_rows: rows read at once.

    Returns:
        The N x d float32 rows, unit length (a row equal to the centre stays zero).
    """
    n = sum(len(d) for d in datasets)
    if n == 0:
        raise ValueError("no rows to compare")
    rng = np.random.default_rng(seed)
    keep = min(1.0, _SAMPLE_ROWS / n)
    sample = np.concatenate([b[rng.random(len(b)) < keep] if keep < 1 else b for b in _blocks(datasets, pool, block_rows)])
    if len(sample) == 0:  # a tiny cache and an unlucky draw
        sample = next(_blocks(datasets, pool, block_rows))
    centre = sample.mean(axis=0)
    basis = None
    if 0 < dims < min(sample.shape):
        from sklearn.decomposition import PCA

        basis = PCA(dims, svd_solver="randomized", random_state=seed).fit(sample - centre).components_.T.astype(np.float32)
    width = basis.shape[1] if basis is not None else sample.shape[1]
    Z = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, width))
    pos = 0
    for block in _blocks(datasets, pool, block_rows):
        z = block - centre
        if basis is not None:
            z = z @ basis
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        Z[pos:pos + len(z)] = z
        pos += len(z)
    Z.flush()
    return Z


@dataclass
class Neighbours:
    """What one pass of the search finds.

    Attributes:
        a, b: row pairs (a < b) whose similarity is at or above the threshold, most similar first.
        similarity: their cosine similarity.
        knn: each row's similarities to its k nearest other rows, most similar first (N x k).
        truncated: whether more pairs passed the threshold than were kept.
    """

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    knn: np.ndarray
    truncated: bool = False


def search(Z: np.ndarray, threshold: float, k: int = 10, *, block_rows: int = 4096, max_pairs: int = 2_000_000,
           log: Callable[[str], None] | None = None, progress: bool = False) -> Neighbours:
    """Every pair of rows of ``Z`` (unit vectors) with cosine similarity at or above ``threshold``, and each row's k
    nearest neighbours, comparing two blocks of rows at a time (each block pair once: the similarity is symmetric).

    Args:
        Z: N x d unit rows (an array or a memory map).
        threshold: the similarity of a pair.
        k: neighbours per row, for the outlier score.
        block_rows: rows per block; memory is about ``block_rows**2 * 8`` bytes.
        max_pairs: at most this many pairs are kept, the most similar ones (``truncated`` says so).
        log: called once with the number of block pairs.
        progress: show a progress bar.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(Z)
    k = max(0, min(k, n - 1))
    top = torch.full((n, k), -float("inf"))
    bounds = [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
    read = lambda s, e: torch.from_numpy(np.array(Z[s:e], dtype=np.float32))  # noqa: E731 (a copy: memory maps are read-only)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    kept, truncated = 0, False
    if log:
        log(f"  comparing {n:,} images in {len(bounds) * (len(bounds) + 1) // 2} block pairs of up to {block_rows:,} rows")
    bar = tqdm(total=len(bounds) * (len(bounds) + 1) // 2, desc="duplicate search", unit="block", disable=not progress, leave=False)
    with torch.inference_mode():
        for bi, (i0, i1) in enumerate(bounds):
            A = read(i0, i1)
            for j0, j1 in bounds[bi:]:
                B = A if j0 == i0 else read(j0, j1)
                S = A @ B.T
                if j0 == i0:
                    S.fill_diagonal_(-float("inf"))  # a row is neither its own duplicate nor its own neighbour
                hit = (S >= threshold).nonzero()
                if j0 == i0:
                    hit = hit[hit[:, 0] < hit[:, 1]]
                if len(hit):
                    found.append((hit[:, 0] + i0, hit[:, 1] + j0, S[hit[:, 0], hit[:, 1]]))
                    kept += len(hit)
                    if kept > 2 * max_pairs:
                        found, truncated = [_most_similar(found, max_pairs)], True
                        kept = max_pairs
                if k:
                    top[i0:i1] = _merge(top[i0:i1], S, k)
                    if j0 != i0:  # a contiguous copy: top-k across rows of S took twice as long (0.22 s against 0.10)
                        top[j0:j1] = _merge(top[j0:j1], S.T.contiguous(), k)
                bar.update()
    bar.close()
    a, b, sim = _most_similar(found, max_pairs) if found else (torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(0),)
    truncated = truncated or kept > max_pairs
    return Neighbours(a.numpy(), b.numpy(), sim.numpy(), top.numpy(), truncated)


def _merge(top: "torch.Tensor", S: "torch.Tensor", k: int) -> "torch.Tensor":
    """The k largest of each row of ``top`` and ``S`` together."""
    import torch

    return torch.cat([top, S.topk(min(k, S.shape[1]), dim=1).values], dim=1).topk(k, dim=1).values


def _most_similar(found: list, limit: int) -> tuple:
    """The found pairs concatenated, most similar first, at most ``limit`` of them."""
    import torch

    a, b, sim = (torch.cat(parts) for parts in zip(*found))
    order = torch.argsort(sim, descending=True, stable=True)[:limit]
    return a[order], b[order], sim[order]


def outlier_scores(knn: np.ndarray) -> np.ndarray:
    """One minus the mean cosine similarity to the k nearest neighbours: 0 for an image with copies, up to 2."""
    if knn.shape[1] == 0:
        return np.zeros(len(knn), dtype=np.float32)
    return (1.0 - knn.mean(axis=1)).astype(np.float32)
