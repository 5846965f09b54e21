"""The HDF5 feature cache: the final file, written atomically from a partial run's shards, and its reader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .config import COMPRESSIONS, DTYPES
from .files import atomic_target, disk_full
from .provenance import now
from .layout import FEATURES_FORMAT as FORMAT
from .layout import FEATURES_FORMAT_VERSION as FORMAT_VERSION
from .shards import RESUME_HINT, PartialRun

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureCache",
    "IncompleteCacheError",
    "PartialRun",
    "describe",
    "read_cache",
    "write_cache",
    "write_features",
    "DTYPES",
    "COMPRESSIONS",
]

_CHUNK_BYTES = 1 << 20


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
    # HDF5 can crash the process (not raise) when the disk fills while it writes, so the room is checked first:
    # the features uncompressed, the per-row arrays, and 1 MiB for strings and metadata.
    need = rows * (sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes)) + 16) + sum(map(len, paths)) + 2**20
    if shutil.disk_usage(final.parent).free < need:
        raise disk_full(final, f"; the final file needs about {need / 2**20:.1f} MiB{RESUME_HINT}")
    filters = {"none": {}, "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True}, "lzf": {"compression": "lzf", "shuffle": True}}[compression]
    text = h5py.string_dtype()
    # A half-built file is never renamed into place; it is removed so that it does not hold the disk.
    with atomic_target(final, hint=RESUME_HINT) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["complete"] = False
            dsets = []
            for name, shape, dtype in zip(tap_names, shapes, dtypes):
                row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                chunk_rows = max(1, min(rows, _CHUNK_BYTES // max(1, row_bytes)))
                dsets.append(f.create_dataset(f"features/{name}", shape=(rows, *shape), dtype=dtype, chunks=(chunk_rows, *shape), **filters))
            r = 0
            for shard in partial.read():
                k = len(shard["index"])
                for i, d in enumerate(dsets if k else ()):
                    d[r : r + k] = shard[f"f{i}"]
                r += k
            f.create_dataset("index", data=index)
            f.create_dataset("labels", data=np.asarray(labels)[index].astype(np.int64))
            f.create_dataset("paths", data=np.asarray([paths[i] for i in index], dtype=object), dtype=text)
            f.create_dataset("classes", data=np.asarray(list(classes), dtype=object), dtype=text)
            skipped = list(rejected) + [(paths[i], why) for i, why in zip(skipped_idx, skipped_why)]
            f.create_dataset("skipped/paths", data=np.asarray([p for p, _ in skipped], dtype=object), dtype=text)
            f.create_dataset("skipped/reasons", data=np.asarray([w for _, w in skipped], dtype=object), dtype=text)
            for k, v in _json_attrs({**attrs, "n_rows": rows, "n_skipped": len(skipped)}).items():
                f.attrs[k] = v
            f.attrs["complete"] = True
    partial.remove()
    return final


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


class FeatureCache:
    """Read access to a complete cache; opening an incomplete or foreign file raises.

    Use as a context manager or call :meth:`close`. Arrays are read on demand.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        partial = PartialRun(self.path)
        if not self.path.exists():
            if partial.exists():
                done = partial.rows_done()
                raise IncompleteCacheError(
                    f"{self.path} is incomplete: its extraction stopped after {done} images; "
                    "re-run pipeline extract with the same settings to finish it"
                )
            raise ValueError(f"no feature cache at {self.path}; run pipeline extract first")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"cannot open {self.path} as HDF5 ({e})") from None
        try:
            a = self._file.attrs
            if not _is(a.get("format"), str, FORMAT):
                raise ValueError(f"{self.path} is not a pipeline feature cache")
            if not _is(a.get("format_version"), (int, np.integer), FORMAT_VERSION):
                raise ValueError(f"{self.path} has cache format version {_show(a.get('format_version'))}; this pipeline reads {FORMAT_VERSION}")
            if not _is(a.get("complete"), (bool, np.bool_), True):
                raise IncompleteCacheError(f"{self.path} is incomplete (its writer stopped before finishing); re-run pipeline extract")
            self._check_layout()
        except BaseException:
            self._file.close()
            raise

    def _check_layout(self) -> None:
        """Refuse arrays that disagree with each other or with the attributes: an error now, not a wrong result later."""
        f, where = self._file, f"{self.path} is damaged:"
        taps = self.attrs.get("taps")
        if not isinstance(taps, list) or not taps or not all(isinstance(t, str) for t in taps):
            raise ValueError(f"{where} attribute 'taps' should be a JSON list of tap names, found {_show(self._file.attrs.get('taps'))}")
        for name in ("labels", "paths", "classes", "skipped/paths", "skipped/reasons", *(f"features/{t}" for t in taps)):
            if not isinstance(f.get(name), h5py.Dataset):
                raise ValueError(f"{where} it has no dataset {name!r}")
        labels = f["labels"]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{where} 'labels' should be a 1-D integer array, found {labels.dtype} of shape {labels.shape}")
        n = labels.shape[0]
        for name in ("paths", "classes", "skipped/paths", "skipped/reasons"):
            d = f[name]
            if d.ndim != 1 or h5py.check_string_dtype(d.dtype) is None:
                raise ValueError(f"{where} {name!r} should be a 1-D array of strings, found {d.dtype} of shape {d.shape}")
        if f["skipped/paths"].shape != f["skipped/reasons"].shape:
            raise ValueError(f"{where} {f['skipped/paths'].shape[0]} skipped paths for {f['skipped/reasons'].shape[0]} reasons")
        if f["classes"].shape[0] == 0:
            raise ValueError(f"{where} it names no classes")
        lengths = {"paths": f["paths"].shape[0], **{f"features/{t}": f[f"features/{t}"].shape[0] for t in taps}}
        if "index" in f:
            lengths["index"] = f["index"].shape[0]
        rows = self._file.attrs.get("n_rows", n)
        if not isinstance(rows, (int, np.integer)) or any(v != n for v in lengths.values()) or rows != n:
            found = ", ".join(f"{k} {v}" for k, v in lengths.items())
            raise ValueError(f"{where} its arrays disagree on the number of rows: labels {n}, {found}, attribute n_rows {_show(rows)}")
        for t in taps:
            d = f[f"features/{t}"]
            if d.ndim < 2 or d.dtype.kind != "f":
                raise ValueError(f"{where} features/{t} should be a floating-point array of N x D (or N x C x H x W), found {d.dtype} of shape {d.shape}")

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def attrs(self) -> dict:
        """Attributes, with JSON values decoded."""
        out = {}
        for k, v in self._file.attrs.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    @property
    def taps(self) -> list[str]:
        return list(self.attrs["taps"])

    def features(self, tap: str | None = None) -> np.ndarray:
        """The N x D (or N x C x H x W) features of one tap; the first tap by default."""
        tap = tap or self.taps[0]
        if tap not in self.taps:
            raise ValueError(f"{self.path} has no tap {tap!r}; it holds {', '.join(self.taps)}")
        return self._file["features"][tap][()]

    def dataset(self, tap: str | None = None) -> h5py.Dataset:
        """The h5py dataset of one tap, for chunked reading without loading it whole."""
        return self._file["features"][tap or self.taps[0]]

    @property
    def labels(self) -> np.ndarray:
        """Class indices, checked to lie in ``range(len(classes))``."""
        y = self._file["labels"][()].astype(np.int64)
        k = self._file["classes"].shape[0]
        if y.size and (y.min() < 0 or y.max() >= k):
            bad = int(np.argmax((y < 0) | (y >= k)))
            raise ValueError(f"{self.path} is damaged: label {y[bad]} at row {bad} is not a class index (there are {k} classes)")
        return y

    @property
    def paths(self) -> list[str]:
        return list(self._file["paths"].asstr()[()])

    @property
    def classes(self) -> list[str]:
        return list(self._file["classes"].asstr()[()])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return list(zip(self._file["skipped/paths"].asstr()[()], self._file["skipped/reasons"].asstr()[()]))

    @property
    def identity(self) -> dict:
        """What identifies this cache's content for reuse decisions downstream (a fitted head, an evaluation):
        where it is, when it was made, from which dataset, and how many rows."""
        attrs = self.attrs
        return {"path": str(self.path.resolve()), "created": attrs.get("created"), "dataset_fingerprint": attrs.get("dataset_fingerprint"),
                "rows": len(self)}

    def __len__(self) -> int:
        return int(self._file["labels"].shape[0])


def _is(value: object, types: type | tuple[type, ...], expected: object) -> bool:
    """An attribute equal to ``expected`` and of a scalar type: arrays and other types never compare equal."""
    return isinstance(value, types) and value == expected


def _show(value: object, limit: int = 80) -> str:
    """A short repr of a (possibly hostile, huge) attribute value for an error message."""
    if isinstance(value, np.generic):
        value = value.item()
    text = f"an array {value.tolist()!r}" if isinstance(value, np.ndarray) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Open a complete feature cache for reading (see :class:`FeatureCache`)."""
    return FeatureCache(path)


def describe(path: str | os.PathLike) -> str:
    """A readable summary of what a cache holds and how it was made."""
    with read_cache(path) as c:
        a = c.attrs
        lines = [
            f"{c.path}  ({c.path.stat().st_size / 2**20:.1f} MiB, complete)",
            f"  dataset    {a.get('dataset')}  split {a.get('split')}  ({len(c)} images, {a.get('n_skipped', 0)} skipped)",
            f"  model      {a.get('model')}  weights {a.get('weights')}",
        ]
        for tap in c.taps:
            d = c.dataset(tap)
            comp = d.compression or "none"
            lines.append(f"  tap        {tap}  {' x '.join(map(str, d.shape))}  {d.dtype}  chunks {d.chunks}  compression {comp}")
        classes = c.classes
        lines.append(f"  classes    {len(classes)}: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}")
        pre = a.get("preprocess", {})
        if isinstance(pre, dict):
            lines.append(
                f"  preprocess resize {pre.get('resize')}, crop {pre.get('crop')}, mean {pre.get('mean')}, std {pre.get('std')}, {pre.get('interpolation')}"
            )
        lines.append(f"  split seed {a.get('split_seed')}  carved {a.get('carved')}")
        ranks = a.get("world_size", 1)
        lines.append(f"  engine     {a.get('engine')} on {a.get('runtime')}{f' x {ranks} ranks' if ranks > 1 else ''}  ({a.get('images_per_s', 0):.1f} img/s)")
        lines.append(f"  dataset fingerprint {a.get('dataset_fingerprint')}")
        versions = a.get("versions", {})
        if isinstance(versions, dict):
            lines.append("  versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        lines.append(f"  created    {a.get('created')}")
        for p, why in c.skipped[:10]:
            lines.append(f"  skipped    {p}: {why}")
        if len(c.skipped) > 10:
            lines.append(f"  skipped    ... and {len(c.skipped) - 10} more")
    return "\n".join(lines)
