"""Stage one end to end: cache contents, resume after interruption, re-runs, settings checks and the Python API."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pipeline
from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.cache import IncompleteCacheError, PartialRun
from pipeline.data import load_rgb
from pipeline.engines import ONNX_TOLERANCE
from pipeline.taps import TapExtractor, resolve_taps

from bench.faults import cache_rows, kill_when, pipeline_command
from .conftest import CLASSES, make_image_folder, tiny
from .helpers import child_env


def _reference(config: ExtractConfig, paths: list[str]) -> list[np.ndarray]:
    """What the model itself computes at the taps for these images, one image at a time."""
    bb = load_backbone(config.model, config.weights, resize=config.resize, crop=config.crop)
    transform = bb.preprocess.transform()
    taps = resolve_taps(bb.model, config.layers, config.capture)
    x = torch.stack([transform(load_rgb(Path(config.data) / p)) for p in paths])
    with TapExtractor(bb.model, taps) as ex, torch.no_grad():
        return [o.numpy() for o in ex(x)]


def test_cache_holds_what_the_model_computes(image_folder: Path) -> None:
    config = ExtractConfig(data=str(image_folder), split="test", layers=("classifier:input", "features:output"), **tiny(crop=64, resize=72))
    result = extract(config, progress=False)
    assert result.status == "extracted" and result.n_images == 9
    with read_cache(result.path) as c:
        assert c.taps == ["classifier:input", "features:output"]
        assert c.classes == list(CLASSES)
        assert c.paths == [f"test/{cls}/{i:03d}.png" for cls in CLASSES for i in range(3)]
        assert c.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        pooled, spatial = c.features("classifier:input"), c.features("features:output")
        a = c.attrs
    ref_pooled, ref_spatial = _reference(config, [f"test/{cls}/{i:03d}.png" for cls in CLASSES for i in range(3)])
    np.testing.assert_allclose(pooled, ref_pooled, rtol=0, atol=1e-5)
    np.testing.assert_allclose(spatial, ref_spatial, rtol=0, atol=1e-5)
    assert spatial.shape == (9, 1280, 2, 2) and pooled.shape == (9, 1280)
    assert a["model"] == "mobilenet_v2" and a["weights"] == "none" and a["image_size"] == 64
    assert a["preprocess"]["crop"] == 64 and a["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert a["split_seed"] == 0 and len(a["dataset_fingerprint"]) == 64
    assert {"torch", "torchvision", "numpy", "h5py", "pipeline"} <= set(a["versions"])
    assert result.path == Path("features/ds/mobilenet_v2-none/classifier-input+features-output/test.h5")


def test_onnx_engine_matches_eager_within_tolerance(image_folder: Path) -> None:
    pytest.importorskip("onnxruntime")
    eager = extract(ExtractConfig(data=str(image_folder), split="test", **tiny(cache_dir="eager")), progress=False)
    fast = extract(ExtractConfig(data=str(image_folder), split="test", **tiny(engine="onnx", cache_dir="onnx")), progress=False)
    assert fast.engine == "onnx-batches"  # the default way to use the cores
    a, b = cache_rows(eager.path), cache_rows(fast.path)
    feats_a, feats_b = a["classifier:input"], b["classifier:input"]
    assert np.max(np.abs(feats_a - feats_b)) <= ONNX_TOLERANCE * max(1.0, np.abs(feats_a).max())
    assert (a["paths"] == b["paths"]).all()


def test_amp_switch_runs_bf16_channels_last_on_cpu(image_folder: Path) -> None:
    ref = extract(ExtractConfig(data=str(image_folder), split="test", **tiny(cache_dir="fp32")), progress=False)
    amp = extract(ExtractConfig(data=str(image_folder), split="test", amp=True, **tiny(cache_dir="amp")), progress=False)
    with read_cache(amp.path) as c:
        assert "bf16" in c.attrs["runtime"] and c.attrs["settings"]["amp"] is True
    a, b = cache_rows(ref.path)["classifier:input"], cache_rows(amp.path)["classifier:input"]
    assert not np.array_equal(a, b)  # the switch really changed the arithmetic
    np.testing.assert_allclose(b, a, rtol=0.1, atol=0.1 * np.abs(a).max())


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, target: object, name: str, calls: int) -> None:
    """Make ``target.name`` raise KeyboardInterrupt on its ``calls``-th call, like Ctrl-C at that moment."""
    original = getattr(target, name)
    count = {"n": 0}

    def wrapped(*args: object, **kwargs: object) -> object:
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("where", ["batch-boundary", "mid-batch"])
def test_resume_after_interruption_equals_uninterrupted(image_folder: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    settings = dict(data=str(image_folder), split="train", **tiny(batch_size=5))
    whole = extract(ExtractConfig(**settings, cache_dir="whole"), progress=False)

    config = ExtractConfig(**settings, cache_dir="resumed")
    with monkeypatch.context() as m:
        if where == "batch-boundary":
            _interrupt_after(m, PartialRun, "write", 3)  # two batches saved, stopped before the third is saved
        else:
            _interrupt_after(m, pipeline.data, "load_rgb", 13)  # stopped while decoding the third batch
        with pytest.raises(KeyboardInterrupt):
            extract(config, progress=False)
    partial = PartialRun(Path("resumed/ds/mobilenet_v2-none/classifier-input/train.h5"))
    assert partial.done_until() == 10
    # A shard half-written at the moment of the kill is ignored.
    (partial.dir / ".rows-000000010-000000015.npz.tmp").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IncompleteCacheError, match="stopped after 10 images; re-run pipeline extract with the same settings"):
        read_cache(partial.final)

    calls = {"n": 0}
    original = pipeline.data.load_rgb
    monkeypatch.setattr(pipeline.data, "load_rgb", lambda p: (calls.__setitem__("n", calls["n"] + 1), original(p))[1])
    resumed = extract(config, progress=False)
    assert resumed.status == "resumed"
    assert calls["n"] == 27 - 10  # only the images after the last saved batch were decoded again
    a, b = cache_rows(whole.path), cache_rows(resumed.path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not partial.dir.exists()


@pytest.mark.slow  # fast representative: test_faults.py::test_kill_9_at_a_random_batch_then_rerun_equals_uninterrupted[3]
def test_kill_9_then_rerun_equals_uninterrupted(image_folder: Path, tmp_path: Path) -> None:
    """A real SIGKILL in a child process, at a time when some batches are saved and others not."""
    make_image_folder(image_folder, {"train": 30})  # more images, so the kill lands mid-run
    cmd = pipeline_command(["extract", "--data", str(image_folder), "--model", "mobilenet_v2",
                            "--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4", "--workers", "0",
                            "--engine", "eager", "--device", "cpu", "--no-progress"])
    whole = subprocess.run([*cmd, "--cache-dir", "whole"], capture_output=True, text=True, env=child_env(PIPELINE_OFFLINE="1"))
    assert whole.returncode == 0, whole.stderr
    partial = PartialRun(Path("killed/ds/mobilenet_v2-none/classifier-input/train.h5"))
    kill_when([*cmd, "--cache-dir", "killed"], lambda: partial.dir.is_dir() and len(partial.shards()) >= 3, env=child_env(PIPELINE_OFFLINE="1"))
    done = partial.done_until()
    assert 0 < done < 81, "the kill should land mid-run"
    with pytest.raises(IncompleteCacheError):
        read_cache(partial.final)
    rerun = subprocess.run([*cmd, "--cache-dir", "killed"], capture_output=True, text=True, env=child_env(PIPELINE_OFFLINE="1"))
    assert rerun.returncode == 0 and "resumed" in rerun.stdout, rerun.stderr
    a = cache_rows(Path("whole/ds/mobilenet_v2-none/classifier-input/train.h5"))
    b = cache_rows(partial.final)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_rerun_is_a_no_op_and_other_settings_are_refused_unless_forced(image_folder: Path) -> None:
    config = ExtractConfig(data=str(image_folder), split="test", **tiny())
    first = extract(config, progress=False)
    before = first.path.stat().st_mtime_ns
    again = extract(config, progress=False)
    assert again.status == "up-to-date" and again.n_images == 9 and first.path.stat().st_mtime_ns == before
    # Speed settings are not part of what a cache is: another batch size is still up to date.
    assert extract(ExtractConfig(data=str(image_folder), split="test", **tiny(batch_size=2)), progress=False).status == "up-to-date"

    other = ExtractConfig(data=str(image_folder), split="test", **tiny(dtype="float16"))
    with pytest.raises(ValueError, match=r"test.h5 was made with other settings \(dtype: 'float32' -> 'float16'\); pass --force to overwrite it"):
        extract(other, progress=False)
    forced = extract(other, force=True, progress=False)
    assert forced.status == "extracted"
    with read_cache(forced.path) as c:
        assert c.features().dtype == np.float16
    stamp = forced.path.stat().st_mtime_ns
    assert extract(other, force=True, progress=False).status == "up-to-date" and forced.path.stat().st_mtime_ns == stamp  # make extract's --force


def test_changed_dataset_is_a_different_setting(image_folder: Path) -> None:
    config = ExtractConfig(data=str(image_folder), split="test", **tiny())
    extract(config, progress=False)
    make_image_folder(image_folder, {"test": 4}, seed=5)  # one more image per class
    with pytest.raises(ValueError, match=r"dataset_fingerprint: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        extract(config, progress=False)


def test_partial_run_with_other_settings_is_refused(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _interrupt_after(m, PartialRun, "write", 2)
        with pytest.raises(KeyboardInterrupt):
            extract(ExtractConfig(data=str(image_folder), split="train", **tiny()), progress=False)
    with pytest.raises(ValueError, match=r"an interrupted extraction in .*train.h5.partial used other settings \(preprocess.crop: 32 -> 40; preprocess.resize: 36 -> 45\); pass --force to discard it"):
        extract(ExtractConfig(data=str(image_folder), split="train", **tiny(crop=40, resize=45)), progress=False)


def test_readers_refuse_incomplete_and_foreign_files(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.attrs["format"], f.attrs["format_version"], f.attrs["complete"] = "pipeline-features", 1, False
    with pytest.raises(IncompleteCacheError, match="half.h5 is incomplete"):
        read_cache(tmp_path / "half.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="other.h5 is not a pipeline feature cache"):
        read_cache(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="cannot open .*junk.h5 as HDF5"):
        read_cache(tmp_path / "junk.h5")
    with pytest.raises(ValueError, match="no feature cache at .*missing.h5; run pipeline extract first"):
        read_cache(tmp_path / "missing.h5")


def test_float16_gzip_and_spatial_chunks(image_folder: Path) -> None:
    config = ExtractConfig(data=str(image_folder), split="test", layers=("features.18",), dtype="float16", compression="gzip", **tiny(crop=64, resize=72))
    result = extract(config, progress=False)
    with read_cache(result.path) as c:
        d = c.dataset()
        assert d.shape == (9, 1280, 2, 2) and d.dtype == np.float16 and d.compression == "gzip"
        assert d.chunks[1:] == (1280, 2, 2)
        ref = _reference(config, c.paths)[0]
        np.testing.assert_allclose(c.features().astype(np.float32), ref, rtol=1e-3, atol=1e-3)


def test_python_api_and_cli_share_defaults(image_folder: Path) -> None:
    """The CLI with only the required options makes the very cache the API makes with its defaults."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    args = ["--data", str(image_folder), "--weights", "none", "--crop", "32", "--resize", "36", "--workers", "0", "--device", "cpu", "--no-progress"]
    run = CliRunner().invoke(cli, ["extract", *args])
    assert run.exit_code == 0, run.output
    result = pipeline.extract(pipeline.ExtractConfig(data=str(image_folder), weights="none", crop=32, resize=36, workers=0, device="cpu"), progress=False)
    assert result.status == "up-to-date"
    assert result.path == Path("features/ds/mobilenet_v2-none/classifier-input/train.h5")
    assert f"train: {result.path}" in run.output


@pytest.mark.parametrize("engine", ["eager", "onnx"])
def test_several_splits_share_one_backbone_and_engine_and_equal_one_split_at_a_time(image_folder: Path, engine: str,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    engines, extract_module = importlib.import_module("pipeline.engines"), importlib.import_module("pipeline.extract")
    separate = ExtractConfig(data=str(image_folder), cache_dir="one", **tiny(engine=engine))
    for split in ("train", "val", "test"):
        extract(ExtractConfig(**{**separate.__dict__, "split": split}), progress=False)
    built = {"backbone": 0, "engine": 0}

    def counting(name: str, real: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            built[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(extract_module, "load_backbone", counting("backbone", extract_module.load_backbone))
    monkeypatch.setattr(engines, "make_engine", counting("engine", engines.make_engine))
    together = pipeline.extract_splits(ExtractConfig(data=str(image_folder), cache_dir="all", **tiny(engine=engine)), progress=False)
    assert [r.split for r in together] == ["train", "val", "test"] and all(r.status == "extracted" for r in together)
    assert built == {"backbone": 1, "engine": 1}
    for result in together:
        mine = Path("one") / result.path.relative_to("all")
        with read_cache(result.path) as a, read_cache(mine) as b:
            assert a.paths == b.paths and a.attrs["settings"] == b.attrs["settings"]
            np.testing.assert_array_equal(a.features(a.taps[0]), b.features(b.taps[0]))
