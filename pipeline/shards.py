"""The way to a cache: one crash-safe shard per finished batch, so that a re-run computes only what is missing, and the
final HDF5 file assembled from them atomically (``cache`` reads it)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np

from .config import COMPRESSIONS
from .files import atomic_target, atomic_write, disk_full, file_lock, reserve, temp_target
from .layout import FEATURES_FORMAT as FORMAT
from .layout import FEATURES_FORMAT_VERSION as FORMAT_VERSION
from .layout import partial_dir
from .provenance import now

__all__ = ["PartialRun", "RESUME_HINT", "IncompleteCacheError", "write_cache", "write_features"]

_CHUNK_BYTES = 1 << 20

_SHARD = re.compile(r"^rows-(\d{9})-(\d{9})\.npz$")
RESUME_HINT = "; the batches already saved are kept, so the re-run resumes after them"


class PartialRun:
    """An unfinished extraction: ``<cache>.partial/`` holds ``settings.json`` and one shard per finished batch.

    Each shard (``rows-START-STOP.npz``) covers dataset positions [START, STOP): the features of the images
    read, their positions, and the positions skipped with reasons. A shard is written to a temporary name and
    renamed, so after a crash (Ctrl-C, ``kill -9``) every shard on disk is whole and a re-run computes only the
    positions that no shard covers (:meth:`missing`). The ranks of a distributed run share the folder, each
    writing the shards of its own range.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.dir = partial_dir(self.final)

    def exists(self) -> bool:
        return (self.dir / "settings.json").is_file()

    def settings(self) -> dict | None:
        try:
            return json.loads((self.dir / "settings.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def start(self, settings: dict) -> None:
        """Create the folder and record the settings, replacing any earlier partial run."""
        self.remove()
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.dir / "settings.json", json.dumps(settings, indent=1, sort_keys=True).encode())

    def shards(self) -> list[tuple[int, int, Path]]:
        found = []
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            m = _SHARD.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(found)

    def done_until(self) -> int:
        """The end of the contiguous run of finished shards from position 0 (changes nothing on disk)."""
        end = 0
        for start, stop, _ in self.shards():
            if start > end:
                break
            end = max(end, stop)
        return end

    def rows_done(self) -> int:
        """How many positions finished shards cover, wherever they are (several ranks fill separate ranges)."""
        return sum(b - a for a, b in _union((a, b) for a, b, _ in self.shards()))

    def missing(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The gaps in ``[start, stop)`` that no finished shard covers, in order.

        Positions outside the range are left alone, shards and stray temporary files alike: in a distributed
        run each rank asks about its own range only, while the other ranks are still writing theirs. Shards
        written by a run with another number of ranks count too, so a re-run redoes only what is missing.
        Temporary files of unfinished shards inside the range are removed.
        """
        for tmp in self.dir.glob(".rows-*.tmp") if self.dir.is_dir() else ():
            target = temp_target(tmp)
            m = _SHARD.match(target[0].name) if target else None
            if m and start <= int(m.group(1)) and int(m.group(2)) <= stop:
                tmp.unlink(missing_ok=True)
        gaps, pos = [], start
        for a, b, _ in self.shards():
            if b <= pos or a >= stop:
                continue
            if a > pos:
                gaps.append((pos, a))
            pos = max(pos, b)
        if pos < stop:
            gaps.append((pos, stop))
        return gaps

    def write(self, start: int, stop: int, features: Sequence[np.ndarray], index: np.ndarray, skipped: Sequence[tuple[int, str]]) -> None:
        """Record one finished batch covering positions [start, stop)."""
        arrays = {f"f{i}": f for i, f in enumerate(features)}
        arrays["index"] = np.asarray(index, dtype=np.int64)
        arrays["skipped_index"] = np.asarray([i for i, _ in skipped], dtype=np.int64)
        arrays["skipped_reason"] = np.asarray([r for _, r in skipped], dtype=np.str_)
        atomic_write(self.dir / f"rows-{start:09d}-{stop:09d}.npz", lambda f: np.savez(f, **arrays), hint=RESUME_HINT)

    def read(self) -> Iterator[dict[str, np.ndarray]]:
        for _, _, path in self.shards():
            with np.load(path, allow_pickle=False) as z:
                yield {k: z[k] for k in z.files}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


class IncompleteCacheError(ValueError):
    """A cache whose extraction has not finished; readers refuse it."""


# ---------------------------------------------------------------- the final file


def _json_attrs(attrs: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True) for k, v in attrs.items()}


def write_cache(
    partial: PartialRun,
    *,
    tap_names: Sequence[str],
    paths: Sequence[str],
    labels: np.ndarray,
    classes: Sequence[str],
    rejected: Sequence[tuple[str, str]],
    attrs: dict,
    compression: str = "none",
) -> Path:
    """Assemble a partial run's shards into the final HDF5 file, atomically, then delete the shards.

    The file is built under a temporary name with ``complete`` false, marked complete last, and renamed into
    place: a reader never sees a half-written cache at the final path.

    Args:
        partial: the finished partial run.
        tap_names: the taps' names, in shard order, used as dataset names under ``features/``.
        paths: image paths of the split, by dataset position.
        labels: labels of the split, by dataset position.
        classes: class names.
        rejected: files refused before decoding, as (path, reason).
        attrs: settings and provenance, stored as attributes (dicts and lists as JSON).
        compression: ``none``, ``gzip`` or ``lzf``.

    Returns:
        The final path.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    gaps = partial.missing(0, len(paths))
    if gaps:
        a, b = gaps[0]
        raise ValueError(
            f"{partial.dir} lacks {sum(b - a for a, b in gaps)} of {len(paths)} rows (first gap: positions {a}-{b - 1}); "
            "re-run the extraction to compute them (in a multi-node run, the cache folder must be shared by all nodes)"
        )
    ends = [(a, b) for a, b, _ in partial.shards()]
    if any(a != b_prev for (_, b_prev), (a, _) in zip(ends, ends[1:])):
        raise ValueError(f"{partial.dir} holds overlapping shards; remove it and extract again")
    n_taps = len(tap_names)
    index_parts, skipped_idx, skipped_why, shapes, dtypes = [], [], [], None, None
    for shard in partial.read():
        index_parts.append(shard["index"])
        skipped_idx.extend(shard["skipped_index"].tolist())
        skipped_why.extend(shard["skipped_reason"].tolist())
        if shapes is None and len(shard["index"]):
            shapes = [shard[f"f{i}"].shape[1:] for i in range(n_taps)]
            dtypes = [shard[f"f{i}"].dtype for i in range(n_taps)]
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    if shapes is None:
        raise ValueError(f"no image of the split could be read; nothing to write to {partial.final}")
    rows = len(index)
    final = partial.final
    chunks = [max(1, min(rows, _CHUNK_BYTES // max(1, int(np.prod(s)) * np.dtype(d).itemsize))) for s, d in zip(shapes, dtypes)]
    skipped = list(rejected) + [(paths[i], why) for i, why in zip(skipped_idx, skipped_why)]
    need = _size_bound(rows, shapes, dtypes, chunks, [paths[i] for i in index], list(classes), skipped, compressed=compression != "none")
    hint = f"; the final file needs about {need / 2**20:.1f} MiB{RESUME_HINT}"
    # HDF5 can crash the process (not raise) when the disk fills while it writes, so the room is checked first,
    # then reserved for the file (see below).
    if shutil.disk_usage(final.parent).free < need:
        raise disk_full(final, hint)
    filters = {"none": {}, "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True}, "lzf": {"compression": "lzf", "shuffle": True}}[compression]
    text = h5py.string_dtype()
    # A half-built file is never renamed into place; it is removed so that it does not hold the disk.
    with atomic_target(final, hint=hint) as tmp:
        with h5py.File(tmp, "w") as f:
            # Every byte HDF5 will write is allocated now: should the disk fill up meanwhile, this raises ENOSPC
            # here, before any data, and no later write of HDF5's can fail.
            reserved = reserve(tmp, need)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["complete"] = False
            dsets = []
            for name, shape, dtype, chunk_rows in zip(tap_names, shapes, dtypes, chunks):
                dsets.append(f.create_dataset(f"features/{name}", shape=(rows, *shape), dtype=dtype, chunks=(chunk_rows, *shape), fletcher32=True, **filters))
            r = 0
            for shard in partial.read():
                k = len(shard["index"])
                for i, d in enumerate(dsets if k else ()):
                    d[r : r + k] = shard[f"f{i}"]
                r += k
            f.create_dataset("index", data=index)
            f.create_dataset("labels", data=np.asarray(labels)[index].astype(np.int64), fletcher32=True)
            f.create_dataset("paths", data=np.asarray([paths[i] for i in index], dtype=object), dtype=text)
            f.create_dataset("classes", data=np.asarray(list(classes), dtype=object), dtype=text)
            f.create_dataset("skipped/paths", data=np.asarray([p for p, _ in skipped], dtype=object), dtype=text)
            f.create_dataset("skipped/reasons", data=np.asarray([w for _, w in skipped], dtype=object), dtype=text)
            for k, v in _json_attrs({**attrs, "n_rows": rows, "n_skipped": len(skipped)}).items():
                f.attrs[k] = v
            f.attrs["complete"] = True
        if reserved:
            # What HDF5 did not use of the room is given back: opened for writing, it cuts the file to its own
            # end of data when it closes.
            h5py.File(tmp, "r+").close()
    partial.remove()
    return final


def _size_bound(rows: int, shapes: Sequence[tuple], dtypes: Sequence[np.dtype], chunks: Sequence[int], paths: Sequence[str],
                classes: Sequence[str], skipped: Sequence[tuple[str, str]], *, compressed: bool) -> int:
    """An upper bound on the size of the HDF5 file :func:`write_cache` writes, in bytes.

    Features take whole chunks (the last one too, even when partly filled); compression can grow a chunk of
    incompressible data by a few percent. A string takes its bytes plus its global-heap entry and its reference.
    A margin covers object headers, chunk indexes and the heap's own bookkeeping.
    """
    total = 0
    for shape, dtype, chunk_rows in zip(shapes, dtypes, chunks):
        chunk = chunk_rows * int(np.prod(shape)) * np.dtype(dtype).itemsize
        n_chunks = -(-rows // chunk_rows)
        total += n_chunks * (int(chunk * 1.05) + 64 if compressed else chunk) + n_chunks * 64
    strings = [*paths, *classes, *(p for p, _ in skipped), *(w for _, w in skipped)]
    total += 16 * rows + sum(len(t.encode()) + 64 for t in strings)
    return int(total * 1.05) + 2**20


def write_features(
    path: str | os.PathLike,
    features: np.ndarray | Iterable[np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    settings: dict,
    *,
    tap: str = "features:output",
    paths: Sequence[str] | None = None,
    compression: str = "none",
    block_rows: int = 8192,
) -> Path:
    """Write features computed elsewhere as a complete cache, so that heads can be fitted on them.

    Args:
        path: the ``.h5`` file to write.
        features: an N x ... array, or an iterable of row blocks (for data larger than memory).
        labels: N class indices into ``classes``.
        classes: class names.
        settings: what made the features (``model``, ``weights``, ``taps``, ``preprocess``...); heads compare it.
        tap: the dataset name of the features.
        paths: an id per row; defaults to ``row<i>``.
        compression: ``none``, ``gzip`` or ``lzf``.
        block_rows: rows per shard when ``features`` is an array.
    """
    labels = np.asarray(labels, dtype=np.int64)
    blocks = (features[a : a + block_rows] for a in range(0, len(features), block_rows)) if isinstance(features, np.ndarray) else features
    partial = PartialRun(Path(path))
    partial.final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(partial.final):
        partial.start(settings)
        pos = 0
        for block in blocks:
            block = np.asarray(block)
            partial.write(pos, pos + len(block), [block], np.arange(pos, pos + len(block)), [])
            pos += len(block)
        if pos != len(labels):
            partial.remove()
            raise ValueError(f"{pos} feature rows for {len(labels)} labels")
        # A creation time, as extract stamps: it is part of the cache's identity, so a rewritten cache is never taken for the old one.
        attrs = {"settings": settings, "taps": [tap], "created": now(), **{k: v for k, v in settings.items() if k not in ("taps",)}}
        return write_cache(partial, tap_names=[tap], paths=list(paths) if paths is not None else [f"row{i}" for i in range(pos)],
                           labels=labels, classes=classes, rejected=[], attrs=attrs, compression=compression)
