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
from .files import atomic_target, disk_full, file_lock, reserve
from .provenance import now
from .layout import FEATURES_FORMAT as FORMAT
from .layout import FEATURES_FORMAT_VERSION as FORMAT_VERSION
from .layout import dataset_caches
from .validate import brief, first_line
from .shards import RESUME_HINT, PartialRun

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckedDataset",
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
            others = [str(p) for p in dataset_caches(self.path)]
            hint = f"; caches of this dataset: {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}" if others else ""
            raise ValueError(f"no feature cache at {self.path}; run pipeline extract first{hint}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"cannot open {self.path} as HDF5 ({e})") from None
        try:
            a = self._file.attrs
            if not _is(a.get("format"), str, FORMAT):
                raise ValueError(f"{self.path} is not a pipeline feature cache")
            if not _is(a.get("format_version"), (int, np.integer), FORMAT_VERSION):
                raise ValueError(f"{self.path} has cache format version {brief(a.get('format_version'))}; this pipeline reads {FORMAT_VERSION}")
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
            raise ValueError(f"{where} attribute 'taps' should be a JSON list of tap names, found {brief(self._file.attrs.get('taps'))}")
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
            raise ValueError(f"{where} its arrays disagree on the number of rows: labels {n}, {found}, attribute n_rows {brief(rows)}")
        for t in taps:
            d = f[f"features/{t}"]
            if d.ndim < 2 or d.dtype.kind != "f":
                raise ValueError(f"{where} features/{t} should be a floating-point array of N x D (or N x C x H x W), found {d.dtype} of shape {d.shape}")
        attrs = self.attrs
        for key, (kind, text) in _ATTR_TYPES.items():
            raw = f.attrs.get(key)
            if raw is not None and not isinstance(attrs.get(key), kind):
                raise ValueError(f"{where} attribute {key!r} should be {text}, found {brief(raw)}")
        self._check_sizes(("labels", "paths", "classes", "skipped/paths", "skipped/reasons", "index", *(f"features/{t}" for t in taps)))

    def _check_sizes(self, names: Sequence[str]) -> None:
        """Refuse arrays that declare more bytes than the file could hold: a small file must not make a reader
        allocate gigabytes (a chunked HDF5 dataset may declare any shape and store nothing)."""
        size = self.path.stat().st_size
        for name in names:
            d = self._file.get(name)
            if not isinstance(d, h5py.Dataset):
                continue
            declared = _declared_bytes(d)
            # Deflate cannot shrink data more than about 1032:1 and lzf about 100:1; 4096 leaves room for both.
            room = size * (4096 if _compressed(d) else 1)
            if declared > room:
                raise ValueError(
                    f"{self.path} is damaged: {name} declares {' x '.join(map(str, d.shape))} {d.dtype} values ({_size(declared)}), "
                    f"more than the whole file ({_size(size)}) can hold"
                )

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
        """The N x D (or N x C x H x W) features of one tap; the first tap by default.

        Raises:
            ValueError: no such tap, more bytes than the memory available, or rows that cannot be read (a
                checksum that fails: the file changed on disk since it was written).
        """
        tap = tap or self.taps[0]
        if tap not in self.taps:
            raise ValueError(f"{self.path} has no tap {tap!r}; it holds {', '.join(self.taps)}")
        d = self.dataset(tap)
        need, free = _declared_bytes(d.dataset), _available_memory()
        if free is not None and need > free:
            raise ValueError(f"{self.path}: features/{tap} takes {_size(need)}, more than the {_size(free)} of memory available; "
                             "read it in blocks (fit-head --stream) or free memory")
        return d[()]

    def dataset(self, tap: str | None = None) -> "CheckedDataset":
        """The features of one tap as an h5py dataset, for chunked reading without loading it whole (damaged rows raise ValueError)."""
        tap = tap or self.taps[0]
        if tap not in self.taps:
            raise ValueError(f"{self.path} has no tap {tap!r}; it holds {', '.join(self.taps)}")
        return CheckedDataset(self._file["features"][tap], self.path)

    def _read(self, name: str) -> np.ndarray:
        return CheckedDataset(self._file[name], self.path)[()]

    @property
    def labels(self) -> np.ndarray:
        """Class indices, checked to lie in ``range(len(classes))``."""
        y = self._read("labels").astype(np.int64)
        k = self._file["classes"].shape[0]
        if y.size and (y.min() < 0 or y.max() >= k):
            bad = int(np.argmax((y < 0) | (y >= k)))
            raise ValueError(f"{self.path} is damaged: label {y[bad]} at row {bad} is not a class index (there are {k} classes)")
        return y

    def _strings(self, name: str) -> list[str]:
        try:
            return list(self._file[name].asstr()[()])
        except OSError as e:
            raise ValueError(f"{self.path} is damaged: {name} cannot be read ({first_line(e)})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path} is damaged: {name} holds bytes that are not UTF-8 text ({e.reason})") from None

    @property
    def paths(self) -> list[str]:
        """Each row's image path, relative to the dataset folder (``data_root``)."""
        return self._strings("paths")

    @property
    def classes(self) -> list[str]:
        return self._strings("classes")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return list(zip(self._strings("skipped/paths"), self._strings("skipped/reasons")))

    def members(self) -> list[str] | None:
        """Each row's image as one string that is equal for the same image in any cache: its path under the
        dataset folder the cache was extracted from (``data_root``), or the path alone where none is recorded.

        None for features written without image paths (:func:`write_features`' default ids ``row0``, ``row1``...),
        whose rows cannot be told apart from another cache's.
        """
        root = self.attrs.get("data_root")
        paths = self.paths
        if all(p == f"row{i}" for i, p in enumerate(paths)):
            return None
        if not root:
            return paths
        return [p if p.startswith("/") else f"{root.rstrip('/')}/{p}" for p in paths]

    @property
    def identity(self) -> dict:
        """What identifies this cache's content for reuse decisions downstream (a fitted head, an evaluation):
        where it is, when it was made, from which dataset, and how many rows."""
        attrs = self.attrs
        return {"path": str(self.path.resolve()), "created": attrs.get("created"), "dataset_fingerprint": attrs.get("dataset_fingerprint"),
                "rows": len(self)}

    def __len__(self) -> int:
        return int(self._file["labels"].shape[0])


class CheckedDataset:
    """An h5py dataset whose reads raise ValueError naming the file and the rows when they fail, for instance a
    fletcher32 checksum that no longer matches (bit rot, or bytes overwritten in place). Otherwise it reads like
    the dataset itself: slicing, ``shape``, ``dtype``, ``chunks``, ``compression``..."""

    def __init__(self, dataset: h5py.Dataset, path: Path) -> None:
        self.dataset = dataset
        self.path = path

    def __getitem__(self, key: object) -> np.ndarray:
        try:
            return self.dataset[key]
        except OSError as e:
            raise self._damaged(key, e) from None

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return np.asarray(self[()], dtype=dtype)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> object:
        return getattr(self.dataset, name)

    def _damaged(self, key: object, error: OSError) -> ValueError:
        """The error for a failed read of ``key``: which chunk of rows fails, found by reading them chunk by chunk."""
        d, name = self.dataset, self.dataset.name.lstrip("/")
        n = d.shape[0] if d.ndim else 0
        lo, hi = _row_span(key, n)
        step = d.chunks[0] if d.chunks else max(1, n)
        for a in range(lo - lo % step, hi, step):
            b = min(a + step, n)
            try:
                d[a:b]
            except OSError:
                what = f"rows {a}-{b - 1} of {name}"
                break
        else:
            what = name
        why = "fail their checksum: the file changed on disk after it was written" if d.fletcher32 else f"cannot be read ({first_line(error)})"
        return ValueError(f"{self.path} is damaged: {what} {why}; extract the split again")


def _row_span(key: object, n: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` a selection touches along the first axis (all of them when unsure)."""
    first = key[0] if isinstance(key, tuple) and key else key
    if isinstance(first, slice):
        lo, hi, step = first.indices(n)
        return (lo, hi) if step > 0 else (0, n)
    if isinstance(first, (int, np.integer)):
        i = int(first) % max(1, n)
        return i, i + 1
    if isinstance(first, (list, np.ndarray)) and len(first) and np.asarray(first).dtype.kind in "iu":
        rows = np.asarray(first)
        return int(rows.min()), int(rows.max()) + 1
    return 0, n


# Attributes holding JSON (or text) that readers rely on, with the type they must decode to.
_ATTR_TYPES = {
    "settings": (dict, "a JSON object of settings"), "preprocess": (dict, "a JSON object"), "versions": (dict, "a JSON object"),
    "carved": (dict, "a JSON object"), "data_root": (str, "a folder name"), "dataset_fingerprint": (str, "a text digest"),
}


def _declared_bytes(d: h5py.Dataset) -> int:
    """The bytes a dataset's shape declares (variable-length strings count their 16-byte references)."""
    item = 16 if d.dtype.kind == "O" else d.dtype.itemsize
    return int(np.prod(d.shape, dtype=np.float64)) * item


def _compressed(d: h5py.Dataset) -> bool:
    """Whether a filter other than the checksum and the byte shuffle may shrink the stored data."""
    plist = d.id.get_create_plist()
    keep = (h5py.h5z.FILTER_FLETCHER32, h5py.h5z.FILTER_SHUFFLE)
    return any(plist.get_filter(i)[0] not in keep for i in range(plist.get_nfilters()))


def _available_memory() -> int | None:
    """Bytes of memory available to allocate now: Linux ``MemAvailable``, or less under a cgroup (v2) limit; None
    where unknown."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"




def _is(value: object, types: type | tuple[type, ...], expected: object) -> bool:
    """An attribute equal to ``expected`` and of a scalar type: arrays and other types never compare equal."""
    return isinstance(value, types) and value == expected




def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Open a complete feature cache for reading (see :class:`FeatureCache`)."""
    return FeatureCache(path)


def describe(path: str | os.PathLike) -> str:
    """A readable summary of what a cache holds and how it was made.

    Attribute values are shown cut to a line; one of the wrong type is shown as it is, with a note naming it.
    """
    with read_cache(path) as c:
        a = c.attrs
        show = lambda key, default=None: brief(a.get(key, default), 100, plain_strings=True)  # noqa: E731

        def number(key: str, default: float, fmt: str) -> str:
            value = a.get(key, default)
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                return format(value, fmt)
            return f"{brief(repr(value) if isinstance(value, str) else value, 100, plain_strings=True)} (attribute {key!r} of {c.path} is not a number)"

        lines = [
            f"{c.path}  ({c.path.stat().st_size / 2**20:.1f} MiB, complete)",
            f"  dataset    {show('dataset')}  split {show('split')}  ({len(c)} images, {number('n_skipped', 0, '')} skipped)",
            f"  model      {show('model')}  weights {show('weights')}",
        ]
        for tap in c.taps:
            d = c.dataset(tap)
            comp = d.compression or "none"
            check = ", fletcher32 checksums" if d.fletcher32 else ""
            lines.append(f"  tap        {brief(tap, 100, plain_strings=True)}  {' x '.join(map(str, d.shape))}  {d.dtype}  chunks {d.chunks}  compression {comp}{check}")
        classes = c.classes
        lines.append(f"  classes    {len(classes)}: {', '.join(brief(k, 40, plain_strings=True) for k in classes[:10])}{' ...' if len(classes) > 10 else ''}")
        pre = a.get("preprocess", {})
        if isinstance(pre, dict):
            lines.append("  preprocess " + ", ".join(f"{k} {brief(pre.get(k), 40, plain_strings=True)}" for k in ("resize", "crop", "mean", "std"))
                         + f", {brief(pre.get('interpolation'), 40, plain_strings=True)}")
        lines.append(f"  split seed {show('split_seed')}  carved {show('carved')}")
        ranks = a.get("world_size", 1)
        several = "" if isinstance(ranks, int) and not isinstance(ranks, bool) and ranks <= 1 else f" x {number('world_size', 1, 'd')} ranks"
        lines.append(f"  engine     {show('engine')} on {show('runtime')}{several}  ({number('images_per_s', 0, '.1f')} img/s)")
        lines.append(f"  dataset fingerprint {show('dataset_fingerprint')}")
        versions = a.get("versions", {})
        if isinstance(versions, dict):
            lines.append(brief("  versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()), 240, plain_strings=True))
        lines.append(f"  created    {show('created')}")
        skipped = c.skipped
        for p, why in skipped[:10]:
            lines.append(f"  skipped    {brief(p, 100, plain_strings=True)}: {brief(why, 100, plain_strings=True)}")
        if len(skipped) > 10:
            lines.append(f"  skipped    ... and {len(skipped) - 10} more")
    return "\n".join(lines)

