"""Crash-safe file writes: a temporary name, fsync, an atomic rename, a clear error when the disk is full, and
an advisory lock so that one process at a time writes a given file."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .layout import lock_file

__all__ = ["DiskFullError", "BusyError", "atomic_target", "atomic_write", "disk_full", "is_disk_full", "file_lock", "reserve",
           "temp_target", "remove_stale_temps", "file_identity", "file_sha256"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class _MessageError(OSError):
    """An OSError with its errno (``ERRNO``) whose text is the message alone, without "[Errno N]"."""

    ERRNO = 0

    def __init__(self, message: str) -> None:
        super().__init__(self.ERRNO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DiskFullError(_MessageError):
    """A write that ran out of disk space (or quota); nothing half-written is left at the target path."""

    ERRNO = errno.ENOSPC


class BusyError(_MessageError):
    """Another process holds the lock of the file this one is about to write."""

    ERRNO = errno.EBUSY


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


# ---------------------------------------------------------------- temporary files

# ``.<name>.<pid>.<8 hex>.tmp``: unique per process and per call, so that two writers never share one. The
# ``.<name>.tmp`` of earlier versions is recognised too, as a leftover to clean up.
_TEMP = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+)\.[0-9a-f]{8})?\.tmp$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temp_target(tmp: str | os.PathLike) -> tuple[Path, int | None] | None:
    """The file a temporary file of :func:`atomic_target` was to become, and the id of the process that wrote it
    (None when the name does not say); None for a name that is not such a temporary file."""
    tmp = Path(tmp)
    m = _TEMP.match(tmp.name)
    if not m:
        return None
    return tmp.with_name(m.group("name")), int(m.group("pid")) if m.group("pid") else None


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that other processes left for ``path`` (killed before they renamed them).

    Call it holding the lock of ``path`` (:func:`file_lock`): then no other process is writing it, and every
    temporary file of ``path`` but this process's own is stale.

    Returns:
        The files removed.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*tmp") if path.parent.is_dir() else ():
        found = temp_target(tmp)
        if found and found[0].name == path.name and found[1] != os.getpid():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_target(path: str | os.PathLike, *, hint: str = "", rename: Callable[[Path], Path] | None = None) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; on a clean exit it is fsynced and renamed to ``path``.

    A crash at any moment leaves either the old file or the new one at ``path``, never a part of one. The
    temporary name is unique to the process and the call, so two writers of one file never write into each
    other's. On an error the temporary file is removed; a full disk becomes :class:`DiskFullError`. For writers
    that need a file name (HDF5); :func:`atomic_write` is the same for writers that take an open file.

    Args:
        path: the final file.
        hint: appended to the disk-full message, e.g. what a re-run will do.
        rename: where the written file goes instead of ``path``, decided from it (e.g. a name made of its digest).
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible, so a power cut cannot leave it partial
            os.fsync(f.fileno())
        final = rename(tmp) if rename else path
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, hint) from e
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after it cannot bring the old name back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):  # not every filesystem syncs directories
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, hint: str = "",
                 rename: Callable[[Path], Path] | None = None) -> Path:
    """Write ``path`` through ``write(file)`` by way of :func:`atomic_target`.

    ``write`` gets an open binary file rather than a name so that every byte goes through Python, where ENOSPC
    is an OSError (given a name, torch.save writes from C++ and reports a full disk as a bare RuntimeError).

    Args:
        path: the final file (with ``rename``, the name that temporary files and messages use).
        write: writes the whole content to the binary file it is given.
        hint: appended to the disk-full message, e.g. what a re-run will do.
        rename: as for :func:`atomic_target`.

    Returns:
        The file written: ``path``, or where ``rename`` put it.
    """
    final = [Path(path)]

    def where(tmp: Path) -> Path:
        if rename:
            final[0] = rename(tmp)
        return final[0]

    with atomic_target(path, hint=hint, rename=where) as tmp, open(tmp, "xb") as f:
        write(f)
    return final[0]


def reserve(path: str | os.PathLike, nbytes: int) -> bool:
    """Allocate ``nbytes`` of disk to ``path`` now, so that writes within them cannot meet a full disk later.

    For writers that cannot survive ENOSPC (HDF5 can crash the process when a write fails at close). The file
    grows to ``nbytes`` if shorter: the writer (or the caller) cuts it to its real length at the end.

    Returns:
        Whether the room was reserved; False where the filesystem cannot allocate ahead (nothing is changed).

    Raises:
        OSError: ENOSPC or EDQUOT, when the disk has not that much room.
    """
    if nbytes <= 0:
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        return _fallocate(fd, nbytes)
    finally:
        os.close(fd)


def _fallocate(fd: int, nbytes: int) -> bool:
    """Linux's fallocate(2) over ``[0, nbytes)``: True when allocated, False where unsupported.

    Called directly rather than through ``os.posix_fallocate``, whose fallback where the filesystem cannot
    allocate (NFS v3, some FUSE mounts) writes a byte into every block: as slow as writing the file twice.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.fallocate64
    except (OSError, AttributeError):
        return False  # not Linux
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, 0, 0, nbytes) == 0:
        return True
    code = ctypes.get_errno()
    if code in _FULL:
        raise OSError(code, os.strerror(code))
    return False


# ---------------------------------------------------------------- one writer at a time

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (thread holding it, depth), for re-entry within a thread
_held_guard = threading.Lock()


@contextmanager
def file_lock(target: str | os.PathLike, *, wait: float = 0.0) -> Iterator[Path]:
    """Hold the advisory lock of ``target`` (``fcntl.flock`` on its lock file beside it) for the block.

    Every writer of a cache, a head or a fine-tune run takes it first, so a second process writing the same
    target stops with :class:`BusyError` (after up to ``wait`` seconds) instead of mixing its files with the
    first's. The lock goes with the process: a killed writer leaves no lock behind (only its empty lock file,
    which the next writer takes over); a writer that finishes removes the file. Re-entrant within a thread.

    Args:
        target: the file or folder to be written.
        wait: how long to wait for the other writer to finish before giving up, in seconds.

    Yields:
        The lock file.

    Raises:
        BusyError: another process holds the lock.
    """
    lock = lock_file(target)
    key = lock.absolute()
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None and owner[0] == me:
            _held[key] = (me, owner[1] + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lock
        finally:
            with _held_guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, target, wait)
    try:
        with suppress(OSError):  # a full disk: the lock holds all the same
            os.ftruncate(fd, 0)  # a killed writer's file may hold its id
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the other writer's message
        with _held_guard:
            _held[key] = (me, 1)
        try:
            yield lock
        finally:
            with _held_guard:
                _held.pop(key, None)
            # Removed while still held, so that a process that opened it meanwhile finds it gone once it gets
            # the lock (see _acquire), and tries again on a new one.
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def _acquire(lock: Path, target: str | os.PathLike, wait: float) -> int:
    """A descriptor of ``lock`` holding its flock, the lock file still being the one at that path."""
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = _busy_message(target, fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise BusyError(message) from None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            continue
        try:
            mine, there = os.fstat(fd), os.stat(lock)
            same = (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder it waited for removed that file on release: lock the one at the path now


def _busy_message(target: str | os.PathLike, fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().split()[0])
        who = f"another process (pid {pid})"
    except (OSError, ValueError, IndexError):
        who = "another process"
    return f"{target} is being written by {who}; wait for it to finish (or stop it), then re-run"


def file_identity(path: str | os.PathLike) -> tuple:
    """What tells a file apart from its earlier versions without reading it: its real path, inode, modification time
    and size. Files this project writes once and then replaces by renaming (caches, heads) get a new identity with
    each version, so what was read from one may be kept per identity for the length of a process."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size


def file_sha256(path: str | os.PathLike, *, remember: bool = False) -> str:
    """The sha256 of a file, read in blocks.

    Args:
        remember: keep the digest for this process, by the file's identity (inode, modification time, size), and
            answer from it while that is unchanged. For reuse checks of files written once and then replaced, never
            changed in place (heads, models): fit-head and evaluate ask for the same head's digest in one run.
            Loading a model checks its digest afresh.
    """
    if remember:
        key = file_identity(path)
        if key not in _DIGESTS:
            _DIGESTS[key] = file_sha256(path)
        return _DIGESTS[key]
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_DIGESTS: dict[tuple, str] = {}
