"""Datasets: scan image folders and CSV label files, carve stable splits, and serve decoded images (`images` decodes them)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import SPLITS, DatasetSpec
from . import layout
from .files import atomic_write
from .images import (
    IMAGE_EXTENSIONS, JPEG_MAGIC, UnreadableImageError, broken_link, ignored_reason, jpeg_orientation, load_rgb, unreadable_message, verify_images,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "Split",
    "Rejected",
    "UnreadableImageError",
    "ImageDataset",
    "EncodedJpeg",
    "load_split",
    "load_splits",
    "load_rgb",
    "collate_batch",
    "stratified_subset",
    "broken_link",
    "SPLITS",
]


@dataclass(frozen=True)
class Rejected:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass
class Split:
    """One split of a dataset: image paths relative to the dataset root, labels and class names."""

    name: str
    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[Rejected] = field(default_factory=list)
    carved: dict | None = None
    sizes: list[int] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        """A digest of the split's members: path, byte size and label of every image, and the classes."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        for p, s, y in zip(self.paths, self.sizes, self.labels.tolist()):
            h.update(f"\n{p}\t{s}\t{y}".encode())
        return h.hexdigest()


# ---------------------------------------------------------------- scanning


def refuse_unreadable(split: Split, on_error: str, list_dir: str | os.PathLike | None = None, kinds: dict[str, int] | None = None) -> None:
    """Under ``on_error="fail"``, refuse a split with unreadable files, naming every one of them in one go.

    The files refused by name (empty, broken links...) and those whose header or PNG checksums are broken
    (:func:`~pipeline.images.verify_image`, about 1 % of extraction's time) are all found before any work, so one run
    names them all; the message shows the first ten, and ``list_dir`` (when given) gets the full list in
    ``unreadable-<split>.txt``. Where ``kinds`` is given, the headers are read under any ``on_error``, and the
    images decoded unlike a plain RGB conversion are counted in it (:func:`~pipeline.images.decoding_kind`).

    Raises:
        ValueError: the split has unreadable files and ``on_error`` is ``fail``.
    """
    if on_error != "fail" and kinds is None:
        return
    broken = verify_images([split.root / p for p in split.paths], kinds=kinds)
    if on_error != "fail":
        return
    bad = [(str(split.root / r.path), r.reason) for r in split.rejected]
    bad += [(str(split.root / split.paths[i]), why) for i, why in broken]
    if not bad:
        return
    listed = ""
    if list_dir is not None and len(bad) > 10:
        path = layout.unreadable_list(list_dir, split.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write("".join(f"{p}\t{why}\n" for p, why in bad).encode()))
        listed = f" (all listed in {path})"
    raise ValueError(unreadable_message(bad, f" in the {split.name} split", listed=listed))


def stratified_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted positions of at most ``per_class`` images of each class, drawn with ``seed``; all when None."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _check_file(root: Path, rel: str) -> tuple[int, str | None]:
    """Return the byte size of ``root/rel`` and, when it cannot be an image, the reason."""
    # Plain string operations, not pathlib: this runs once per image on every scan (70,000 on the default dataset).
    if any(p.startswith(".") for p in rel.split("/")):
        return 0, "hidden file, not an image"
    try:
        size = os.stat(os.path.join(root, rel)).st_size
    except FileNotFoundError:
        return 0, broken_link(root / rel) or "file not found"
    except OSError as e:  # a name too long for the filesystem, a permission problem...
        return 0, f"cannot read file ({e.strerror or e})"
    if size == 0:
        return 0, "empty file (0 bytes)"
    suffix = os.path.splitext(rel)[1]
    if suffix.lower() not in IMAGE_EXTENSIONS:
        return size, f"not an image file (extension {suffix or 'none'!r})"
    return size, None


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _scan_folder(root: Path, split: str, classes: list[str]) -> tuple[list[str], list[int], list[int], list[Rejected]]:
    split_dir = root / split
    found = _class_folders(split_dir)
    extra = [c for c in found if c not in classes]
    if extra:
        raise ValueError(f"{split_dir} has class folder(s) {extra} that {root / 'train'} lacks")
    index = {c: i for i, c in enumerate(classes)}
    # As torchvision's ImageFolder: files beside the class folders, hidden and system files and other extensions
    # are ignored (counted, never fatal); the rest must be readable images.
    ignored = [
        Rejected(f"{split}/{e.name}", ignored_reason(e.name) or "not inside a class folder")
        for e in sorted(os.scandir(split_dir), key=lambda e: e.name)
        if not e.is_dir()
    ]

    def candidates() -> Iterator[tuple[str, int]]:
        for cls in found:
            top = os.path.join(split_dir, cls)
            for dirpath, dirnames, filenames in os.walk(top):
                prefix = f"{split}/{cls}" + dirpath[len(top):].replace(os.sep, "/")
                ignored.extend(Rejected(f"{prefix}/{d}/", "hidden folder") for d in sorted(dirnames) if d.startswith("."))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    rel = f"{prefix}/{fn}"
                    why = ignored_reason(fn)
                    if why:
                        ignored.append(Rejected(rel, why))
                    else:
                        yield rel, index[cls]

    paths, labels, sizes, rejected = _collect(root, candidates())
    return paths, labels, sizes, rejected, ignored


def _collect(root: Path, candidates: Iterable[tuple[str, int]]) -> tuple[list[str], list[int], list[int], list[Rejected]]:
    """Split (path, label) candidates into usable images, with their sizes, and rejected files."""
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    rejected: list[Rejected] = []
    for rel, label in candidates:
        size, reason = _check_file(root, rel)
        if reason:
            rejected.append(Rejected(rel, reason))
        else:
            paths.append(rel)
            labels.append(label)
            sizes.append(size)
    return paths, labels, sizes, rejected


def _safe_relpath(image_dir: str, name: str, where: str, image_root: Path) -> str:
    """Join a CSV id onto the image folder, refusing ids that escape it."""
    if "\0" in name:
        raise ValueError(f"{where}: image id {name!r} contains a NUL character")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
        raise ValueError(f"{where}: image path {name!r} escapes the image root {image_root}")
    return (PurePosixPath(image_dir) / pure).as_posix()


def _scan_csv(spec: DatasetSpec) -> tuple[list[str], list[int], list[int], list[Rejected], list[str]]:
    root = Path(spec.root)
    csv_path = root / spec.labels_csv
    if not csv_path.is_file():
        raise ValueError(f"labels file {csv_path} not found")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{csv_path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return _parse_csv(spec, csv_path, text)
    except csv.Error as e:
        raise ValueError(f"{csv_path} is not a readable CSV file ({e})") from None


def _parse_csv(spec: DatasetSpec, csv_path: Path, text: str) -> tuple[list[str], list[int], list[int], list[Rejected], list[str]]:
    root = Path(spec.root)
    image_root = root / spec.image_dir
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for col, opt in ((spec.id_column, "--id-column"), (spec.label_column, "--label-column")):
            if col not in columns:
                raise ValueError(f"{csv_path} has no column {col!r} (columns: {', '.join(columns) or 'none'}); set {opt}")
        rows = []
        seen: set[str] = set()
        real_root = image_root.resolve()
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if end > start:
                _check_multiline(csv_path, text, row, start, end)
            ident, label = (row[spec.id_column] or "").strip(), (row[spec.label_column] or "").strip()
            where = f"{csv_path} line {reader.line_num}"
            if not ident or not label:
                raise ValueError(f"{where}: empty {spec.id_column!r} or {spec.label_column!r}")
            rel = _safe_relpath(spec.image_dir, ident + spec.extension, where, image_root)
            # A symbolic link under the image folder may lead anywhere: the containment check is on where it leads.
            real = (root / rel).resolve()
            if not real.is_relative_to(real_root):
                raise ValueError(f"{where}: image path {ident + spec.extension!r} leads outside the image root {image_root} "
                                 f"(through a symbolic link, to {real})")
            if rel in seen:
                raise ValueError(f"{where}: duplicate image id {ident!r}")
            seen.add(rel)
            rows.append((rel, label))
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, sizes, rejected = _collect(root, ((rel, index[label]) for rel, label in sorted(rows)))
    return paths, labels, sizes, rejected, classes


def _check_multiline(csv_path: Path, text: str, row: dict, start: int, end: int) -> None:
    """Refuse a record spread over several lines: ids and labels hold no line breaks, so an unclosed quote swallowed them.

    Args:
        start, end: the record's first and last line (blank lines before it are skipped).
    """
    values = [v for v in row.values() if isinstance(v, str)] + [v for v in row.get(None) or [] if isinstance(v, str)]  # type: ignore[call-overload]
    if not any("\n" in v or "\r" in v for v in values):
        return
    lines = text.splitlines()
    opener = next((i for i in range(start, end + 1) if i <= len(lines) and lines[i - 1].strip()), start)
    try:
        list(csv.reader(io.StringIO("\n".join(lines[opener - 1 : end]) + "\n", newline=""), strict=True))
        closed = f"is closed only on line {end}"
    except csv.Error:
        closed = "is never closed: the field runs to the end of the file"
    raise ValueError(f"{csv_path} line {opener}: a quote opened on this line {closed}, so {end - opener + 1} lines became "
                     "one record; balance or remove the quote")


def _carve(labels: np.ndarray, fraction: float, seed: int, classes: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of positions into (kept, carved); the same inputs always give the same split."""
    from sklearn.model_selection import StratifiedShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the {what} fraction must be between 0 and 1, got {fraction}")
    counts = np.bincount(labels, minlength=len(classes))
    present = counts > 0
    if (counts[present] < 2).any():
        thin = [classes[i] for i in np.flatnonzero(present & (counts < 2))]
        raise ValueError(f"cannot carve a stratified {what} split: class(es) {thin[:5]} have a single image (need at least 2)")
    n_take = int(np.ceil(fraction * len(labels)))
    if n_take < present.sum() or len(labels) - n_take < present.sum():
        raise ValueError(
            f"cannot carve a stratified {what} split: {fraction} of {len(labels)} images does not leave "
            f"one image per class for each side ({present.sum()} classes); change the {what} fraction"
        )
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed)
    keep, take = next(sss.split(np.zeros(len(labels)), labels))
    return np.sort(keep), np.sort(take)


def load_split(spec: DatasetSpec, split: str) -> Split:
    """Scan one split of a dataset.

    Image folders use ``root/<split>/``; a missing ``val/`` is carved from train. A CSV dataset carves
    test from all its images, then val from the rest. Carving is stratified and seeded, so it is stable.
    In image folders, hidden and system files, other extensions and files beside the class folders are returned in
    ``ignored``; files that cannot be read (empty, missing, broken links) in ``rejected``.

    Args:
        spec: the dataset.
        split: "train", "val" or "test".

    Returns:
        The split, with paths relative to ``spec.root``.
    """
    return load_splits(spec, [split])[split]


def load_splits(spec: DatasetSpec, splits: Sequence[str]) -> dict[str, Split]:
    """Several splits of a dataset, as :func:`load_split` makes them, with each folder (or the CSV) scanned once:
    train and the val carved from it share one scan of ``train/``."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(spec.root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} not found")
    scans: dict[str, _Scan] = {}
    out = {}
    test_only = all(split == "test" for split in splits)  # a CSV's test alone does not need val carved
    for split in splits:
        key = "csv" if spec.labels_csv else _folder_of(root, split)
        if key not in scans:
            scans[key] = _scan_csv_splits(spec, test_only) if spec.labels_csv else _scan_folder_splits(spec, key)
        scan = scans[key]
        pick = scan.members[split]
        out[split] = Split(
            name=split, root=root, paths=[scan.paths[i] for i in pick],
            labels=np.asarray([scan.labels[i] for i in pick], dtype=np.int64), classes=list(scan.classes),
            rejected=scan.rejected, ignored=scan.ignored, carved=scan.carved, sizes=[scan.sizes[i] for i in pick],
        )
    return out


@dataclass
class _Scan:
    """One scan of a folder or CSV file, and the members (positions) of each split it holds."""

    paths: list[str]
    labels: list[int]
    sizes: list[int]
    rejected: list[Rejected]
    ignored: list[Rejected]
    classes: list[str]
    members: dict[str, np.ndarray]
    carved: dict | None


def _folder_of(root: Path, split: str) -> str:
    """The folder a split's images are in: its own, or train/ for a val carved from it."""
    return split if (split == "test" or (split == "val" and (root / "val").is_dir())) else "train"


def _scan_csv_splits(spec: DatasetSpec, test_only: bool) -> _Scan:
    root = Path(spec.root)
    paths, labels, sizes, rejected, classes = _scan_csv(spec)
    if not paths:
        more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
        raise ValueError(f"{root / spec.labels_csv} lists no usable image: {rejected[0].path}: {rejected[0].reason}{more}")
    y = np.asarray(labels, dtype=np.int64)
    rest, test = _carve(y, spec.test_fraction, spec.split_seed, classes, "test")
    members = {"test": test}
    if not test_only:
        train, val = _carve(y[rest], spec.val_fraction, spec.split_seed, classes, "val")
        members.update(train=rest[train], val=rest[val])
    carved = {"from": spec.labels_csv, "test_fraction": spec.test_fraction, "val_fraction": spec.val_fraction, "seed": spec.split_seed}
    return _Scan(paths, labels, sizes, rejected, [], classes, members, carved)


def _scan_folder_splits(spec: DatasetSpec, scan: str) -> _Scan:
    root = Path(spec.root)
    has_val = (root / "val").is_dir()
    if not (root / scan).is_dir():
        raise ValueError(f"{root} has no {scan}/ folder (expected {root}/<split>/<class>/<image>)")
    # train/ defines the classes of every split; a dataset without train/ takes the split's own.
    class_dir = root / "train" if (root / "train").is_dir() else root / scan
    classes = _class_folders(class_dir)
    if not classes:
        raise ValueError(f"{class_dir} has no class folders (expected {class_dir}/<class>/<image>)")
    paths, labels, sizes, rejected, ignored = _scan_folder(root, scan, classes)
    if scan != "train" or has_val:
        return _Scan(paths, labels, sizes, rejected, ignored, classes, {scan: np.arange(len(paths))}, None)
    if not paths:
        raise ValueError(f"{root / scan} has no usable image to carve a val split from")
    train, val = _carve(np.asarray(labels, dtype=np.int64), spec.val_fraction, spec.split_seed, classes, "val")
    carved = {"from": "train", "val_fraction": spec.val_fraction, "seed": spec.split_seed}
    return _Scan(paths, labels, sizes, rejected, ignored, classes, {"train": train, "val": val}, carved)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file read but not decoded, for the device to decode (:class:`~pipeline.runtime.BatchInputs`).

    Attributes:
        path: the file, to decode it on the host where the device cannot.
        data: its bytes.
        orientation: its EXIF orientation (1-8), which the device applies.
    """

    path: str
    data: bytes
    orientation: int


def read_jpeg(path: Path) -> EncodedJpeg | None:
    """The bytes of a file that begins as a JPEG does and whose colour the device decodes as :func:`load_rgb` does
    (:func:`~pipeline.images.jpeg_orientation`), else None (another format, or a file that cannot be read: decoding it
    with :func:`load_rgb` says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(JPEG_MAGIC))
            if head != JPEG_MAGIC:
                return None
            data = head + f.read()
    except OSError:
        return None
    orientation = jpeg_orientation(data)
    return None if orientation is None else EncodedJpeg(str(path), data, orientation)


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, transformed images of a split; a bad image yields its error instead of raising.

    Items are ``(position, tensor or None, reason or None)`` so that one bad file costs one row, not the run. With
    ``encoded_jpegs``, a JPEG file (known by its first bytes, whatever its extension) is read and not decoded: its item
    holds an :class:`EncodedJpeg` instead of a tensor, for the device to decode; other files are decoded as always.
    """

    def __init__(self, root: Path, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor], offset: int = 0,
                 encoded_jpegs: bool = False) -> None:
        self.root = Path(root)
        self.paths = paths
        self.transform = transform
        self.offset = offset
        self.encoded_jpegs = encoded_jpegs

    def __len__(self) -> int:
        return len(self.paths) - self.offset

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | EncodedJpeg | None, str | None]:
        pos = i + self.offset
        path = self.root / self.paths[pos]
        encoded = read_jpeg(path) if self.encoded_jpegs else None
        if encoded is not None:
            return pos, encoded, None
        try:
            return pos, self.transform(load_rgb(path)), None
        except UnreadableImageError as e:
            return pos, None, e.reason


def collate_batch(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[np.ndarray, torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the good images of a batch; return (positions of good images, batch or None, [(position, reason)])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    if not good:
        return np.zeros(0, dtype=np.int64), None, bad
    return np.asarray([i for i, _ in good], dtype=np.int64), torch.stack([x for _, x in good]), bad
