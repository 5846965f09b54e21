"""The images of a fine-tune: each phase's split and labels, the training augmentation, and the data loaders."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .. import layout
from ..backbones import Preprocess
from ..config import AUGMENTS, SPLITS, DatasetSpec
from ..data import ImageDataset, Split, collate_batch, load_split, refuse_unreadable, stratified_subset
from ..runtime import Runtime

__all__ = ["train_transform"]


def train_transform(preprocess: Preprocess, augment: str) -> Callable:
    """Training preprocessing: the weights' size, mean and std, with augmentation.

    ``crop-flip``: RandomResizedCrop + horizontal flip (tutorials 000, 001, 003). ``crop-flip-rotate``: resize,
    RandomResizedCrop, flip and a random rotation of up to 30 degrees (tutorial 002). ``none``: the eval transform.
    """
    if augment == "none":
        return preprocess.transform()
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    mode = InterpolationMode(preprocess.interpolation)
    steps: list[Callable] = []
    if augment == "crop-flip-rotate":
        steps.append(T.Resize(preprocess.crop, interpolation=mode, antialias=preprocess.antialias))
    steps += [T.RandomResizedCrop(preprocess.crop, interpolation=mode, antialias=preprocess.antialias), T.RandomHorizontalFlip()]
    if augment == "crop-flip-rotate":
        steps.append(T.RandomRotation(30))
    steps += [T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Normalize(preprocess.mean, preprocess.std)]
    return T.Compose(steps)


@dataclass
class _Part:
    """Images of one phase: where they are and their labels."""

    label: str
    root: Path
    paths: list[str]
    labels: np.ndarray
    fingerprint: str


def _part(label: str, spec: DatasetSpec, split_name: str, per_class: int | None, seed: int, classes: list[str] | None,
          split: Split | None = None) -> tuple[_Part, Split]:
    """The images of one phase: ``per_class`` of each class (all when None) of the split, scanned unless given."""
    split = load_split(spec, split_name) if split is None else split
    root = Path(spec.root)
    if len(split) == 0:
        raise ValueError(f"the {split_name} split of {root} has no images")
    if classes is not None and split.classes != classes:
        raise ValueError(f"{label}: {root} has classes {split.classes[:10]}, the train split has {classes[:10]}")
    pick = stratified_subset(split.labels, per_class, seed)
    return _Part(label, root, [split.paths[i] for i in pick], split.labels[pick], split.fingerprint), split


def refuse_unreadable_parts(parts: list[tuple[_Part, Split]], on_error: str) -> None:
    """Under ``on_error="fail"``, refuse unreadable images among those the phases read (a subset reads only its own)."""
    for part, split in parts:
        refuse_unreadable(replace(split, paths=part.paths, labels=part.labels, sizes=[]), on_error)


def _parse_target(target: str, dataset: DatasetSpec) -> tuple[str, DatasetSpec, str]:
    """``test`` -> that split of the dataset; ``DIR[:SPLIT]`` -> a split (default test) of another dataset."""
    if target in SPLITS:
        if target != "test":
            raise ValueError(f"--target {target}: {target} is already a phase of every epoch; targets are test or other datasets")
        return target, dataset, target
    path, sep, split = target.rpartition(":")
    if not sep or split not in SPLITS:
        path, split = target, "test"
    if not Path(path).is_dir():
        raise ValueError(f"--target {target!r}: expected test, or a dataset folder DIR[:SPLIT]; {path} is not a folder")
    return f"{layout.slug(Path(path).resolve().name)}-{split}", DatasetSpec(root=path), split


def _loader(part: _Part, transform: Callable, batch_size: int, workers: int, runtime: Runtime,
            generator: torch.Generator | None = None, drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageDataset(part.root, part.paths, transform), batch_size=batch_size, shuffle=generator is not None,
        generator=generator, drop_last=drop_last, num_workers=workers, collate_fn=collate_batch,
        pin_memory=runtime.pin_memory, prefetch_factor=4 if workers else None,
    )
