"""JPEG files decoded on the device (``decode="device"``), run on the CPU: the pixels within a few grey levels of PIL's
and the features within a stated tolerance of the host path's, EXIF orientation, files told apart by their bytes, a
corrupt JPEG under both ``on_error`` choices, and the choice recorded in the cache's settings."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.backbones import Preprocess
from pipeline.data import ImageDataset, load_rgb
from pipeline.images import jpeg_orientation
from pipeline.engines import EagerEngine
from pipeline.runtime import BatchInputs, EncodedBatch, Runtime, resolve_runtime
from pipeline.taps import TapExtractor, resolve_taps

from bench.faults import cache_rows
from bench.synthetic import CLASSES, natural_jpeg
from .conftest import make_image_folder, tiny
from .helpers import error, invoke, ok

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on the CPU (measurement runs, not these tests): PIL and torchvision both decode with libjpeg-turbo and gave
# the same pixels on 20 generated photos; torch's antialiased resize against PIL's moved at most 1 grey level, in 0.2-3 %
# of the values. The features of the random-weight MobileNetV2 at 32 px differed by at most 2.5e-3 of the largest
# feature on these tests' photos and 1.0e-2 on 40 photos of assorted sizes (30-200 px); the real ImageNet MobileNetV2 at
# 224 px, on 24 photos of 375 x 500 and 500 x 375, by 1.8e-3. Another image's features differ by 0.38-0.59 of the
# largest. nvJPEG on a GPU was not measured.
PIXEL_LEVELS = 1
PIXEL_SHARE = 0.05  # of the values that differ at all
FEATURE_TOLERANCE = 2e-2

# Sizes (height, width): taller, wider, odd, square, and smaller than the resize (upscaled).
_SIZES = [(60, 80), (80, 60), (47, 71), (64, 64), (30, 40)]


def _with_orientation(data: bytes, orientation: int) -> bytes:
    """A JPEG file's bytes with an EXIF orientation tag inserted (an APP1 segment after the start-of-image marker)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    payload = exif.tobytes()
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, orientations: list[int] | None = None) -> list[str]:
    """Photo-like JPEGs (bench/synthetic.py) written to ``folder``, one per size; returns their names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, size in enumerate(sizes):
        data = natural_jpeg(rng, size)
        if orientations:
            data = _with_orientation(data, orientations[k])
        names.append(f"{k:03d}.jpg")
        (folder / names[-1]).write_bytes(data)
    return names


def _batches(preprocess: Preprocess, root: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the host path's batch, the device path's, on the CPU), float32 and normalised, one row per file."""
    host = BatchInputs(preprocess)
    want = host.collate([ImageDataset(root, names, host.transform)[i] for i in range(len(names))])[1]
    device = BatchInputs(preprocess, decode="device")
    collated = device.collate([ImageDataset(root, names, device.transform, encoded_jpegs=True)[i] for i in range(len(names))])
    assert isinstance(collated[1], EncodedBatch)  # the workers read the JPEGs and left them encoded
    index, got, bad = device.decode(collated, torch.device("cpu"))
    assert index.tolist() == list(range(len(names))) and bad == []
    return want, got


def _grey_levels(x: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """Normalised pixels back on the 0..255 scale."""
    return (x * torch.tensor(p.std).view(1, 3, 1, 1) + torch.tensor(p.mean).view(1, 3, 1, 1)) * 255


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_device_decoding_is_within_a_few_grey_levels_and_the_features_within_tolerance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bb = load_backbone("mobilenet_v2", "none", resize=36, crop=32)
    names = _photos(tmp_path, _SIZES * 2)
    want, got = _batches(bb.preprocess, tmp_path, names)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(names), 3, 32, 32)
    levels = (_grey_levels(got, bb.preprocess) - _grey_levels(want, bb.preprocess)).abs()
    assert float(levels.max()) <= PIXEL_LEVELS + 1e-3 and float((levels > 0.5).float().mean()) < PIXEL_SHARE
    runtime = Runtime(torch.device("cpu"), amp=False)
    with TapExtractor(bb.model, resolve_taps(bb.model, (), "output")) as extractor:
        engine = EagerEngine(extractor, runtime, BatchInputs(bb.preprocess))
        ref, out, other = engine(want)[0], engine(got)[0], engine(want.flip(0))[0]
    assert _max_rel(out, ref) <= FEATURE_TOLERANCE
    assert _max_rel(other, ref) > 10 * FEATURE_TOLERANCE  # the tolerance tells one image from another


def test_exif_orientation_is_applied_as_pil_applies_it(tmp_path: Path) -> None:
    """Every orientation on a non-square photo: a transposition the wrong way moves most pixels by tens of levels."""
    p = Preprocess(36, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    names = _photos(tmp_path, [(48, 64)] * 8, orientations=list(range(1, 9)))
    assert [load_rgb(tmp_path / n).size for n in names] == [(64, 48)] * 4 + [(48, 64)] * 4  # 5-8 swap the sides
    want, got = _batches(p, tmp_path, names)
    levels = (_grey_levels(got, p) - _grey_levels(want, p)).abs()
    assert float(levels.max()) <= PIXEL_LEVELS + 1e-3
    unturned = (_grey_levels(got[:1], p) - _grey_levels(want[2:3], p)).abs()  # orientation 1 against 3 (turned 180)
    assert float(unturned.mean()) > 10 * PIXEL_LEVELS


def _mixed_folder(root: Path) -> Path:
    """A test split of PNGs (bench/synthetic.py) and JPEG photos, with in each class a JPEG named .png and a PNG named
    .jpg: 3 JPEG files and 2 PNG files a class."""
    make_image_folder(root, {"test": 2})
    for cls in CLASSES:
        folder = root / "test" / cls
        _photos(folder, _SIZES[:3], seed=len(cls))
        (folder / "002.jpg").rename(folder / "jpeg-named.png")
        (folder / "000.png").rename(folder / "png-named.jpg")
    return root


def test_a_mixed_folder_decodes_jpegs_on_the_device_and_the_rest_as_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    data = _mixed_folder(tmp_path / "mixed")
    decoded: list[int] = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda files, **kw: (decoded.append(len(files) if isinstance(files, list) else 1), real(files, **kw))[1])
    config = ExtractConfig(data=str(data), split="test", **tiny(workers=1))  # a worker: the encoded batch crosses processes
    host = extract(replace(config, cache_dir="host"), progress=False)
    assert decoded == []
    device = extract(replace(config, cache_dir="device", decode="device"), progress=False)
    a, b = cache_rows(host.path), cache_rows(device.path)
    assert a["paths"].tolist() == b["paths"].tolist() and len(a["paths"]) == 5 * len(CLASSES) and np.array_equal(a["labels"], b["labels"])
    jpeg = np.array([(data / p).read_bytes()[:3] == b"\xff\xd8\xff" for p in a["paths"]])
    assert sum(decoded) == jpeg.sum() == 3 * len(CLASSES)  # by their bytes: the JPEG named .png in, the PNG named .jpg out
    fa, fb = a["classifier:input"], b["classifier:input"]
    np.testing.assert_allclose(fb[~jpeg], fa[~jpeg], rtol=0, atol=1e-6)  # PIL's pixels, as on the host
    assert _max_rel(fb[jpeg], fa[jpeg]) <= FEATURE_TOLERANCE
    assert not np.array_equal(fb[jpeg], fa[jpeg])  # another decoder and resize indeed
    with read_cache(device.path) as c:
        assert c.attrs["runtime"] == "cpu (fp32, JPEG decoded on the device)"


def _corrupt(data: Path) -> Path:
    """JPEG photos, 2 a class (batches of 4), the second file of the first batch cut in half: its header is whole, so
    the workers leave it to the device, which cannot decode it."""
    for cls in CLASSES:
        _photos(data / "test" / cls, _SIZES[:2], seed=len(cls))
    bad = data / "test" / CLASSES[0] / "001.jpg"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    assert jpeg_orientation(bad.read_bytes()) == 1
    return bad


def test_a_corrupt_jpeg_is_skipped_as_on_the_host_and_the_rest_of_its_batch_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    data = tmp_path / "ds"
    bad = _corrupt(data)
    config = ExtractConfig(data=str(data), split="test", on_error="skip", **tiny())
    host = extract(replace(config, cache_dir="host"), progress=False)
    calls: list[int] = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda files, **kw: (calls.append(len(files) if isinstance(files, list) else 1), real(files, **kw))[1])
    device = extract(replace(config, cache_dir="device", decode="device"), progress=False)
    assert calls == [4, 1, 1, 1, 1, 2]  # the first batch failed as a whole, then its files one at a time; the second batch whole
    assert device.n_images == host.n_images == 2 * len(CLASSES) - 1
    assert device.skipped == host.skipped and [p for p, _ in device.skipped] == ["test/ant/001.jpg"]
    assert "truncated" in device.skipped[0][1]  # PIL's reason, as the host gives it
    a, b = cache_rows(host.path), cache_rows(device.path)
    assert a["paths"].tolist() == b["paths"].tolist()
    with read_cache(device.path) as c:
        assert str(bad.relative_to(data)) not in c.paths and c.paths[0] == "test/ant/000.jpg"  # its batch's other files are kept
    assert _max_rel(b["classifier:input"], a["classifier:input"]) <= FEATURE_TOLERANCE


def test_a_corrupt_jpeg_fails_with_one_line_naming_it_as_on_the_host(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    bad = _corrupt(data)
    args = ["extract", "--data", data, "--split", "test", "--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4",
            "--workers", "0", "--engine", "eager", "--device", "cpu", "--no-progress"]
    host = error(invoke(*args, "--cache-dir", "host"))
    device = error(invoke(*args, "--cache-dir", "device", "--decode", "device"))
    assert device == host and device.startswith(f"{bad}: cannot decode image") and "--on-error skip" in device


def test_the_decode_choice_is_part_of_the_caches_settings(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    _corrupt(data)  # any JPEGs will do; the corrupt one is skipped
    config = ExtractConfig(data=str(data), split="test", on_error="skip", **tiny())
    path = extract(config, progress=False).path
    with read_cache(path) as c:
        assert "decode" not in c.attrs["settings"]  # the default adds nothing: caches made before the option stay current
    device = replace(config, decode="device")
    with pytest.raises(ValueError, match=r"test.h5 was made with other settings \(decode: None -> 'device'\); pass --force"):
        extract(device, progress=False)
    assert extract(device, force=True, progress=False).status == "extracted"
    assert extract(device, progress=False).status == "up-to-date"
    with read_cache(path) as c:
        assert c.attrs["settings"]["decode"] == "device"
    with pytest.raises(ValueError, match=r"decode: 'device' -> None"):
        extract(config, progress=False)


def test_the_decode_setting_is_declared_checked_and_read_from_the_settings_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decode must be one of host, device, got 'gpu'"):
        ExtractConfig(decode="gpu")
    with pytest.raises(ValueError, match="decode must be one of host, device"):
        resolve_runtime("cpu", decode="nvjpeg")
    assert resolve_runtime("cpu").decode == "host"  # never chosen for you, on any device
    with pytest.raises(ValueError, match="--decode device resizes with torch, which has no 'lanczos' filter"):
        BatchInputs(Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3, interpolation="lanczos"), decode="device")
    usage = invoke("extract", "--decode", "gpu")
    assert usage.exit_code == 2 and "'gpu' is not one of 'host', 'device'" in usage.output
    assert "--decode [host|device]" in ok(invoke("extract", "--help"))
    data = make_image_folder(tmp_path / "ds", {"test": 1})
    (tmp_path / "pipeline.toml").write_text(f'[extract]\ndata = "{data}"\ndecode = "device"\nweights = "none"\ncrop = 32\nresize = 36\n'
                                            'workers = 0\ndevice = "cpu"\nengine = "eager"\n')
    ok(invoke("extract", "--split", "test", "--no-progress"))
    with read_cache(Path("features/ds/mobilenet_v2-none/classifier-input/test.h5")) as c:
        assert c.attrs["settings"]["decode"] == "device"  # PNGs only: decoded on the host, but the choice is recorded


@pytest.mark.gpu
def test_device_decoding_on_cuda_is_within_the_tolerance(tmp_path: Path) -> None:
    """nvJPEG decodes with other arithmetic than libjpeg-turbo: these bounds are a guess, not yet run on a GPU (the
    features' is the CPU's; the pixels get 4 grey levels instead of 1)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    bb = load_backbone("mobilenet_v2", "none", resize=36, crop=32)
    names = _photos(tmp_path, _SIZES * 2, orientations=[1, 6] * len(_SIZES))
    host = BatchInputs(bb.preprocess)
    want = host.collate([ImageDataset(tmp_path, names, host.transform)[i] for i in range(len(names))])[1]
    device = BatchInputs(bb.preprocess, decode="device")
    collated = device.collate([ImageDataset(tmp_path, names, device.transform, encoded_jpegs=True)[i] for i in range(len(names))])
    index, got, bad = device.decode(collated, torch.device("cuda"))
    assert got.device.type == "cuda" and bad == [] and index.tolist() == list(range(len(names)))
    levels = (_grey_levels(got.cpu(), bb.preprocess) - _grey_levels(want, bb.preprocess)).abs()
    assert float(levels.max()) <= 4 + 1e-3
    runtime = Runtime(torch.device("cuda"), amp=False)
    with TapExtractor(bb.model, resolve_taps(bb.model, (), "output")) as extractor:
        engine = EagerEngine(extractor, runtime, BatchInputs(bb.preprocess))
        assert _max_rel(engine(got)[0], engine(want)[0]) <= FEATURE_TOLERANCE
