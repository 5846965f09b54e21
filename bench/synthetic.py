"""Tiny generated image folders, for the benchmarks that need a dataset of their own and for the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "make_image_folder", "natural_jpeg", "make_jpeg_folder"]

CLASSES = ("ant", "bee", "cat")


def make_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (36, 44), seed: int = 0) -> Path:
    """Write random RGB PNGs as ``root/<split>/<class>/<i>.png``; a class's images share a tint so they are learnable.

    Args:
        root: The dataset folder; created if missing, and added to if there (a split's images are overwritten).
        per_class: Images per class for each split, e.g. ``{"train": 10, "test": 3}``.
        size: Height and width of every image.
        seed: The seed of the pixels; the same arguments give the same files.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (*size, 3)).astype(np.float64)
                img[..., c] = img[..., c] * 0.3 + 170
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def natural_jpeg(rng: np.random.Generator, size: tuple[int, int] = (375, 500), quality: int = 90) -> bytes:
    """One photo-like JPEG: a smooth colour field with texture, about 75 KB at 500x375 (random pixels would be
    several times larger and slower to decode than photographs are).

    Args:
        rng: the source of the pixels.
        size: height and width.
        quality: the JPEG quality.
    """
    h, w = size
    small = rng.integers(0, 256, (max(2, h // 31), max(2, w // 31), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_jpeg_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (375, 500), seed: int = 0) -> Path:
    """Write :func:`natural_jpeg` images as ``root/<split>/<class>/<i>.jpg`` (ImageNet-sized by default); returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i:03d}.jpg").write_bytes(natural_jpeg(rng, size))
    return root
