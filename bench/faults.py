"""Kills and cuts for fault injection, shared by bench/fault_inject.py and the tests: a command stopped at a save point
or at a moment of its run, and a cache read back row by row to compare it with an uninterrupted run's.

Run as a script, it runs a pipeline command and SIGKILLs its own process at the n-th atomic rename onto a path
ending in SUFFIX (see ``CutAtSave`` for the points):

    python bench/faults.py SUFFIX N POINT pipeline-args...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["POINTS", "CutAtSave", "cache_rows", "kill_at_save_command", "kill_when", "pipeline_command"]

POINTS = ("mid-write", "before-rename", "after-rename")


class CutAtSave:
    """A stand-in for ``os.replace`` that calls ``stop`` at the ``nth`` atomic rename onto a path ending in ``suffix``.

    The points: ``before-rename``, the temporary file is whole but not yet renamed; ``mid-write``, the temporary file
    is first cut to half its bytes, as if the stop came while it was written; ``after-rename``, the file is in place
    and the stop comes before anything after it. ``seen`` counts the renames onto ``*suffix`` so far.
    """

    def __init__(self, suffix: str, nth: int, point: str, stop: Callable[[], None]) -> None:
        if point not in POINTS:
            raise ValueError(f"point must be one of {', '.join(POINTS)}, got {point!r}")
        self.suffix, self.nth, self.point, self.stop = suffix, nth, point, stop
        self.real = os.replace
        self.seen = 0

    def __call__(self, src: str, dst: str, *args: object, **kwargs: object) -> None:
        if str(dst).endswith(self.suffix):
            self.seen += 1
            if self.seen == self.nth:
                if self.point == "mid-write":
                    os.truncate(src, os.path.getsize(src) // 2)
                if self.point == "after-rename":
                    self.real(src, dst, *args, **kwargs)
                self.stop()
        return self.real(src, dst, *args, **kwargs)


def pipeline_command(args: list[str]) -> list[str]:
    """The command line that runs ``pipeline ARGS`` with this interpreter."""
    return [sys.executable, "-m", "pipeline", *args]


def kill_at_save_command(suffix: str, nth: int, point: str, args: list[str]) -> list[str]:
    """The command line that runs ``pipeline ARGS`` and SIGKILLs it at the ``nth`` save onto ``*suffix``, at ``point``."""
    return [sys.executable, str(Path(__file__).resolve()), suffix, str(nth), point, *args]


def kill_when(command: list[str], started: Callable[[], bool], delay: float = 0.0, *, cwd: Path | None = None,
              env: dict[str, str] | None = None, give_up: float = 120.0) -> bool:
    """Run ``command`` and SIGKILL it ``delay`` seconds after ``started()`` turns true.

    Timing from the child's own progress (say, its n-th saved batch), not from its launch, keeps the kill where it
    is meant to land whatever the machine's load does to import and model-loading times.

    Args:
        command: The child's command line.
        started: Polled every 2 ms until it returns true, the child ends, or ``give_up`` seconds pass.
        delay: Seconds from then to the kill.
        cwd: The child's folder.
        env: The child's environment.
        give_up: The most seconds to wait for ``started``.

    Returns:
        Whether the child was still running when the kill came.
    """
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + give_up
    while child.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        child.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
        return True


def cache_rows(path: Path) -> dict[str, np.ndarray]:
    """A cache's features (one entry per tap), labels and paths, to compare two caches array by array."""
    from pipeline.cache import read_cache

    with read_cache(path) as c:
        out = {t: c.features(t) for t in c.taps}
        out["labels"], out["paths"] = c.labels, np.asarray(c.paths)
    return out


def _main(argv: list[str]) -> None:
    suffix, nth, point = argv[0], int(argv[1]), argv[2]
    os.replace = CutAtSave(suffix, nth, point, stop=lambda: os.kill(os.getpid(), signal.SIGKILL))
    from pipeline.cli import cli

    cli(argv[3:], prog_name="pipeline")


if __name__ == "__main__":
    _main(sys.argv[1:])
