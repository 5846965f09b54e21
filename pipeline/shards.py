"""Unfinished extractions: one crash-safe shard per finished batch, so that a re-run computes only what is missing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .files import atomic_write, temp_target
from .layout import partial_dir

__all__ = ["PartialRun", "RESUME_HINT"]

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
