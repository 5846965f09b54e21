"""Runtime: device choice and the one switch for the fast CUDA path (bf16 autocast, channels_last, pinned memory,
uint8 batches finished on the device)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image

from .data import collate_batch
from .images import centre_offsets, resize_crop, resized_size

if TYPE_CHECKING:
    from .backbones import Preprocess

__all__ = ["Runtime", "BatchInputs", "resolve_runtime", "torch_threads"]


@dataclass(frozen=True)
class Runtime:
    """Where the backbone runs and whether the fast path is on.

    Attributes:
        device: the torch device.
        amp: the one switch. On: bf16 autocast, channels_last tensors and, on CUDA, pinned host memory with
            non-blocking copies and uint8 batches. Off: plain fp32, bit-for-bit the eager reference.
        uint8: batches cross to the device as uint8 and :class:`BatchInputs` finishes them there; set by
            :func:`resolve_runtime` with the switch on CUDA, and by hand to try the path on the CPU.
    """

    device: torch.device
    amp: bool
    uint8: bool = False

    @property
    def pin_memory(self) -> bool:
        return self.amp and self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.amp else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the switch is on, else a no-op."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the device, in channels_last when the switch is on."""
        return module.to(self.device, memory_format=self.memory_format)

    def inputs(self, preprocess: Preprocess) -> BatchInputs:
        """How images become this runtime's batches: uint8 finished on the device, or float32 made on the host."""
        return BatchInputs(preprocess, uint8=self.uint8)

    def to_device(self, x: torch.Tensor, inputs: BatchInputs | None = None) -> torch.Tensor:
        """Move a batch to the device; non-blocking from pinned memory when the switch is on. A uint8 batch crosses
        as uint8 and ``inputs`` (what made it) normalises it there.

        Raises:
            ValueError: a uint8 batch without the inputs that made it.
        """
        if x.dtype != torch.uint8:
            return x.to(self.device, non_blocking=self.pin_memory, memory_format=self.memory_format)
        if inputs is None:
            raise ValueError("a uint8 batch needs the BatchInputs that made it, to be normalised on the device")
        return inputs.finish(x.to(self.device, non_blocking=self.pin_memory)).contiguous(memory_format=self.memory_format)

    def describe(self) -> str:
        parts = ["bf16 autocast", "channels_last"] if self.amp else ["fp32"]
        return f"{self.device.type} ({', '.join(parts + (['uint8 transfer'] if self.uint8 else []))})"


class BatchInputs:
    """How decoded images become a batch: float32, normalised on the host, or uint8, finished on the device.

    The uint8 path moves a quarter of the bytes and leaves the normalisation to the device, and with it the upscaling
    of images smaller than the resize (Fashion-MNIST's 28 px to 256): the host never builds 224 px float tensors for
    them. Larger images are resized and cropped on the host, by PIL as in the float path, since shrinking first also
    shrinks what crosses. The device upscales in two passes, width then height, each rounded to whole grey levels as
    PIL's 8-bit resampling rounds, so its pixels are PIL's to within one grey level (bit for bit on Fashion-MNIST's
    28 px; tests/test_transfer.py). Only bilinear upscaling is done on the device (PIL's other filters are not
    torch's); a crop larger than the resize pads, and keeps the float path.

    Args:
        preprocess: the weights' preprocessing.
        uint8: the uint8 path, where it applies.
    """

    def __init__(self, preprocess: Preprocess, uint8: bool = False) -> None:
        self.preprocess = preprocess
        self.uint8 = uint8 and preprocess.crop <= preprocess.resize
        self.device_resize = self.uint8 and preprocess.interpolation == "bilinear"
        self._float = None if self.uint8 else preprocess.transform()
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # mean and std by device, made once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stats": {}}  # DataLoader workers get no device tensors

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image as a CHW tensor: float32 normalised, or uint8 cropped, or uint8 as decoded when the
        device is to upscale it."""
        if self._float is not None:
            return self._float(image)
        p = self.preprocess
        w, h = image.size
        if self.device_resize and min(w, h) < p.resize and (w, h) != (p.crop, p.crop):
            pixels = np.array(image, dtype=np.uint8)
        else:
            pixels = np.array(resize_crop(image, p.resize, p.crop, p.interpolation))
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def collate(self, items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[np.ndarray, torch.Tensor | None, list[tuple[int, str]]]:
        """:func:`~pipeline.data.collate_batch`, after the host resizes and crops the odd images of a batch whose
        sizes differ (one size a batch is what the device resizes)."""
        if self.uint8 and len({tuple(x.shape) for _, x, _ in items if x is not None}) > 1:
            crop = self.preprocess.crop
            items = [(i, x if x is None or tuple(x.shape[-2:]) == (crop, crop) else self._on_host(x), why) for i, x, why in items]
        return collate_batch(items)

    def _on_host(self, x: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        return torch.from_numpy(np.array(resize_crop(Image.fromarray(x.permute(1, 2, 0).numpy()), p.resize, p.crop, p.interpolation))).permute(2, 0, 1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch, wherever it is, as the float path would have made it: resized and cropped when it is not
        crop-sized yet, scaled to [0, 1] and normalised (in the float path's order of operations). Float batches pass."""
        if x.dtype != torch.uint8:
            return x
        p = self.preprocess
        x = x.float()
        h, w = x.shape[-2:]
        if (h, w) != (p.crop, p.crop):
            new_w, new_h = resized_size(w, h, p.resize)
            for size in ((h, new_w), (new_h, new_w)):  # PIL's order; rounded half up after each pass, as PIL rounds
                x = torch.floor(torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False) + 0.5).clamp_(0, 255)
            left, top = centre_offsets(new_w, new_h, p.crop)
            x = x[..., top:top + p.crop, left:left + p.crop]
        key = str(x.device)
        if key not in self._stats:  # a copy from the host waits for the device: once, not every batch
            self._stats[key] = tuple(torch.as_tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1) for v in (p.mean, p.std))
        mean, std = self._stats[key]
        return (x / 255.0).sub_(mean).div_(std)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_runtime(device: str = "auto", amp: bool | None = None) -> Runtime:
    """Pick the device (cuda > mps > cpu for ``auto``) and the fast-path switch (default: on for CUDA only).

    Raises:
        ValueError: a named device that is not available.
    """
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available")
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    return Runtime(device=dev, amp=amp, uint8=amp and dev.type == "cuda")
