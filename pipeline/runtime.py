"""Runtime: device choice and the one switch for the fast CUDA path (bf16 autocast, channels_last, pinned memory,
uint8 batches finished on the device), and where JPEG files are decoded."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from PIL import Image

from .config import DECODES
from .data import EncodedJpeg, collate_batch
from .images import UnreadableImageError, centre_offsets, load_rgb, resize_crop, resized_size
from .validate import check_choice

if TYPE_CHECKING:
    from .backbones import Preprocess

__all__ = ["Runtime", "BatchInputs", "EncodedBatch", "resolve_runtime", "torch_threads"]

Batch = tuple[np.ndarray, Any, list[tuple[int, str]]]  # (positions of the good rows, the rows, [(position, why unreadable)])


@dataclass(frozen=True)
class Runtime:
    """Where the backbone runs and whether the fast path is on.

    Attributes:
        device: the torch device.
        amp: the one switch. On: bf16 autocast, channels_last tensors and, on CUDA, pinned host memory with
            non-blocking copies and uint8 batches. Off: plain fp32, bit-for-bit the eager reference.
        uint8: batches cross to the device as uint8 and :class:`BatchInputs` finishes them there; set by
            :func:`resolve_runtime` with the switch on CUDA, and by hand to try the path on the CPU.
        decode: where JPEG files are decoded: ``host`` (the DataLoader workers, PIL) or ``device`` (the workers only
            read them, :meth:`BatchInputs.decode` decodes each batch on ``device``). Never chosen by the switch: the
            features differ slightly.
    """

    device: torch.device
    amp: bool
    uint8: bool = False
    decode: str = "host"

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
        """How images become this runtime's batches: uint8 finished on the device, or float32 made on the host; JPEG
        files decoded by the workers, or on the device."""
        return BatchInputs(preprocess, uint8=self.uint8, decode=self.decode)

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
        parts += (["uint8 transfer"] if self.uint8 else []) + (["JPEG decoded on the device"] if self.decode == "device" else [])
        return f"{self.device.type} ({', '.join(parts)})"


@dataclass(frozen=True)
class EncodedBatch:
    """A batch whose JPEG files the DataLoader workers read and did not decode, made by :meth:`BatchInputs.collate`;
    :meth:`BatchInputs.decode` makes it an ordinary batch on the device.

    Attributes:
        data: the JPEG files' bytes end to end: one tensor crosses from a worker, not one a file.
        sizes: each file's number of bytes in ``data``.
        index: each file's position.
        orientations: each file's EXIF orientation.
        paths: each file's path, to decode it on the host where the device cannot.
        host_index: the positions of the batch's other images, which the workers decoded.
        host: those images, as :meth:`BatchInputs.transform` makes them and ``collate_batch`` stacks them; None for none.
    """

    data: torch.Tensor
    sizes: list[int]
    index: np.ndarray
    orientations: list[int]
    paths: list[str]
    host_index: np.ndarray
    host: torch.Tensor | None

    def pin_memory(self) -> EncodedBatch:
        """The batch in pinned memory (the DataLoader calls it with ``pin_memory``)."""
        return replace(self, data=self.data.pin_memory(), host=None if self.host is None else self.host.pin_memory())


# Torch's moves for the EXIF orientations of a C x H x W image, as PIL's ImageOps.exif_transpose transposes them.
_ORIENT = {
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270 (counter-clockwise)
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90
}
# The filters torch resizes tensors with; PIL's box, hamming and lanczos have no torch counterpart.
_DEVICE_FILTERS = ("nearest", "nearest-exact", "bilinear", "bicubic")


class BatchInputs:
    """How decoded images become a batch: float32, normalised on the host, or uint8, finished on the device.

    The uint8 path moves a quarter of the bytes and leaves the normalisation to the device, and with it the upscaling
    of images smaller than the resize (Fashion-MNIST's 28 px to 256): the host never builds 224 px float tensors for
    them. Larger images are resized and cropped on the host, by PIL as in the float path, since shrinking first also
    shrinks what crosses. The device upscales in two passes, width then height, each rounded to whole grey levels as
    PIL's 8-bit resampling rounds, so its pixels are PIL's to within one grey level (bit for bit on Fashion-MNIST's
    28 px; tests/test_transfer.py). Only bilinear upscaling is done on the device (PIL's other filters are not
    torch's); a crop larger than the resize pads, and keeps the float path.

    With ``decode="device"`` the workers read JPEG files and leave them encoded (:class:`~pipeline.data.ImageDataset`
    with ``encoded_jpegs``); :meth:`collate` puts their bytes beside the batch's other images, and :meth:`decode`, in
    the main process, decodes them with one batched ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA,
    libjpeg-turbo on the CPU), applies their EXIF orientation, resizes them there with the weights' filter
    (antialiased, as PIL's resampling is), centre-crops and normalises them. Other decoders and another resize than
    PIL's: the pixels are within a few grey levels of the host's, not equal (README, tests/test_decode.py).

    Args:
        preprocess: the weights' preprocessing.
        uint8: the uint8 path, where it applies.
        decode: ``host`` or ``device``, where JPEG files are decoded.

    Raises:
        ValueError: ``decode="device"`` with a filter torch does not have (box, hamming, lanczos).
    """

    def __init__(self, preprocess: Preprocess, uint8: bool = False, decode: str = "host") -> None:
        check_choice("decode", decode, DECODES)
        if decode == "device" and preprocess.interpolation not in _DEVICE_FILTERS:
            raise ValueError(f"--decode device resizes with torch, which has no {preprocess.interpolation!r} filter (the weights' "
                             f"interpolation; torch has {', '.join(_DEVICE_FILTERS)}); use --decode host")
        self.preprocess = preprocess
        self.uint8 = uint8 and preprocess.crop <= preprocess.resize
        self.device_resize = self.uint8 and preprocess.interpolation == "bilinear"
        self.device_decode = decode == "device"
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

    def collate(self, items: list[tuple[int, torch.Tensor | EncodedJpeg | None, str | None]]) -> Batch:
        """:func:`~pipeline.data.collate_batch`, after the host resizes and crops the odd images of a batch whose
        sizes differ (one size a batch is what the device resizes). A batch with encoded JPEGs becomes an
        :class:`EncodedBatch`, its positions those of every readable file so far: :meth:`decode` finishes it."""
        jpegs = [(i, x) for i, x, _ in items if isinstance(x, EncodedJpeg)]
        if jpegs:
            host_index, host, bad = self.collate([item for item in items if not isinstance(item[1], EncodedJpeg)])
            data = torch.frombuffer(bytearray(b"".join(x.data for _, x in jpegs)), dtype=torch.uint8)
            batch = EncodedBatch(
                data=data, sizes=[len(x.data) for _, x in jpegs],
                index=np.asarray([i for i, _ in jpegs], dtype=np.int64), orientations=[x.orientation for _, x in jpegs],
                paths=[x.path for _, x in jpegs], host_index=host_index, host=host,
            )
            return np.sort(np.concatenate([host_index, batch.index])), batch, bad
        if self.uint8 and len({tuple(x.shape) for _, x, _ in items if x is not None}) > 1:
            crop = self.preprocess.crop
            items = [(i, x if x is None or tuple(x.shape[-2:]) == (crop, crop) else self._on_host(x), why) for i, x, why in items]
        return collate_batch(items)

    def decode(self, batch: Batch, device: torch.device) -> Batch:
        """A collated batch as the engines take it: an :class:`EncodedBatch` decoded, resized, cropped and normalised on
        ``device`` (float32, rows in position order), any other batch as it is.

        The JPEGs are decoded in one call. When it fails, each is decoded alone, and one the device cannot decode is
        decoded on the host by PIL as with ``decode="host"``; one PIL cannot decode either joins the unreadable
        files, with PIL's reason, as it would on the host.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        index, x, bad = batch
        if not isinstance(x, EncodedBatch):
            return batch
        files = list(torch.split(x.data, x.sizes))

        def read(data: torch.Tensor | list[torch.Tensor]) -> Any:
            # The EXIF orientation is applied below, on every device: torchvision 0.29's decode_jpeg applies it on the
            # CPU only, and ignores the flag on CUDA.
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)

        try:
            images: list[torch.Tensor | None] = list(read(files))
        except RuntimeError:  # one bad file fails the batch: find which, one at a time
            images = [_or_none(read, f) for f in files]
        parts: list[tuple[np.ndarray, torch.Tensor]] = []  # (positions, normalised rows on the device)
        decoded = [k for k, im in enumerate(images) if im is not None]
        if decoded:
            crops = self._device_crops([_ORIENT.get(x.orientations[k], lambda t: t)(images[k]) for k in decoded])
            parts.append((x.index[decoded], self.finish(crops)))
        refused, bad = [], list(bad)
        for k in (k for k, im in enumerate(images) if im is None):
            try:
                refused.append((int(x.index[k]), self.transform(load_rgb(x.paths[k])), None))
            except UnreadableImageError as e:
                bad.append((int(x.index[k]), e.reason))
        host_parts = [(x.host_index, x.host)] + ([self.collate(refused)[:2]] if refused else [])
        parts += [(i, self.finish(rows.to(device, non_blocking=True))) for i, rows in host_parts if rows is not None]
        bad.sort()
        if not parts:
            return np.zeros(0, dtype=np.int64), None, bad
        index = np.concatenate([i for i, _ in parts])
        rows = torch.cat([r for _, r in parts])
        order = np.argsort(index, kind="stable")
        if (order != np.arange(len(order))).any():
            rows = rows[torch.as_tensor(order, device=rows.device)]
        return index[order], rows, bad

    def _device_crops(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded C x H x W uint8 images, on the device, resized and centre-cropped as the weights' transform does it
        (the short side to ``resize``, antialiased as PIL is, then ``CenterCrop``'s rounding), stacked in order."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        p = self.preprocess
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(k)
        for shape, members in by_size.items():  # one resize for the images of one size (a camera's files share theirs)
            h, w = shape[-2:]
            new_w, new_h = resized_size(w, h, p.resize)
            group = torch.stack([images[k] for k in members])
            group = F.resize(group, [new_h, new_w], interpolation=InterpolationMode(p.interpolation), antialias=True)
            group = F.center_crop(group, [p.crop, p.crop])
            for k, row in zip(members, group):
                out[k] = row
        return torch.stack(out)  # type: ignore[arg-type]

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


def _or_none(read: Any, data: torch.Tensor) -> torch.Tensor | None:
    """``read(data)``, or None when the decoder refuses it."""
    try:
        return read(data)
    except RuntimeError:
        return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_runtime(device: str = "auto", amp: bool | None = None, decode: str = "host") -> Runtime:
    """Pick the device (cuda > mps > cpu for ``auto``) and the fast-path switch (default: on for CUDA only); ``decode``
    says where JPEG files are decoded (``host`` or ``device``, whatever the device).

    Raises:
        ValueError: a named device that is not available, or an unknown ``decode``.
    """
    check_choice("decode", decode, DECODES)
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
    return Runtime(device=dev, amp=amp, uint8=amp and dev.type == "cuda", decode=decode)
