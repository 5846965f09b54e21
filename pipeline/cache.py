"""The HDF5 feature cache, read: a complete file checked before use, its arrays, attributes and checksums (``shards`` writes it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .config import COMPRESSIONS, DTYPES, JOIN, tap_parts
from .layout import FEATURES_FORMAT as FORMAT
from .layout import FEATURES_FORMAT_VERSION as FORMAT_VERSION
from .layout import dataset_caches
from .files import file_identity
from .resources import available_memory, human_size
from .validate import brief, first_line
from .shards import IncompleteCacheError, PartialRun, write_cache, write_features

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
            self._identity = file_identity(self.path)  # of the file opened here, whatever is renamed over the path later
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
                    f"{self.path} is damaged: {name} declares {' x '.join(map(str, d.shape))} {d.dtype} values ({human_size(declared)}), "
                    f"more than the whole file ({human_size(size)}) can hold"
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
        """The N x D (or N x C x H x W) features of one tap; the first tap by default. A joined name,
        ``a+b``, gives the taps side by side (:func:`pipeline.taps.joined`: spatial maps averaged, N x D).

        Raises:
            ValueError: no such tap, more bytes than the memory available, or rows that cannot be read (a
                checksum that fails: the file changed on disk since it was written).
        """
        parts = self._parts(tap)
        need, free = sum(_declared_bytes(self._file["features"][p]) for p in parts), available_memory()
        if free is not None and need > free:
            raise ValueError(f"{self.path}: features/{JOIN.join(parts)} takes {human_size(need)}, more than the {human_size(free)} of memory available; "
                             "read it in blocks (fit-head --stream) or free memory")
        return self.dataset(tap)[()]

    def dataset(self, tap: str | None = None) -> "CheckedDataset | JoinedDataset":
        """The features of one tap (or joined taps) as an h5py dataset, for chunked reading without loading it whole
        (damaged rows raise ValueError)."""
        parts = [CheckedDataset(self._file["features"][p], self.path) for p in self._parts(tap)]
        return parts[0] if len(parts) == 1 else JoinedDataset(parts)

    def _parts(self, tap: str | None) -> list[str]:
        """The stored taps a tap name reads: itself, or each part of a joined name."""
        parts = tap_parts(tap) if tap else self.taps[:1]
        unknown = [p for p in parts if p not in self.taps]
        if unknown or len(set(parts)) < len(parts):
            what = f"no tap {unknown[0]!r}" if unknown else f"a repeated tap in {tap!r}"
            raise ValueError(f"{self.path} has {what}; it holds {', '.join(self.taps)}")
        return parts

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
        # A complete cache never changes in place (a new one is renamed over it), so its members are kept per file
        # identity: fit-head and evaluate compare the same caches once per head (16 times in make all).
        key = self._identity
        if key not in _MEMBERS:
            _MEMBERS[key] = self._members()
            while len(_MEMBERS) > 8:
                del _MEMBERS[next(iter(_MEMBERS))]
        found = _MEMBERS[key]
        return None if found is None else list(found)

    def _members(self) -> tuple[str, ...] | None:
        root = self.attrs.get("data_root")
        paths = self.paths
        if all(p == f"row{i}" for i, p in enumerate(paths)):
            return None
        if not root:
            return tuple(paths)
        return tuple(p if p.startswith("/") else f"{root.rstrip('/')}/{p}" for p in paths)

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


class JoinedDataset:
    """Several taps' datasets read as one, N x (D1 + D2 + ...) float32 (:func:`pipeline.taps.joined`): rows are
    selected along the first axis, as in a dataset."""

    def __init__(self, parts: Sequence[CheckedDataset]) -> None:
        self.parts = list(parts)

    def __getitem__(self, key: object) -> np.ndarray:
        from .taps import joined

        return joined([p[key] for p in self.parts])

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return np.asarray(self[()], dtype=dtype)

    def __len__(self) -> int:
        return len(self.parts[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self[:1].shape[1])  # joined's own rule, applied to one row

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """What a read of every row takes from the file (the spatial maps before they are averaged)."""
        return sum(p.nbytes for p in self.parts)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return self.parts[0].chunks


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


# members() of the caches read lately, by file identity (files.file_identity); oldest first.
_MEMBERS: dict[tuple, tuple[str, ...] | None] = {}


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
        made = a.get("settings") if isinstance(a.get("settings"), dict) else {}
        notes = [*(["each image averaged with its mirror (flip)"] if made.get("flip") else []),
                 *([f"decoded on the {brief(made['decode'], 40, plain_strings=True)}"] if made.get("decode") else [])]
        if notes:
            lines.append("  features   " + "; ".join(notes))
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

