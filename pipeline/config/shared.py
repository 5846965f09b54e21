"""The parts every stage's settings share: the allowed values of choice options, the dataset and the backbone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..validate import check_at_least, check_types

__all__ = [
    "AUTO_TAP", "JOIN", "tap_parts", "SPLITS", "ON_ERROR", "DTYPES", "COMPRESSIONS", "ENGINES", "PARALLEL", "DECODES", "CAPTURES", "HEAD_NAMES", "POOLS", "PREPROCESSING", "OPTIMIZERS",
    "SCHEDULES", "AUGMENTS", "HEAD_INITS", "NORMS", "PROJECTIONS", "DatasetSpec", "DatasetOptions", "BackboneOptions",
    "BACKBONE_AND_DATASET",
]

# The allowed values of choice options, declared once.
SPLITS = ("train", "val", "test")
ON_ERROR = ("fail", "skip")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "gzip", "lzf")
ENGINES = ("auto", "eager", "onnx")
# How ONNX Runtime spreads a run over the cores: each operator split across threads (one barrier per operator), or
# one single-threaded run per core, each on its own batch (no barrier: a core lost to a neighbour slows one batch).
PARALLEL = ("operators", "batches")
# Where JPEG files are decoded: by the DataLoader workers with PIL, or a batch at a time by torchvision's decode_jpeg on
# the extraction's device (nvJPEG on CUDA), the workers only reading the files.
DECODES = ("host", "device")
CAPTURES = ("input", "output")
# Joins tap names into the name of their concatenation: ``features.13:output+classifier:input``.
JOIN = "+"


def tap_parts(name: str) -> list[str]:
    """The taps a tap name stands for: itself, or the parts of a joined name."""
    return name.split(JOIN)

HEAD_NAMES = ("linear", "logreg", "svm", "svm-rbf", "tree", "extra-trees", "hgb", "knn")
POOLS = ("avg", "max", "flatten")
# fit-head --tap auto: val chooses among the cache's taps and all of them joined.
AUTO_TAP = "auto"
PREPROCESSING = ("none", "standardize", "l2", "pca", "standardize+pca", "l2+pca")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
AUGMENTS = ("none", "crop-flip", "crop-flip-rotate")
HEAD_INITS = ("torch", "xavier", "normal")
NORMS = ("frozen", "train")
PROJECTIONS = ("tsne", "pca")


# ---------------------------------------------------------------- shared parts


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its splits are made.

    Args:
        root: the dataset folder. Image-folder layout: ``root/<split>/<class>/<image>``.
        labels_csv: a CSV of labels relative to ``root`` (Kaggle dog-breed layout); None for image folders.
        id_column: the CSV column holding the image id.
        label_column: the CSV column holding the class name.
        image_dir: the folder under ``root`` holding the CSV's images.
        extension: appended to each id to make the file name.
        val_fraction: fraction of train carved out as val when there is no ``val/``.
        test_fraction: fraction carved out as test for CSV datasets.
        split_seed: seed of the stratified carving.
    """

    root: str
    labels_csv: str | None = None
    id_column: str = "id"
    label_column: str = "breed"
    image_dir: str = "train"
    extension: str = ".jpg"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)

    @classmethod
    def of(cls, settings: Any) -> "DatasetSpec":
        """The dataset of a settings object that holds these fields flat, with ``data`` for ``root``."""
        return cls(root=settings.data, **{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if f.name != "root"})

    @property
    def name(self) -> str:
        """The dataset's name in cache paths: the root folder's name."""
        return Path(self.root).resolve().name


@dataclass(frozen=True)
class DatasetOptions:
    """The dataset fields every stage that reads images shares, flat for the command line and pipeline.toml.

    Attributes:
        data: dataset folder (``ROOT/<split>/<class>/<image>``, or with ``labels_csv``).
        labels_csv, id_column, label_column, image_dir, extension: the CSV dataset layout.
        val_fraction, test_fraction, split_seed: how missing splits are carved.
    """

    data: str = "data/fashion-mnist"
    labels_csv: str | None = DatasetSpec.labels_csv
    id_column: str = DatasetSpec.id_column
    label_column: str = DatasetSpec.label_column
    image_dir: str = DatasetSpec.image_dir
    extension: str = DatasetSpec.extension
    val_fraction: float = DatasetSpec.val_fraction
    test_fraction: float = DatasetSpec.test_fraction
    split_seed: int = DatasetSpec.split_seed

    @property
    def dataset(self) -> DatasetSpec:
        return DatasetSpec.of(self)

    def _check_dataset(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


@dataclass(frozen=True)
class BackboneOptions:
    """The backbone fields shared by extraction and fine-tuning.

    Attributes:
        model: torchvision classification model name.
        weights: ``DEFAULT``, a torchvision weights name, a state_dict file, or ``none`` for random weights.
        resize, crop, mean, std: overrides of the weights' preprocessing.
    """

    model: str = "mobilenet_v2"
    weights: str = "DEFAULT"
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def _check_backbone(self) -> None:
        check_at_least("resize", self.resize, 1)
        check_at_least("crop", self.crop, 1)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if len(value) != 3:
                    raise ValueError(f"{name} takes three numbers (R, G, B), got {list(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")


BACKBONE_AND_DATASET = tuple(f.name for cls in (DatasetOptions, BackboneOptions) for f in dataclasses.fields(cls))
