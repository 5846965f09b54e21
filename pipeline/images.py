"""Images without torch: the files that count as images, decoding them to 8-bit RGB, and the eval-time resize and crop.

Nothing here imports torch, so an exported model runs on images with ONNX Runtime, numpy and PIL alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "load_rgb", "find_images", "broken_link", "resize_crop"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; `path` names it and `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _NonFinitePixels(ValueError):
    """A floating-point image with NaN or infinite pixels: no 8-bit picture is the right one for it."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit data: map 0..65535 onto 0..255 instead of letting PIL clip.
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            # A NaN would also defeat the 0..1 test below and turn the whole picture nearly black.
            y, x = np.unravel_index(int(np.argmax(bad)), arr.shape)
            raise _NonFinitePixels(f"floating-point image with {int(bad.sum())} of {arr.size} pixels NaN or infinite "
                                   f"(first at x={x}, y={y}: {arr[y, x]})")
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # Transparent pixels become white, not whatever colour happens to sit under alpha 0.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully to 8-bit RGB, applying its EXIF orientation.

    Raises:
        UnreadableImageError: the file is missing, truncated, corrupt or not an image, or a floating-point image
            with NaN or infinite pixels.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except _NonFinitePixels as e:
        raise UnreadableImageError(str(path), str(e)) from None
    except Exception as e:  # PIL raises many types for bad files; all mean "cannot decode".
        raise UnreadableImageError(str(path), f"cannot decode image ({type(e).__name__}: {e})") from e


def broken_link(path: Path) -> str | None:
    """Why ``path`` is a symbolic link that leads to no file (a missing target, or a loop), else None."""
    try:
        if not path.is_symlink():
            return None
        target = os.readlink(path)
    except OSError:
        return None
    try:
        path.stat()
    except FileNotFoundError:
        return f"broken symbolic link (its target {target} does not exist)"
    except OSError as e:
        return f"broken symbolic link to {target} ({e.strerror or e})"
    return None


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders (recursively, sorted) into image paths, and files that cannot be images, with why.

    Hidden and empty files, other extensions, broken symbolic links and anything that is not a regular file are
    returned as rejected: nothing found is left out without a word.

    Raises:
        ValueError: an input that does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one file or folder, not a sequence of one-letter names
    paths: list[str] = []
    rejected: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            why = broken_link(p)
            if why is None:
                raise ValueError(f"{p} not found")
            rejected.append((str(p), why))
            continue
        files = sorted(q for q in p.rglob("*") if not q.is_dir()) if p.is_dir() else [p]
        for f in files:
            rel_parts = f.relative_to(p).parts if p.is_dir() else (f.name,)
            why = None
            if any(part.startswith(".") for part in rel_parts):
                why = "hidden file, not an image"
            else:
                why = broken_link(f)
            if why is None and not f.is_file():
                why = "not a regular file"
            if why is None:
                try:
                    size = f.stat().st_size
                except OSError as e:
                    why = f"cannot read file ({e.strerror or e})"
                else:
                    if size == 0:
                        why = "empty file (0 bytes)"
                    elif f.suffix.lower() not in IMAGE_EXTENSIONS:
                        why = f"not an image file (extension {f.suffix or 'none'!r})"
            if why is None:
                paths.append(str(f))
            else:
                rejected.append((str(f), why))
    return paths, rejected


def resize_crop(image: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """The eval-time geometry of :class:`pipeline.backbones.Preprocess` in PIL alone: the short side resized to
    ``resize``, then the centre ``crop`` x ``crop``, as a crop x crop x 3 uint8 array.

    Pixel for pixel what torchvision's ``Resize(resize)`` and ``CenterCrop(crop)`` make of a PIL image, which
    resizes with PIL itself (antialiased for bilinear and bicubic whatever ``antialias`` says).

    Args:
        image: an RGB image (:func:`load_rgb`).
        resize: the short side after resizing.
        crop: the side of the centre crop; at most ``resize``.
        interpolation: torchvision's name of the mode: ``bilinear``, ``bicubic``, ``nearest``, ...
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, _RESAMPLE[interpolation])
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


# torchvision's InterpolationMode values to PIL's filters, as torchvision maps them.
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
             "lanczos": Image.Resampling.LANCZOS}
