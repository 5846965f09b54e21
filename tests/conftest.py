"""Shared fixtures: small generated image folders and settings for tiny, fast extractions."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

CLASSES = ("ant", "bee", "cat")


def make_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (36, 44), seed: int = 0) -> Path:
    """Write random RGB PNGs as ``root/<split>/<class>/<i>.png``; a class's images share a tint so they are learnable."""
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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class dataset: 10 train and 3 test images per class, no val/ (it is carved)."""
    return make_image_folder(tmp_path / "ds", {"train": 10, "test": 3})


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own folder (no project pipeline.toml) and never reach for the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")


def tiny(**overrides: object) -> dict:
    """Settings for a fast extraction: random-weight MobileNetV2 at 32 px, eager engine, no workers."""
    base = dict(model="mobilenet_v2", weights="none", crop=32, resize=36, batch_size=4, workers=0, engine="eager", device="cpu")
    base.update(overrides)
    return base


@contextmanager
def single_threaded() -> Iterator[None]:
    """One torch thread and one BLAS/OpenMP thread, restored afterwards: tiny arrays gain nothing from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)
