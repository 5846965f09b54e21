"""Shared fixtures: small generated image folders, settings for tiny, fast extractions, one thread for tiny arrays."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest
import torch
from threadpoolctl import threadpool_limits

# One generator serves the tests and the benchmarks; bench/ never imports tests/.
from bench.synthetic import CLASSES, make_image_folder

if TYPE_CHECKING:
    from pipeline import ExtractConfig

__all__ = ["CLASSES", "make_image_folder", "single_threaded", "tiny", "working_in"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class dataset: 10 train and 3 test images per class, no val/ (it is carved)."""
    return make_image_folder(tmp_path / "ds", {"train": 10, "test": 3})


def _isolate(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Work in ``folder`` (no project pipeline.toml) and never reach for the network."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own folder, offline."""
    _isolate(monkeypatch, tmp_path)


@contextmanager
def working_in(folder: Path) -> Iterator[None]:
    """For module-scoped fixtures: in ``folder``, offline and single-threaded, all restored afterwards."""
    with pytest.MonkeyPatch.context() as m, single_threaded():
        _isolate(m, folder)
        yield


def extracted(root: Path, per_class: dict[str, int]) -> tuple[Path, "ExtractConfig"]:
    """A generated dataset under ``root/ds`` and its tiny extraction of train, val (carved) and test under ``root/features``."""
    from dataclasses import replace

    from pipeline import ExtractConfig, extract

    data = make_image_folder(root / "ds", per_class)
    source = ExtractConfig(data=str(data), cache_dir=str(root / "features"), **tiny())
    for split in ("train", "val", "test"):
        extract(replace(source, split=split), progress=False)
    return data, source


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """single_threaded() for a whole test; a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    On a busy 2-core machine, torch's and OpenMP's threads stall for seconds over tiny models and arrays.
    """
    with single_threaded():
        yield
