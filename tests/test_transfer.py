"""The uint8 transfer path, run on the CPU: batches that cross as uint8 and are finished where the model runs equal the
float path's, exactly where PIL's resampling can be reproduced and within one grey level where it cannot."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.backbones import Preprocess
from pipeline.engines import EagerEngine
from pipeline.runtime import BatchInputs, Runtime, resolve_runtime
from pipeline.taps import TapExtractor, resolve_taps

from bench.faults import cache_rows
from .conftest import make_image_folder, tiny

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# One grey level after normalisation, per channel: what a pixel rounded the other way moves.
_ONE_LEVEL = torch.tensor([1 / (255 * s) for s in _STD]).view(1, 3, 1, 1)


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _batch(inputs: BatchInputs, images: list[Image.Image]) -> torch.Tensor:
    return inputs.collate([(i, inputs.transform(im), None) for i, im in enumerate(images)])[1]


def _both(preprocess: Preprocess, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, BatchInputs]:
    """(the float path's batch, the uint8 path's batch as it crosses, the uint8 inputs that finish it)."""
    u8 = BatchInputs(preprocess, uint8=True)
    return _batch(BatchInputs(preprocess), images), _batch(u8, images), u8


def test_fashion_mnist_sized_images_cross_at_28_px_and_finish_bit_for_bit() -> None:
    images = _images([(28, 28)] * 3)
    want, sent, u8 = _both(Preprocess(256, 224, _MEAN, _STD), images)
    assert sent.dtype == torch.uint8 and sent.shape == (3, 3, 28, 28)  # the host did not upscale them
    assert sent.nbytes * 64 < want.nbytes  # 28 px uint8 against 224 px float32: 1/256 of the bytes
    assert torch.equal(u8.finish(sent), want)


def test_larger_and_mixed_sizes_are_cropped_on_the_host_exactly() -> None:
    p = Preprocess(36, 32, _MEAN, _STD)
    larger = _images([(44, 36), (60, 90), (32, 32)])  # at least the resize, or already crop-sized: PIL on the host
    want, sent, u8 = _both(p, larger)
    assert sent.dtype == torch.uint8 and sent.shape == (3, 3, 32, 32)
    assert torch.equal(u8.finish(sent), want)
    mixed = _images([(28, 28), (20, 30), (50, 40)], seed=1)  # sizes differ: the odd small ones are finished on the host
    want, sent, u8 = _both(p, mixed)
    assert sent.shape == (3, 3, 32, 32)
    assert torch.equal(u8.finish(sent), want)


def test_device_upscaling_is_within_one_grey_level_of_pil_and_features_within_1e_2() -> None:
    """At 39 x 50 px to 112/96 PIL's fixed-point weights round about 0.5 % of the pixels the other way.

    Tolerance: each input pixel within one grey level (after normalisation) of the float path's, in under 2 % of the
    pixels; the features then within 1e-2 of their largest value (6e-4 measured with these random weights). A
    misplaced pixel or a wrong mean would move inputs by far more than one level in most pixels.
    """
    torch.manual_seed(0)
    bb = load_backbone("mobilenet_v2", "none", resize=112, crop=96)
    want, sent, u8 = _both(bb.preprocess, _images([(39, 50)] * 4))
    assert sent.shape == (4, 3, 50, 39)
    got = u8.finish(sent)
    diff = (got - want).abs()
    assert bool((diff <= _ONE_LEVEL + 1e-6).all())
    assert 0 < float((diff > 0).float().mean()) < 0.02  # some differ (the tolerance is exercised), few do
    runtime = Runtime(torch.device("cpu"), amp=False, uint8=True)
    with TapExtractor(bb.model, resolve_taps(bb.model, (), "output")) as extractor:
        ref = EagerEngine(extractor, runtime, BatchInputs(bb.preprocess))(want)[0]
        out = EagerEngine(extractor, runtime, u8)(sent)[0]
    assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()


def test_extract_through_the_uint8_path_makes_the_float_paths_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly equal: for 28 px images the device's pixels are PIL's bit for bit, normalised by the same operations."""
    data = make_image_folder(tmp_path / "small", {"test": 3}, size=(28, 28))
    plain = extract(ExtractConfig(data=str(data), split="test", **tiny(cache_dir="plain")), progress=False)
    uint8_runtime = Runtime(torch.device("cpu"), amp=False, uint8=True)
    monkeypatch.setattr(sys.modules["pipeline.extract"], "resolve_runtime", lambda device, amp, decode: uint8_runtime)  # CUDA's path, on the CPU
    sent = []
    finish = BatchInputs.finish
    monkeypatch.setattr(BatchInputs, "finish", lambda self, x: (sent.append((x.dtype, tuple(x.shape))), finish(self, x))[1])
    u8 = extract(ExtractConfig(data=str(data), split="test", **tiny(cache_dir="u8")), progress=False)
    assert sent and {(dtype, shape[1:]) for dtype, shape in sent} == {(torch.uint8, (3, 28, 28))}  # crossed at 28 px, as uint8
    a, b = cache_rows(plain.path), cache_rows(u8.path)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with read_cache(u8.path) as c:
        assert c.attrs["runtime"] == "cpu (fp32, uint8 transfer)"


def test_where_the_uint8_path_applies() -> None:
    assert not resolve_runtime("cpu").uint8 and not resolve_runtime("cpu", amp=True).uint8  # CUDA with the switch only
    assert not BatchInputs(Preprocess(32, 36, _MEAN, _STD), uint8=True).uint8  # a crop larger than the resize pads
    bicubic = BatchInputs(Preprocess(36, 32, _MEAN, _STD, interpolation="bicubic"), uint8=True)
    assert bicubic.uint8 and not bicubic.device_resize
    assert bicubic.transform(_images([(28, 28)])[0]).shape == (3, 32, 32)  # PIL's bicubic on the host
    with pytest.raises(ValueError, match="a uint8 batch needs the BatchInputs that made it"):
        Runtime(torch.device("cpu"), amp=False, uint8=True).to_device(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.gpu
def test_uint8_path_on_cuda_matches_the_float_path() -> None:
    """On the GPU the same tolerance as on the CPU: inputs within one grey level, features within 1e-2."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    bb = load_backbone("mobilenet_v2", "none", resize=256, crop=224)
    want, sent, u8 = _both(bb.preprocess, _images([(28, 28)] * 4))
    runtime = Runtime(torch.device("cuda"), amp=False, uint8=True)
    got = runtime.to_device(sent, u8).cpu()
    assert bool(((got - want).abs() <= _ONE_LEVEL + 1e-6).all())
    with TapExtractor(bb.model, resolve_taps(bb.model, (), "output")) as extractor:
        out = EagerEngine(extractor, runtime, u8)(sent)[0]
        ref = EagerEngine(extractor, runtime, BatchInputs(bb.preprocess))(want)[0]
    assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()
