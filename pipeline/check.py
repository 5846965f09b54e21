"""A dataset check without a model: per split, the images, classes, sizes and modes, unreadable files, duplicates, tiny classes."""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .config import SPLITS, DatasetSpec
from .data import Split, load_split

__all__ = ["SplitCheck", "DatasetCheck", "check_dataset", "TINY_CLASS"]

# Fewer images than this in a class of a split, and its accuracy means little (one image is 20 points).
TINY_CLASS = 5


@dataclass
class SplitCheck:
    """What one split holds."""

    name: str
    images: int
    per_class: dict[str, int]
    sizes: Counter
    modes: Counter
    unreadable: list[tuple[str, str]]
    ignored: list[tuple[str, str]]
    carved: dict | None = None

    @property
    def tiny_classes(self) -> list[str]:
        return [c for c, n in self.per_class.items() if n < TINY_CLASS]


@dataclass
class DatasetCheck:
    """The splits, and the groups of byte-identical files (a group across splits is a leak between them)."""

    root: Path
    classes: list[str]
    splits: dict[str, SplitCheck] = field(default_factory=dict)
    duplicates: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def leaks(self) -> list[list[tuple[str, str]]]:
        """Duplicate groups that span more than one split."""
        return [g for g in self.duplicates if len({split for split, _ in g}) > 1]

    @property
    def ok(self) -> bool:
        return not any(s.unreadable for s in self.splits.values()) and not self.leaks


def _inspect(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None, str]:
    """(reason it cannot be read, size, mode, sha256) of one file, from its header and its bytes (no decoding)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode image ({type(e).__name__}: {e})", None, None, digest
    return None, size, mode, digest


def check_dataset(spec: DatasetSpec, splits: tuple[str, ...] = SPLITS, workers: int = 8) -> DatasetCheck:
    """Scan every split of a dataset the way extract will read it, without a model.

    Reads each file once: its header (size and mode), PNG's checksums, and a sha256 of its bytes for duplicates.

    Raises:
        ValueError: a dataset folder or layout that cannot be scanned at all.
    """
    found: dict[str, Split] = {}
    for name in splits:
        try:
            found[name] = load_split(spec, name)
        except ValueError as e:
            if "has no" in str(e) and name != "train":  # a missing split folder is reported as absent, not fatal
                continue
            raise
    if not found:
        raise ValueError(f"no split of {spec.root} could be scanned")
    classes = next(iter(found.values())).classes
    report = DatasetCheck(Path(spec.root), classes)
    by_digest: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()  # carved splits share their source's refused and ignored files: each is reported once
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, split in found.items():
            results = list(pool.map(_inspect, (split.root / p for p in split.paths), chunksize=64))
            rejected, ignored = [r for r in split.rejected if r.path not in seen], [r for r in split.ignored if r.path not in seen]
            seen.update(r.path for r in (*rejected, *ignored))
            unreadable = [(r.path, r.reason) for r in rejected]
            sizes, modes = Counter(), Counter()
            for rel, (why, size, mode, digest) in zip(split.paths, results):
                by_digest.setdefault(digest, []).append((name, rel))
                if why:
                    unreadable.append((rel, why))
                else:
                    sizes[size] += 1
                    modes[mode] += 1
            counts = Counter(split.labels.tolist())
            report.splits[name] = SplitCheck(name, len(split), {c: counts.get(i, 0) for i, c in enumerate(split.classes)},
                                             sizes, modes, unreadable, [(r.path, r.reason) for r in ignored], split.carved)
    groups = [g for g in by_digest.values() if len(g) > 1]
    report.duplicates = sorted(groups, key=lambda g: (-len({s for s, _ in g}), g))
    return report
