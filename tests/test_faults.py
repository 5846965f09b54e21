"""Fault injection: kill -9 mid-run and mid-save, a full disk, fuzzed images and label files, hostile HDF5 caches.

Whatever happens, a reader either gets a whole, valid file or a clear error; a re-run finishes the job.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.cache
from pipeline import ExtractConfig, HeadConfig, evaluate, extract, fit_head, read_cache
from pipeline.artifacts import load_finetuned, load_head
from pipeline.cache import IncompleteCacheError, PartialRun
from pipeline.cli import cli
from pipeline.files import DiskFullError
from pipeline.finetune import finetune

from bench.faults import CutAtSave, cache_rows, kill_at_save_command, kill_when, pipeline_command
from .conftest import single_threaded, tiny
from .helpers import child_env
from .test_finetune import small as small_finetune
from .test_fit import make_caches, write_features

CACHE = Path("ds/mobilenet_v2-none/classifier-input/train.h5")
EXTRACT_ARGS = ["--model", "mobilenet_v2", "--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4",
                "--workers", "0", "--engine", "eager", "--device", "cpu", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = cache_rows(a), cache_rows(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        np.testing.assert_array_equal(ra[key], rb[key])


def _leftovers(root: Path) -> list[Path]:
    """Temporary files of atomic writes under ``root``."""
    return sorted(root.rglob(".*.tmp"))


# ---------------------------------------------------------------- kill -9 during extract


# One seed in the default run: the fast representative of the real SIGKILLs (the others are marked slow).
@pytest.mark.parametrize("seed", [3, pytest.param(11, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_batch_then_rerun_equals_uninterrupted(image_folder: Path, seed: int) -> None:
    """A real SIGKILL after a random number of saved batches plus a random fraction of the next one."""
    rng = np.random.default_rng(seed)
    settings = dict(data=str(image_folder), split="train", **tiny())
    with single_threaded():
        whole = extract(ExtractConfig(**settings, cache_dir="whole"), progress=False)
    partial = PartialRun("killed" / CACHE)
    batches = int(rng.integers(0, 7))  # 27 train images: 7 batches of 4
    kill_when(pipeline_command(["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", "killed"]),
              lambda: partial.exists() and len(partial.shards()) >= batches, float(rng.uniform(0, 0.03)),
              env=child_env(OMP_NUM_THREADS="1"))
    if not partial.final.exists():
        with pytest.raises(ValueError):  # IncompleteCacheError, or no cache at all if the kill came before settings.json
            read_cache(partial.final)
    with single_threaded():
        rerun = extract(ExtractConfig(**settings, cache_dir="killed"), progress=False)
    assert rerun.status in ("extracted", "resumed", "up-to-date")
    _assert_same_cache(whole.path, rerun.path)
    assert not partial.dir.exists()


# ---------------------------------------------------------------- kill during fit-head and finetune saves


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@contextmanager
def _cut_at_save(monkeypatch: pytest.MonkeyPatch, suffix: str, point: str, nth: int = 1) -> Iterator[None]:
    """Stop the process (KeyboardInterrupt, as from Ctrl-C) at the ``nth`` atomic rename onto ``*suffix``; see bench/faults.py."""
    cut = CutAtSave(suffix, nth, point, stop=_ctrl_c)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", cut)
        yield
    assert cut.seen >= nth, f"no save onto *{suffix} happened"


@pytest.mark.parametrize("clf, artifact", [("linear", ".pt"), ("logreg", ".skops")])
@pytest.mark.parametrize("point, suffix", [("mid-write", "artifact"), ("before-rename", "artifact"), ("after-rename", "artifact"), ("mid-write", ".json")])
def test_a_head_save_cut_short_leaves_nothing_that_loads(monkeypatch: pytest.MonkeyPatch, clf: str, artifact: str, point: str, suffix: str) -> None:
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    config = HeadConfig(clf=clf, grid=(1e-3,) if clf == "linear" else (1.0,), epochs=3, train_cache=str(c.train), val_cache=str(c.val))
    with single_threaded(), _cut_at_save(monkeypatch, artifact if suffix == "artifact" else suffix, point), pytest.raises(KeyboardInterrupt):
        fit_head(config, out="heads/h")
    with pytest.raises(ValueError, match=r"no head metadata at heads/h.json; fit a head with pipeline fit-head first"):
        load_head("heads/h.json")
    assert _leftovers(Path("heads")) == []
    with single_threaded():
        fit_head(config, out="heads/h")  # a re-run writes a whole head
    assert load_head("heads/h.json").classes == c.classes


@pytest.mark.parametrize("point, suffix", [("after-rename", ".pt"), ("mid-write", ".json"), ("before-rename", ".json")])
def test_a_head_replaced_halfway_keeps_the_old_one(monkeypatch: pytest.MonkeyPatch, point: str, suffix: str) -> None:
    """Cut between the new weights and the new metadata, or within the metadata: the old head loads, whole."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    base = dict(clf="linear", epochs=3, train_cache=str(c.train), val_cache=str(c.val))
    with single_threaded():
        fit_head(HeadConfig(**base, grid=(1e-3,)), out="heads/h")
        old = load_head("heads/h.json")
        with _cut_at_save(monkeypatch, suffix, point), pytest.raises(KeyboardInterrupt):
            fit_head(HeadConfig(**base, grid=(1e-1,), seed=1), out="heads/h")
    again = load_head("heads/h.json")
    assert again.meta == old.meta and again.meta["value"] == 1e-3
    np.testing.assert_array_equal(again.pipeline.predict(c.X_val), old.pipeline.predict(c.X_val))
    assert _leftovers(Path("heads")) == []


@pytest.mark.slow  # the same cut in-process: test_a_head_save_cut_short_leaves_nothing_that_loads
def test_kill_9_while_saving_a_head(tmp_path: Path) -> None:
    """A real SIGKILL with the head's weights half written, in a child running pipeline fit-head."""
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    args = ["fit-head", "--clf", "linear", "--grid", "0.001", "--epochs", "3", "--train-cache", str(c.train), "--val-cache", str(c.val), "--output", "heads/h"]
    child = subprocess.run(kill_at_save_command(".pt", 1, "mid-write", args), capture_output=True, text=True, env=child_env())
    assert child.returncode == -signal.SIGKILL, child.stderr
    [tmp] = _leftovers(Path("heads"))  # the half-written file is there, under a temporary name of its own
    assert tmp.name.startswith(".h.pt.") and tmp.stat().st_size > 0
    with pytest.raises(ValueError, match="no head metadata"):
        load_head("heads/h.json")
    rerun = CliRunner().invoke(cli, args)
    assert rerun.exit_code == 0, rerun.output
    assert load_head("heads/h.json").meta["clf"] == "linear"
    assert _leftovers(Path("heads")) == []  # what the killed process left is cleared by the next writer


def test_finetune_cut_mid_checkpoint_resumes_and_cut_before_metadata_never_loads(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_finetune(image_folder, epochs=2)
    with single_threaded():
        with _cut_at_save(monkeypatch, "last.pt", "mid-write", nth=2), pytest.raises(KeyboardInterrupt):
            finetune(config, progress=False)
        run = Path("runs/ds/resnet18-none/finetune")
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the epoch-1 checkpoint is whole
        assert _leftovers(run) == []
        with pytest.raises(ValueError, match="no fine-tuned model metadata"):
            load_finetuned(run / "model.json")
        with _cut_at_save(monkeypatch, "model.pt", "after-rename"), pytest.raises(KeyboardInterrupt):
            finetune(config, progress=False)
        with pytest.raises(ValueError, match="no fine-tuned model metadata"):
            load_finetuned(run / "model.json")
        result = finetune(config, progress=False)
    assert result.status == "resumed" and [r["epoch"] for r in result.history] == [0, 1, 2]
    assert load_finetuned(result.path).classes == ["ant", "bee", "cat"]


@pytest.mark.slow  # the same cut in-process: test_finetune_cut_mid_checkpoint_resumes_and_cut_before_metadata_never_loads
def test_kill_9_while_saving_a_finetune_checkpoint(image_folder: Path) -> None:
    args = ["finetune", "--data", str(image_folder), "--model", "resnet18", "--weights", "none", "--crop", "32", "--resize", "36",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "2", "--no-progress"]
    child = subprocess.run(kill_at_save_command("last.pt", 2, "mid-write", args), capture_output=True, text=True,
                           env=child_env(OMP_NUM_THREADS="1"))
    assert child.returncode == -signal.SIGKILL, child.stderr
    run = Path("runs/ds/resnet18-none/finetune")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="no fine-tuned model metadata"):
        load_finetuned(run / "model.json")
    rerun = CliRunner().invoke(cli, args)
    assert rerun.exit_code == 0 and "resuming" in rerun.output, rerun.output
    assert load_finetuned(run / "model.json").meta["best_epoch"] in (1, 2)


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of a given size in KiB (root only; skips where mounting is not allowed); resize it by calling again."""
    where = tmp_path / "disk"
    mounted = []

    def mount(kib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where.mkdir(exist_ok=True)
        opts = f"remount,size={kib}k" if mounted else f"size={kib}k"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(kib)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("kib", [64, 200])  # full while saving batches; full while writing the final file
def test_extract_on_a_full_disk_fails_clearly_and_resumes_once_there_is_space(image_folder: Path, tiny_disk: Callable[[int], Path], kib: int) -> None:
    disk = tiny_disk(kib)
    settings = dict(data=str(image_folder), split="train", **tiny())
    run = CliRunner().invoke(cli, ["extract", "--data", str(image_folder), *EXTRACT_ARGS, "--cache-dir", str(disk)])
    assert run.exit_code == 1, run.output
    assert "no space left on the disk while writing" in run.output and "re-run resumes" in run.output and "Traceback" not in run.output
    partial = PartialRun(disk / CACHE)
    saved = partial.done_until()
    assert 0 < saved <= 27 and _leftovers(disk) == []
    with pytest.raises(IncompleteCacheError, match=f"stopped after {saved} images"):
        read_cache(partial.final)
    tiny_disk(4096)
    resumed = extract(ExtractConfig(**settings, cache_dir=str(disk)), progress=False)
    assert resumed.status == "resumed"
    _assert_same_cache(extract(ExtractConfig(**settings, cache_dir="whole"), progress=False).path, resumed.path)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: close() has nothing left to flush onto the full disk
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("clf", ["linear", "logreg"])
def test_fit_head_on_a_full_disk_fails_clearly(tiny_disk: Callable[[int], Path], clf: str) -> None:
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    disk = tiny_disk(64)
    filler = _fill(disk)
    args = ["fit-head", "--clf", clf, "--grid", "1", "--epochs", "2", "--train-cache", str(c.train), "--val-cache", str(c.val), "--output", str(disk / "h")]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 1 and "Error: no space left on the disk while writing" in run.output, run.output
    with pytest.raises(ValueError, match="no head metadata"):
        load_head(disk / "h.json")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    filler.unlink()
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert load_head(disk / "h.json").meta["clf"] == clf


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_simulated_at_the_write_calls(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no filesystem can be mounted: ENOSPC from the shard writer, the HDF5 writer and torch.save."""
    settings = dict(data=str(image_folder), split="train", **tiny())
    config = ExtractConfig(**settings, cache_dir="full")
    real_savez, calls = np.savez, [0]

    def savez(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            _enospc()
        return real_savez(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(np, "savez", savez)
        with pytest.raises(DiskFullError, match=r"no space left on the disk while writing .*rows-000000008-000000012.npz"):
            extract(config, progress=False)
    partial = PartialRun("full" / CACHE)
    assert partial.done_until() == 8 and _leftovers(Path("full")) == []

    real_file = h5py.File
    with monkeypatch.context() as m:
        m.setattr(pipeline.cache.h5py, "File", lambda path, mode="r", **kw: _enospc() if mode == "w" else real_file(path, mode, **kw))
        with pytest.raises(DiskFullError, match=r"while writing full/.*train.h5 .*re-run resumes"):
            extract(config, progress=False)
    with pytest.raises(IncompleteCacheError):
        read_cache(partial.final)
    assert extract(config, progress=False).status == "resumed"
    _assert_same_cache(extract(ExtractConfig(**settings, cache_dir="whole"), progress=False).path, partial.final)

    # torch.save reports ENOSPC as a RuntimeError raised while handling the OSError.
    def torch_save(obj: object, f: object) -> None:
        try:
            _enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904

    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    with monkeypatch.context() as m, single_threaded():
        m.setattr(torch, "save", torch_save)
        with pytest.raises(DiskFullError, match=r"while writing heads/h.pt"):
            fit_head(HeadConfig(clf="linear", grid=(1e-3,), epochs=2, train_cache=str(c.train), val_cache=str(c.val)), out="heads/h")
    assert not any(Path("heads").iterdir())


# ---------------------------------------------------------------- fuzzed images and label files


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds``: a hang becomes a test failure, not a stuck run."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _image_bytes(fmt: str, size: tuple[int, int] = (12, 9)) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    mode = "P" if fmt == "GIF" else "RGB"
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# A few examples in the default run, many in the slow one.
EXAMPLES = [pytest.param(25, id="25-examples"), pytest.param(300, id="300-examples", marks=pytest.mark.slow)]
VALID = {ext: _image_bytes(fmt) for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".gif", "GIF"), (".bmp", "BMP"), (".webp", "WEBP"), (".tif", "TIFF"))}


def _mangled() -> st.SearchStrategy[tuple[str, bytes]]:
    """Image files gone wrong: random bytes, or a valid image cut short, with bytes flipped, or both."""
    random_bytes = st.tuples(st.sampled_from(sorted(VALID)), st.binary(max_size=2048))

    @st.composite
    def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
        ext = draw(st.sampled_from(sorted(VALID)))
        data = bytearray(VALID[ext])
        cut = draw(st.integers(0, len(data)))
        for _ in range(draw(st.integers(0, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return ext, bytes(data[:cut] if draw(st.booleans()) else data)

    return st.one_of(random_bytes, damaged())


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzzed_image_files_decode_or_fail_clearly(tmp_path: Path, examples: int) -> None:
    """Every mangled file either decodes to an RGB image or raises UnreadableImageError, within 5 s."""
    from pipeline.data import ImageDataset, UnreadableImageError, load_rgb

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True)
    @given(_mangled())
    def check(case: tuple[str, bytes]) -> None:
        ext, data = case
        path = tmp_path / f"img{ext}"
        path.write_bytes(data)
        with _time_limit(5):
            try:
                im = load_rgb(path)
            except UnreadableImageError as e:
                assert e.path == str(path) and e.reason.startswith("cannot decode image (")
                # The dataset turns the same failure into a recorded reason, for --on-error skip.
                pos, x, reason = ImageDataset(tmp_path, [path.name], lambda im: im)[0]
                assert (pos, x, reason) == (0, None, e.reason)
            else:
                assert im.mode == "RGB" and im.width > 0 and im.height > 0

    check()


def test_an_image_declaring_a_huge_size_is_refused_quickly(tmp_path: Path) -> None:
    """A 50-byte PNG header claiming 60000 x 60000 pixels: refused before any memory is allocated for it."""
    import struct
    import zlib

    from pipeline.data import UnreadableImageError, load_rgb

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)))
    with _time_limit(5), pytest.raises(UnreadableImageError, match="cannot decode image"):
        load_rgb(tmp_path / "bomb.png")


def test_extract_skips_or_names_mangled_files(image_folder: Path) -> None:
    bad = {"trunc.png": VALID[".png"][:40], "noise.jpg": bytes(range(256)) * 3, "flipped.gif": VALID[".gif"][:10] + b"\xff" * 30}
    for name, data in bad.items():
        (image_folder / "test" / "ant" / name).write_bytes(data)
    with single_threaded():
        # Every mangled file is named at once (the scan finds broken headers before any work), or the one that fails to decode.
        with pytest.raises(ValueError, match=r"test/ant/\w+\.\w+: cannot decode image .*(; fix or remove the file|; remove or fix (it|them)), or pass --on-error skip"):
            extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)
        result = extract(ExtractConfig(data=str(image_folder), split="test", on_error="skip", **tiny(cache_dir="skip")), progress=False)
    assert result.n_images == 9 and sorted(Path(p).name for p, _ in result.skipped) == sorted(bad)
    assert all(why.startswith("cannot decode image (") for _, why in result.skipped)


def _csv_text() -> st.SearchStrategy[str]:
    """Label files: well-formed rows of hostile ids and labels, or free text with CSV punctuation."""
    pieces = [*"ab1 ,\"'\n\r\t;\\/.:\x00é😀", "..", "../", "/etc/passwd", "C:", "a" * 300]
    field = st.lists(st.sampled_from(pieces), max_size=6).map("".join)
    rows = st.lists(st.tuples(field, field), max_size=12)
    header = st.sampled_from(["id,breed\n", "breed,id\n", "id;breed\n", "\ufeffid,breed\n", "id,breed,extra\n", "", "id\n"])

    @st.composite
    def structured(draw: st.DrawFn) -> str:
        quote = lambda v: '"' + v.replace('"', '""') + '"' if draw(st.booleans()) else v  # noqa: E731
        return draw(header) + "".join(f"{quote(a)},{quote(b)}\n" for a, b in draw(rows))

    return st.one_of(structured(), st.text(max_size=300))


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzzed_label_files_give_a_split_or_a_clear_error(tmp_path: Path, examples: int) -> None:
    """Random CSV text gives a Split or a ValueError that names the labels file; never another exception or a hang."""
    from pipeline.data import DatasetSpec, Split, load_split

    root = tmp_path / "csvds"
    (root / "train").mkdir(parents=True)
    for name in ("a", "b", "a1", "b1", "1"):
        (root / "train" / f"{name}.jpg").write_bytes(VALID[".jpg"])

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True)
    @given(_csv_text(), st.sampled_from(["train", "val", "test"]))
    def check(text: str, split: str) -> None:
        (root / "labels.csv").write_text(text, encoding="utf-8", errors="surrogatepass")
        with _time_limit(5):
            try:
                out = load_split(DatasetSpec(root=str(root), labels_csv="labels.csv"), split)
            except ValueError as e:
                # It names the labels file (or the dataset), or says which classes are too small to carve.
                assert str(root) in str(e) or str(e).startswith("cannot carve a stratified"), e
                return
        assert isinstance(out, Split) and len(out.paths) == len(out.labels) == len(out.sizes)
        assert all(0 <= y < len(out.classes) for y in out.labels.tolist())
        assert all(p.startswith("train/") and ".." not in Path(p).parts for p in out.paths)

    check()


def test_label_files_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    from pipeline.data import DatasetSpec, load_split

    (tmp_path / "train").mkdir()
    (tmp_path / "labels.csv").write_bytes(b"id,breed\n\xff\xfe,\x80\n")
    with pytest.raises(ValueError, match=r"labels.csv is not UTF-8 text"):
        load_split(DatasetSpec(root=str(tmp_path), labels_csv="labels.csv"), "train")


# ---------------------------------------------------------------- hostile HDF5 files


def _replace(f: h5py.File, name: str, data: object, **kw: object) -> None:
    del f[name]
    f.create_dataset(name, data=data, **kw)


TAP = "classifier:input"
TEXT = h5py.string_dtype()
HOSTILE = {
    # name: (how the file is damaged, what the error says)
    "features-1d": (lambda f: _replace(f, f"features/{TAP}", np.zeros(12, np.float32)), r"features/classifier:input should be a floating-point array of N x D"),
    "features-int": (lambda f: _replace(f, f"features/{TAP}", np.zeros((12, 8), np.int32)), r"should be a floating-point array .* found int32"),
    "features-rows": (lambda f: _replace(f, f"features/{TAP}", np.zeros((11, 8), np.float32)), r"arrays disagree on the number of rows: labels 12, paths 12, features/classifier:input 11"),
    "paths-rows": (lambda f: _replace(f, "paths", np.asarray(["p"] * 13, dtype=object), dtype=TEXT), r"labels 12, paths 13"),
    "n_rows": (lambda f: f.attrs.__setitem__("n_rows", 1000), r"attribute n_rows 1000"),
    "n_rows-text": (lambda f: f.attrs.__setitem__("n_rows", "12"), r"attribute n_rows '12'"),
    "labels-2d": (lambda f: _replace(f, "labels", np.zeros((12, 2), np.int64)), r"'labels' should be a 1-D integer array, found int64 of shape \(12, 2\)"),
    "labels-float": (lambda f: _replace(f, "labels", np.zeros(12, np.float64)), r"'labels' should be a 1-D integer array, found float64"),
    "no-labels": (lambda f: f.__delitem__("labels"), r"it has no dataset 'labels'"),
    "no-classes": (lambda f: f.__delitem__("classes"), r"it has no dataset 'classes'"),
    "classes-numbers": (lambda f: _replace(f, "classes", np.arange(3)), r"'classes' should be a 1-D array of strings"),
    "no-classes-listed": (lambda f: _replace(f, "classes", np.asarray([], dtype=object), dtype=TEXT), r"it names no classes"),
    "skipped-mismatch": (lambda f: _replace(f, "skipped/reasons", np.asarray(["x"], dtype=object), dtype=TEXT), r"0 skipped paths for 1 reasons"),
    "no-taps": (lambda f: f.attrs.__delitem__("taps"), r"attribute 'taps' should be a JSON list of tap names, found None"),
    "taps-int": (lambda f: f.attrs.__setitem__("taps", 5), r"attribute 'taps' should be a JSON list of tap names, found 5"),
    "taps-bad-json": (lambda f: f.attrs.__setitem__("taps", '["classifier:input"'), r"""found '\["classifier:input"'"""),
    "taps-empty": (lambda f: f.attrs.__setitem__("taps", "[]"), r"found '\[\]'"),
    "taps-missing": (lambda f: f.attrs.__setitem__("taps", '["fc:output"]'), r"it has no dataset 'features/fc:output'"),
    "taps-huge": (lambda f: f.attrs.__setitem__("taps", json.dumps(["x" * 50] * 1000)), r"it has no dataset 'features/x{50}'"),
    "taps-nested": (lambda f: f.attrs.__setitem__("taps", json.dumps([{"a": [1] * 10000}])), r"found .*\(\d+ characters\)"),
    "format-array": (lambda f: f.attrs.__setitem__("format", np.array(["pipeline-features"] * 2, dtype=object)), r"is not a pipeline feature cache"),
    "version-array": (lambda f: f.attrs.__setitem__("format_version", np.array([1, 1])), r"has cache format version an array \[1, 1\]; this pipeline reads 1"),
    "version-text": (lambda f: f.attrs.__setitem__("format_version", "1"), r"has cache format version '1'"),
    "complete-text": (lambda f: f.attrs.__setitem__("complete", "yes"), r"is incomplete"),
    "complete-array": (lambda f: f.attrs.__setitem__("complete", np.array([True, True])), r"is incomplete"),
}


def _hostile(kind: str, path: Path = Path("bad/train.h5")) -> Path:
    X = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    write_features(path, X, np.repeat(np.arange(3), 4), ["a", "b", "c"])
    with h5py.File(path, "r+") as f:
        HOSTILE[kind][0](f)
    return path


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_cache_files_are_refused_with_a_clear_error(kind: str) -> None:
    path = _hostile(kind)
    with pytest.raises(ValueError, match=HOSTILE[kind][1]):
        read_cache(path)
    run = CliRunner().invoke(cli, ["info", str(path)])
    assert run.exit_code == 1 and run.output.startswith("Error: ") and "Traceback" not in run.output, run.output


@pytest.mark.parametrize("label, where", [(3, "row 5"), (-1, "row 5"), (2**40, "row 5")])
def test_labels_that_are_not_class_indices_are_refused(label: int, where: str) -> None:
    path = _hostile("n_rows")  # any valid file, then fixed up
    with h5py.File(path, "r+") as f:
        f.attrs["n_rows"] = 12
        y = f["labels"][()]
        y[5] = label
        f["labels"][...] = y
    with read_cache(path) as c, pytest.raises(ValueError, match=f"label {label} at {where} is not a class index \\(there are 3 classes\\)"):
        c.labels


def _bad_labels(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        y = f["labels"][()]
        y[0] = 7
        f["labels"][...] = y


def _nan_features(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        X = f[f"features/{TAP}"][()]
        X[4, 2] = np.nan
        f[f"features/{TAP}"][...] = X


@pytest.mark.parametrize("damage, message", [(_bad_labels, r"label 7 at row 0 is not a class index"), (_nan_features, r"NaN or inf features in 1 of \d+ rows")])
def test_fit_head_and_evaluate_refuse_damaged_caches(damage: Callable[[Path], None], message: str) -> None:
    c = make_caches(k=3, root=Path("features"))
    with single_threaded():
        head = fit_head(HeadConfig(clf="logreg", grid=(1.0,), train_cache=str(c.train), val_cache=str(c.val)), out="heads/h").path
        damage(c.test)
        with pytest.raises(ValueError, match=message):
            evaluate(head, c.test)
        damage(c.train)
        with pytest.raises(ValueError, match=message):
            fit_head(HeadConfig(clf="logreg", grid=(1.0,), train_cache=str(c.train), val_cache=str(c.val)), out="heads/h2")
        run = CliRunner().invoke(cli, ["fit-head", "--clf", "linear", "--train-cache", str(c.train), "--val-cache", str(c.val)])
    assert run.exit_code == 1 and run.output.startswith("Error: ") and "Traceback" not in run.output, run.output


def test_a_streamed_head_refuses_nan_features_without_standardization() -> None:
    c = make_caches(k=3, splits=("train", "val"), root=Path("features"))
    _nan_features(c.train)
    config = HeadConfig(clf="linear", grid=(1e-3,), epochs=2, stream=True, preprocessing="none", train_cache=str(c.train), val_cache=str(c.val))
    with pytest.raises(ValueError, match=r"NaN or inf features in the streamed cache \(first at row 4\)"):
        fit_head(config, out="heads/h")
