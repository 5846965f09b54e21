"""Data safety: a head is replaced as one unit, one process at a time writes a cache, a head or a fine-tune run,
``extract --force`` keeps the old cache until the new one is whole, and a disk that fills during the HDF5 write
ends in one clear line, never a crash.

Kills and concurrency run real processes; the slow variants repeat them (``-m slow``).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline.artifacts
import pipeline.files
from pipeline import ExtractConfig, HeadConfig, extract, fit_head, read_cache
from pipeline.artifacts import load_head
from pipeline.cache import PartialRun, write_features
from pipeline.cli import cli
from pipeline.files import BusyError, DiskFullError, atomic_target, atomic_write, file_lock, temp_target
from pipeline.layout import lock_file

from .conftest import single_threaded, tiny
from .helpers import child_env
from . import test_faults
from bench.faults import cache_rows, kill_at_save_command

from .test_faults import CACHE, EXTRACT_ARGS, _assert_same_cache, _cut_at_save, _fill, _leftovers
from .test_fit import make_caches

tiny_disk = test_faults.tiny_disk  # the fixture: a small tmpfs (root only)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_threaded():
        yield


def _env() -> dict[str, str]:
    return {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _head_args(c: object, grid: str = "0.001", out: str = "heads/h") -> list[str]:
    return ["fit-head", "--clf", "linear", "--grid", grid, "--epochs", "3", "--train-cache", str(c.train), "--val-cache", str(c.val), "--output", out]


def _predict(meta: str | Path, X: np.ndarray) -> np.ndarray:
    return load_head(meta).pipeline.predict(X)


# ---------------------------------------------------------------- a head replaced as one unit


def test_a_head_replaced_after_a_kill_9_between_its_files_is_the_old_one_until_a_rerun() -> None:
    """A real SIGKILL right after the new weights are renamed into place: the old head still loads, whole."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    assert CliRunner().invoke(cli, _head_args(c)).exit_code == 0
    old = load_head("heads/h.json")
    new_args = _head_args(c, grid="0.1")
    child = subprocess.run(kill_at_save_command(".pt", 1, "after-rename", new_args), capture_output=True, text=True, env=_env())
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(list(Path("heads").glob("h.*.pt"))) == 2  # the old head's file and the new one's, side by side
    kept = load_head("heads/h.json")
    assert kept.meta == old.meta
    np.testing.assert_array_equal(kept.pipeline.predict(c.X_val), old.pipeline.predict(c.X_val))
    rerun = CliRunner().invoke(cli, new_args)
    assert rerun.exit_code == 0, rerun.output
    assert load_head("heads/h.json").meta["value"] == 0.1
    # Once the new metadata is in place, the old file goes.
    assert [p.name for p in Path("heads").glob("h.*.pt")] == [load_head("heads/h.json").meta["artifact"]]


def _no_room_for(suffix: str) -> Callable:
    """An atomic_write that finds the disk full when it writes a file ending in ``suffix``."""
    real = atomic_write

    def write(path: object, fn: Callable, **kw: object) -> Path:
        if str(path).endswith(suffix):
            def full(f: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, full, **kw)
        return real(path, fn, **kw)

    return write


def test_a_head_whose_metadata_finds_the_disk_full_leaves_the_old_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new weights fit, the metadata does not: a clear error, the old head as it was, nothing of the new one."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    base = dict(clf="linear", epochs=3, train_cache=str(c.train), val_cache=str(c.val))
    fit_head(HeadConfig(**base, grid=(1e-3,)), out="heads/h")
    before = sorted(p.name for p in Path("heads").iterdir())
    old = load_head("heads/h.json")
    monkeypatch.setattr(pipeline.artifacts, "atomic_write", _no_room_for(".json"))
    with pytest.raises(DiskFullError, match=r"no space left on the disk while writing heads/h.json"):
        fit_head(HeadConfig(**base, grid=(1e-1,), seed=1), out="heads/h")
    assert sorted(p.name for p in Path("heads").iterdir()) == before
    assert load_head("heads/h.json").meta == old.meta


def test_a_head_replaced_on_a_nearly_full_disk_is_always_whole(tiny_disk: Callable[[int], Path]) -> None:
    """A real full disk at every size from none to enough: the head on disk is the old one or the new one, whole."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    disk = tiny_disk(512)
    args = lambda grid: [*_head_args(c, grid=grid, out=str(disk / "h"))]  # noqa: E731
    assert CliRunner().invoke(cli, args("0.001")).exit_code == 0
    value = 0.001
    cases = set()
    for i, free in enumerate(range(0, 32 * 1024, 4096)):
        grid = f"0.0{i + 2}"
        filler = _fill(disk)
        os.truncate(filler, filler.stat().st_size - free)
        run = CliRunner().invoke(cli, args(grid))
        if run.exit_code == 0:
            cases.add("replaced")
        else:
            assert "no space left on the disk while writing" in run.output and "Traceback" not in run.output, run.output
            cases.add(run.output.split("while writing ")[1].split(" ")[0].rsplit(".", 1)[-1])
        head = load_head(disk / "h.json")  # never refused: the old head or the new one, whole
        assert head.meta["value"] in (value, float(grid)) and head.pipeline.predict(c.X_val).shape == (len(c.X_val),)
        value = head.meta["value"]
        assert _leftovers(disk) == [] and len(list(disk.glob("h.*.pt"))) == 1
        filler.unlink()
    assert {"pt", "json", "replaced"} <= cases, cases  # full at the weights, at the metadata, and room for both


def test_a_reader_of_a_head_being_replaced_gets_the_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The metadata read, then the head replaced (its old file removed) before the file is read: loaded afresh."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    base = dict(clf="linear", epochs=3, train_cache=str(c.train), val_cache=str(c.val))
    fit_head(HeadConfig(**base, grid=(1e-3,)), out="heads/h")
    stale = json.loads(Path("heads/h.json").read_text())
    fit_head(HeadConfig(**base, grid=(1e-1,)), out="heads/h")
    real, calls = pipeline.artifacts.read_meta, []

    def read_meta(*args: object) -> tuple[Path, dict]:
        calls.append(1)
        meta_path, meta = real(*args)
        return (meta_path, stale) if len(calls) == 1 else (meta_path, meta)

    monkeypatch.setattr(pipeline.artifacts, "read_meta", read_meta)
    assert load_head("heads/h.json").meta["value"] == 0.1


# ---------------------------------------------------------------- one writer at a time

HOLDER = """
import sys
from pipeline.files import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _hold(target: Path) -> subprocess.Popen:
    """Another process holding the lock of ``target`` until its stdin closes (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_temporary_names_are_unique_to_the_process_and_the_call(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with atomic_target(target) as a, atomic_target(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert temp_target(a) == temp_target(b) == (target, os.getpid())
        a.write_bytes(b"first")
        b.write_bytes(b"second")
    assert target.read_bytes() == b"first" and _leftovers(tmp_path) == []  # the last renamed wins, whole
    assert temp_target(tmp_path / ".f.bin.tmp") == (target, None)  # the name of earlier versions
    assert temp_target(tmp_path / "f.bin") is None


def test_the_lock_is_exclusive_reentrant_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.h5"
    with file_lock(target) as lock:
        assert lock == lock_file(target) == tmp_path / ".cache.h5.lock"
        with file_lock(target):  # the same thread again: fit_head, then save_head within it
            pass
        assert lock.exists()
    assert not lock.exists()
    holder = _hold(target)
    try:
        with pytest.raises(BusyError, match=rf"cache.h5 is being written by another process \(pid {holder.pid}\); wait for it to finish"):
            with file_lock(target):
                pass
        t0 = time.monotonic()
        with pytest.raises(BusyError):
            with file_lock(target, wait=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        holder.kill()
        holder.wait()
    with file_lock(target):  # a killed holder leaves its file, not its lock
        pass
    assert not lock_file(target).exists()


@pytest.mark.parametrize("what", ["fit-head", "extract"])
def test_a_second_writer_stops_with_one_clear_line(image_folder: Path, what: str) -> None:
    if what == "fit-head":
        c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
        args, target = _head_args(c), Path("heads/h.json")
    else:
        args, target = ["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", "feats"], "feats" / CACHE
    target.parent.mkdir(parents=True, exist_ok=True)
    holder = _hold(target)
    try:
        run = CliRunner().invoke(cli, args)
        assert run.exit_code == 1, run.output
        assert run.output == f"Error: {target} is being written by another process (pid {holder.pid}); wait for it to finish (or stop it), then re-run\n"
        assert sorted(p.name for p in target.parent.iterdir()) == [lock_file(target).name]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    assert not lock_file(target).exists()


def test_a_second_finetune_in_the_same_folder_stops(image_folder: Path) -> None:
    from pipeline.finetune import finetune

    from .test_finetune import small

    run = Path("runs/ds/resnet18-none/finetune")
    run.parent.mkdir(parents=True)
    holder = _hold(run)
    try:
        with pytest.raises(BusyError, match=rf"finetune is being written by another process \(pid {holder.pid}\)"):
            finetune(small(image_folder, epochs=1), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not run.exists()


def test_partial_runs_clear_the_temporary_shards_of_their_range_only(tmp_path: Path) -> None:
    partial = PartialRun(tmp_path / "train.h5")
    partial.start({"a": 1})
    names = [".rows-000000000-000000004.npz.123.0a1b2c3d.tmp", ".rows-000000000-000000004.npz.tmp", ".rows-000000008-000000012.npz.99.ffffffff.tmp"]
    for name in names:
        (partial.dir / name).write_bytes(b"half")
    assert partial.missing(0, 8) == [(0, 8)]
    assert sorted(p.name for p in partial.dir.glob(".*.tmp")) == [names[2]]  # another rank's range is left alone


def _concurrently(args: list[list[str]], stagger: float = 0.0) -> list[subprocess.CompletedProcess]:
    children = []
    for a in args:
        children.append(subprocess.Popen([sys.executable, "-m", "pipeline", *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        time.sleep(stagger)
    return [subprocess.CompletedProcess(ch.args, ch.wait(), *ch.communicate()) for ch in children]


def _busy_or_done(run: subprocess.CompletedProcess) -> str:
    """``ok``, or ``busy`` for the one-line refusal; anything else fails the test."""
    if run.returncode == 0:
        return "ok"
    assert run.returncode == 1 and "is being written by another process" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    return "busy"


@pytest.mark.slow
@pytest.mark.parametrize("stagger", [0.0, 0.3, 1.0])
def test_two_fit_head_processes_on_one_head(stagger: float) -> None:
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    ends = [_busy_or_done(r) for r in _concurrently([_head_args(c), _head_args(c)], stagger)]
    assert "ok" in ends
    head = load_head("heads/h.json")  # whole: its digest matches
    assert head.meta["value"] == 0.001 and _leftovers(Path("heads")) == [] and not lock_file("heads/h.json").exists()


@pytest.mark.slow
def test_two_extract_processes_on_one_split(image_folder: Path) -> None:
    args = ["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", "feats"]
    ends = [_busy_or_done(r) for r in _concurrently([args, args], 0.5)]
    assert "ok" in ends
    whole = extract(ExtractConfig(data=str(image_folder), split="train", **tiny(cache_dir="whole")), progress=False)
    _assert_same_cache(whole.path, "feats" / CACHE)
    assert _leftovers(Path("feats")) == [] and not PartialRun("feats" / CACHE).dir.exists()


# ---------------------------------------------------------------- extract --force keeps the old cache until the new one is whole


def test_an_interrupted_force_keeps_the_old_cache_readable(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(data=str(image_folder), split="train", **tiny(cache_dir="feats"))
    old = extract(ExtractConfig(**settings), progress=False).path
    before = cache_rows(old)
    reader = read_cache(old)  # a reader of the old cache, open throughout
    try:
        with _cut_at_save(monkeypatch, "train.h5", "before-rename"), pytest.raises(KeyboardInterrupt):
            extract(ExtractConfig(**settings, dtype="float16"), force=True, progress=False)
        for key, value in cache_rows(old).items():  # still there, whole, the old one
            np.testing.assert_array_equal(value, before[key])
        assert PartialRun(old).exists() and _leftovers(Path("feats")) == []
        with pytest.raises(ValueError, match=r"pass --force to overwrite it \(and to finish the interrupted run that began to\)"):
            extract(ExtractConfig(**settings, dtype="float16"), progress=False)
        new = extract(ExtractConfig(**settings, dtype="float16"), force=True, progress=False)
        assert new.status == "resumed" and new.n_computed == 0  # every batch was kept
        with read_cache(old) as cache:
            assert cache.dataset().dtype == np.float16
        np.testing.assert_array_equal(reader.features(), before[reader.taps[0]])  # the open reader still reads the old file
    finally:
        reader.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_extract_force_leaves_the_old_or_the_new_cache(image_folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    args = ["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", "feats"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    old = cache_rows("feats" / CACHE)
    new_args = [*args, "--dtype", "float16", "--force"]
    child = subprocess.Popen([sys.executable, "-m", "pipeline", *new_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    time.sleep(float(rng.uniform(2.0, 8.0)))
    child.send_signal(signal.SIGKILL)
    child.wait()
    now = cache_rows("feats" / CACHE)  # never missing, never partial
    if now["classifier:input"].dtype == np.float32:
        for key in old:
            np.testing.assert_array_equal(now[key], old[key])
    assert CliRunner().invoke(cli, new_args).exit_code == 0
    with read_cache("feats" / CACHE) as cache:
        assert cache.dataset().dtype == np.float16


# ---------------------------------------------------------------- a full disk during the HDF5 write

# Writes a cache with write_features on DISK while the free-space check is told there is plenty of room, as if
# the disk filled up between the check and the write. Prints the error's one line and exits 1, like the CLI.
FULL_AFTER_CHECK = """
import shutil, sys
from collections import namedtuple
import numpy as np
import pipeline.cache
from pipeline.files import DiskFullError
pipeline.shards.shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(2**40, 0, 2**40)
X = np.random.default_rng(0).normal(size=(int(sys.argv[2]), 256)).astype(np.float32)
try:
    pipeline.cache.write_features(sys.argv[1], X, np.arange(len(X)) % 3, ["a", "b", "c"], {"model": "m"}, block_rows=500)
except DiskFullError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_a_full_disk_at_the_reservation_of_the_hdf5_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no filesystem can be mounted: the reservation finds no room, before HDF5 writes anything."""
    X = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    with monkeypatch.context() as m:
        m.setattr(pipeline.files, "_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(DiskFullError, match=r"while writing c/train.h5 .*the final file needs about [\d.]+ MiB; the batches already saved are kept"):
            write_features("c/train.h5", X, np.arange(40) % 3, ["a", "b", "c"], {"model": "m"}, block_rows=16)
    assert PartialRun(Path("c/train.h5")).rows_done() == 40 and _leftovers(Path("c")) == [] and not Path("c/train.h5").exists()
    with read_cache(write_features("c/train.h5", X, np.arange(40) % 3, ["a", "b", "c"], {"model": "m"})) as cache:
        assert len(cache) == 40


def test_a_disk_that_fills_after_the_free_space_check_ends_in_one_line_not_a_crash(tiny_disk: Callable[[int], Path]) -> None:
    disk = tiny_disk(3 * 1024)  # the 2000 x 256 float32 batches fit (2 MiB); the final file beside them does not
    child = subprocess.run([sys.executable, "-c", FULL_AFTER_CHECK, str(disk / "c.h5"), "2000"], capture_output=True, text=True, env=_env())
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert child.stderr.startswith("Error: no space left on the disk while writing") and len(child.stderr.splitlines()) == 1, child.stderr[-2000:]
    assert PartialRun(disk / "c.h5").rows_done() == 2000 and _leftovers(disk) == [] and not (disk / "c.h5").exists()
    tiny_disk(8 * 1024)
    again = subprocess.run([sys.executable, "-c", FULL_AFTER_CHECK, str(disk / "c.h5"), "2000"], capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr
    with read_cache(disk / "c.h5") as cache:
        assert len(cache) == 2000
    assert (disk / "c.h5").stat().st_size < 2.2 * 2**20  # what the reservation did not use is given back


@pytest.mark.slow
def test_extract_on_a_disk_that_fills_after_the_check_resumes(image_folder: Path, tiny_disk: Callable[[int], Path]) -> None:
    disk = tiny_disk(1024)
    wrapper = ("import sys, collections, pipeline.cache\n"
               "pipeline.shards.shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(2**40, 0, 2**40)\n"
               "from pipeline.cli import cli\ncli(sys.argv[1:], prog_name='pipeline')\n")
    args = ["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", str(disk)]
    child = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=_env())
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert child.stderr.startswith("Error: no space left on the disk while writing") and "re-run resumes" in child.stderr, child.stderr[-2000:]
    assert "dealloc" not in child.stderr and len(child.stderr.strip().splitlines()) == 1
    assert PartialRun(disk / CACHE).done_until() == 27
    tiny_disk(8 * 1024)
    resumed = extract(ExtractConfig(data=str(image_folder), split="train", **tiny(cache_dir=str(disk))), progress=False)
    assert resumed.status == "resumed" and resumed.n_computed == 0
    _assert_same_cache(extract(ExtractConfig(data=str(image_folder), split="train", **tiny(cache_dir="whole")), progress=False).path, resumed.path)


def test_a_remembered_digest_follows_the_file_when_it_is_rewritten_or_replaced(tmp_path: Path) -> None:
    import hashlib
    import os

    from pipeline.files import file_sha256

    path = tmp_path / "head.skops"
    path.write_bytes(b"first")
    assert file_sha256(path, remember=True) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")  # rewritten in place: another size
    assert file_sha256(path, remember=True) == hashlib.sha256(b"second, longer").hexdigest()
    other = tmp_path / "new"
    other.write_bytes(b"third!")  # the same size as "first", renamed over it: another inode
    os.replace(other, path)
    assert file_sha256(path, remember=True) == hashlib.sha256(b"third!").hexdigest() == file_sha256(path)
