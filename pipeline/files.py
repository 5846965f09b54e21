"""Crash-safe file writes: a temporary name, fsync, an atomic rename, and a clear error when the disk is full."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["DiskFullError", "atomic_target", "atomic_write", "disk_full", "is_disk_full"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that ran out of disk space (or quota); nothing half-written is left at the target path."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is ENOSPC/EDQUOT.

    torch.save reports a full disk as a RuntimeError whose context holds the OSError, so the chain is walked.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        # HDF5 reports a failed write as an OSError or RuntimeError without errno, naming the cause in its text.
        if any(os.strerror(code) in str(e) for code in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(path: str | os.PathLike, hint: str = "") -> DiskFullError:
    """The error for a write to ``path`` that found no space, saying how much is free there."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on the disk while writing {path} ({free}); free some space and re-run{hint}")


@contextmanager
def atomic_target(path: str | os.PathLike, *, hint: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; on a clean exit it is fsynced and renamed to ``path``.

    A crash at any moment leaves either the old file or the new one at ``path``, never a part of one. On an
    error the temporary file is removed; a full disk becomes :class:`DiskFullError`. For writers that need a
    file name (HDF5); :func:`atomic_write` is the same for writers that take an open file.

    Args:
        path: the final file.
        hint: appended to the disk-full message, e.g. what a re-run will do.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible, so a power cut cannot leave it partial
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, hint) from e
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, hint: str = "") -> Path:
    """Write ``path`` through ``write(file)`` by way of :func:`atomic_target`.

    ``write`` gets an open binary file rather than a name so that every byte goes through Python, where ENOSPC
    is an OSError (given a name, torch.save writes from C++ and reports a full disk as a bare RuntimeError).

    Args:
        path: the final file.
        write: writes the whole content to the binary file it is given.
        hint: appended to the disk-full message, e.g. what a re-run will do.

    Returns:
        ``path``.
    """
    with atomic_target(path, hint=hint) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)
