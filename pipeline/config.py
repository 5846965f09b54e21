"""Settings: one frozen dataclass per stage, composed from shared parts (``settings_file`` layers pipeline.toml over them).

This module owns every option: its name, type, default, allowed values and validation. It imports nothing
heavy, so the command line can build its help from it at once.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipes import FINETUNE_DEFAULTS, RECIPES
from .validate import check_at_least, check_choice, check_types

__all__ = [
    "DatasetSpec", "DatasetOptions", "BackboneOptions",
    "ExtractConfig", "HeadConfig", "FinetuneConfig", "ReportConfig", "AuditConfig",
    "SPLITS", "ON_ERROR", "DTYPES", "COMPRESSIONS", "ENGINES", "CAPTURES", "HEAD_NAMES", "POOLS", "PREPROCESSING",
    "OPTIMIZERS", "SCHEDULES", "AUGMENTS", "HEAD_INITS", "NORMS", "PROJECTIONS", "BACKBONE_AND_DATASET",
]

# The allowed values of choice options, declared once.
SPLITS = ("train", "val", "test")
ON_ERROR = ("fail", "skip")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "gzip", "lzf")
ENGINES = ("auto", "eager", "onnx")
CAPTURES = ("input", "output")
HEAD_NAMES = ("linear", "logreg", "svm", "svm-rbf", "tree", "extra-trees", "hgb", "knn")
POOLS = ("avg", "max", "flatten")
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


# ---------------------------------------------------------------- the stages


@dataclass(frozen=True)
class ExtractConfig(DatasetOptions, BackboneOptions):
    """Everything that defines a feature cache and how it is computed (with the dataset and backbone fields).

    Attributes:
        split: ``train``, ``val`` or ``test``.
        layers: modules to tap, each ``name`` or ``name:input|output``; empty means the default tap.
        capture: ``input`` or ``output``, for layers given without one.
        dtype: ``float32`` or ``float16`` storage.
        compression: ``none``, ``gzip`` or ``lzf``.
        batch_size: images per forward pass.
        workers: DataLoader worker processes; None picks from the CPU count.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: the fast-path switch (bf16 autocast, channels_last, pinned memory); None means on for CUDA only.
        engine: ``auto``, ``eager`` or ``onnx`` (ONNX Runtime, CPU only).
        on_error: ``fail`` on the first unreadable file, or ``skip`` it and record it.
        cache_dir: root of the cache path convention.
        output: an explicit cache path instead of the convention.
    """

    split: str = "train"
    layers: tuple[str, ...] = ()
    capture: str = "output"
    dtype: str = "float32"
    compression: str = "none"
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    amp: bool | None = None
    engine: str = "auto"
    on_error: str = "fail"
    cache_dir: str = "features"
    output: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        for name, choices in (("split", SPLITS), ("dtype", DTYPES), ("compression", COMPRESSIONS), ("engine", ENGINES),
                              ("on_error", ON_ERROR), ("capture", CAPTURES)):
            check_choice(name, getattr(self, name), choices)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("workers", self.workers, 0)
        self._check_dataset()
        self._check_backbone()
        object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class HeadConfig:
    """How to fit a head.

    Attributes:
        clf: the head family, one of ``HEAD_NAMES``.
        tap: which tap of the cache; None takes the first.
        preprocessing: feature preprocessing; None takes the head's default.
        pca: PCA components where PCA is used.
        pool: pooling of spatial features: avg, max or flatten.
        grid: values of the swept hyper-parameter; empty takes the head's default grid.
        refine: rounds of the CLIP-style halving search around the best value of a log grid.
        seed: random state.
        train_cache, val_cache: explicit cache files; None locates them from the extract settings.
        stream: read train features in blocks instead of loading them (linear, logreg and svm heads);
            None streams when they exceed ``memory_budget_mb``.
        memory_budget_mb: the size above which train features are streamed.
        block_mb: bytes read at once when streaming.
        epochs: passes over the data for the linear head, and for every head when streaming.
        subset: fit on at most this many train images per class (stratified, drawn with ``seed``; the same
            images as ``pipeline finetune --subset`` with the same seed); None uses all.
        exclude: an audit's ``label_issues.csv``: its most suspect train and val images are left out of the fit
            and of the sweep on val. None, with ``exclude_top`` set, takes the audit beside the caches.
        exclude_top: how many of its first rows to leave out; None takes the rows the audit flagged.
    """

    clf: str = "logreg"
    tap: str | None = None
    preprocessing: str | None = None
    pca: int = 256
    pool: str = "avg"
    grid: tuple[float, ...] = ()
    refine: int = 2
    seed: int = 0
    train_cache: str | None = None
    val_cache: str | None = None
    stream: bool | None = None
    memory_budget_mb: int = 4096
    block_mb: int = 64
    epochs: int = 20
    subset: int | None = None
    exclude: str | None = None
    exclude_top: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.clf not in HEAD_NAMES:
            raise ValueError(f"unknown head {self.clf!r}; expected one of {', '.join(HEAD_NAMES)}")
        if self.preprocessing is not None and self.preprocessing not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing {self.preprocessing!r}; expected one of {', '.join(PREPROCESSING)}")
        check_choice("pool", self.pool, POOLS)
        for name, low in (("subset", 1), ("pca", 1), ("refine", 0), ("memory_budget_mb", 0), ("block_mb", 1), ("epochs", 1), ("exclude_top", 0)):
            check_at_least(name, getattr(self, name), low)
        object.__setattr__(self, "grid", tuple(self.grid))


@dataclass(frozen=True)
class FinetuneConfig(DatasetOptions, BackboneOptions):
    """How to fine-tune: the dataset and backbone (as for extract), the recipe, and the training settings.

    Training fields left at None (``model`` and ``weights`` too) take the recipe's value, else the default of
    ``FINETUNE_DEFAULTS``; explicit values override the recipe. After construction every field holds its
    resolved value.

    Attributes:
        recipe: a key of ``RECIPES``, or None.
        subset: train images per class (stratified, seeded); None uses all.
        eval_subset: images per class of val and target splits; None uses all.
        targets: extra splits evaluated every epoch: ``test``, or ``DIR[:SPLIT]``, another dataset folder with the
            same classes (default split test), e.g. a target domain.
        freeze: ``none``; ``backbone`` (train the new classifier only); or ``K``, the first K stages.
        optimizer: ``sgd`` (with momentum) or ``adamw``.
        lr: base learning rate.
        head_lr_mult: the new classifier's lr is ``lr * head_lr_mult``.
        backbone_lr_mult: every other trainable parameter's lr is ``lr * backbone_lr_mult``.
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        schedule: ``constant``, ``cosine`` (to zero at the end) or ``step`` (x gamma every step_epochs).
        warmup_epochs: linear warm-up, in epochs (fractions allowed).
        step_epochs, gamma: the step schedule.
        epochs: passes over the train split.
        batch_size: images per step.
        augment: ``none`` (eval preprocessing), ``crop-flip`` or ``crop-flip-rotate`` (rotation 30 degrees).
        head_init: the new classifier's init: ``torch`` (nn.Linear's own), ``xavier`` (uniform weight) or
            ``normal`` (N(0, 0.005) weight, bias 0.1).
        norm: ``frozen``: normalisation layers keep their running statistics (eval mode; scale and shift still
            train); ``train``: batch statistics, running statistics re-estimated on the new data.
        init_head: a ``linear`` (or logreg/svm without PCA) head fitted by fit-head on this backbone's cached
            features, to start from instead of a random classifier (LP-FT). Its learning-rate multiplier then
            defaults to 1: the head starts trained, and the 10x of a head trained from scratch undoes it.
        seed: seed of the classifier init, shuffling, augmentation and dropout.
        workers: DataLoader workers; None picks from the CPU count (0 on small CPUs).
        device, amp: as for extract: the one fast-path switch (bf16 autocast, channels_last).
        on_error: ``fail`` on an unreadable image, or ``skip`` it.
        log_every: a log line every N batches; 0 for none.
        output_dir: root of ``OUTPUT_DIR/<dataset>/<model>-<weights>/<name>/``.
        name: the run's folder name; None takes the recipe's name, else ``finetune``.
    """

    model: str | None = None  # None: the recipe's, else FINETUNE_DEFAULTS'
    weights: str | None = None
    recipe: str | None = None
    subset: int | None = None
    eval_subset: int | None = None
    targets: tuple[str, ...] = ()
    freeze: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    head_lr_mult: float | None = None
    backbone_lr_mult: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    step_epochs: int | None = None
    gamma: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    augment: str | None = None
    head_init: str | None = None
    norm: str | None = None
    init_head: str | None = None
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    amp: bool | None = None
    on_error: str = "fail"
    log_every: int | None = None
    output_dir: str = "runs"
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.freeze, numbers.Integral) and not isinstance(self.freeze, bool):
            object.__setattr__(self, "freeze", str(self.freeze))  # K stages, given as a number
        check_types(self)
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        preset = RECIPES[self.recipe].settings if self.recipe else {}
        if self.head_lr_mult is None and self.init_head:
            object.__setattr__(self, "head_lr_mult", 1.0)
        for key, default in FINETUNE_DEFAULTS.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset.get(key, default))
        if self.name is None:
            object.__setattr__(self, "name", self.recipe or "finetune")
        object.__setattr__(self, "freeze", str(self.freeze).strip().lower())
        object.__setattr__(self, "targets", tuple(self.targets))
        for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("augment", AUGMENTS),
                             ("head_init", HEAD_INITS), ("norm", NORMS), ("on_error", ON_ERROR)):
            check_choice(key, getattr(self, key), choices)
        if self.freeze not in ("none", "backbone") and not self.freeze.isdigit():
            raise ValueError(f"freeze must be none, backbone or a number of stages, got {self.freeze!r}")
        for key, low in (("epochs", 1), ("batch_size", 1), ("step_epochs", 1), ("subset", 1), ("eval_subset", 1), ("log_every", 0)):
            check_at_least(key, getattr(self, key), low)
        for key in ("lr", "head_lr_mult", "backbone_lr_mult", "weight_decay", "warmup_epochs", "gamma"):
            if getattr(self, key) < 0 or (key == "lr" and self.lr == 0):
                raise ValueError(f"{key} must be {'positive' if key == 'lr' else '0 or more'}, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})")
        check_at_least("workers", self.workers, 0)
        if any(not t.strip() for t in self.targets):
            raise ValueError("an empty --target; give a split name (test) or a dataset folder")
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        self._check_dataset()
        self._check_backbone()


@dataclass(frozen=True)
class ReportConfig:
    """What goes into the report and where it is written.

    Attributes:
        out_dir: root of ``OUT_DIR/<dataset>/<model>-<weights>/``.
        runs_dir: where ``pipeline finetune`` wrote its runs (``--output-dir``); their ``model.json`` files made
            from this dataset and backbone are included.
        quality_bar: a test top-1 the head chosen on val should reach; reported as met or not. None for none.
        projection: ``tsne`` or ``pca``, for the 2-D map of test features.
        projection_points: test images in that map (stratified).
        grid_images: misclassified test images shown.
        audit_images: images shown for each kind of suspect of the audit (label issues, duplicates, outliers).
        seed: seed of the samples drawn for the map and the grid.
    """

    out_dir: str = "reports"
    runs_dir: str = "runs"
    quality_bar: float | None = None
    projection: str = "tsne"
    projection_points: int = 2000
    grid_images: int = 24
    audit_images: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("projection", self.projection, PROJECTIONS)
        if self.quality_bar is not None and not 0 < self.quality_bar <= 1:
            raise ValueError(f"quality_bar is a top-1 accuracy in (0, 1], got {self.quality_bar}")
        if self.projection_points < 10 or self.grid_images < 1:
            raise ValueError("projection_points must be at least 10 and grid_images at least 1")
        check_at_least("audit_images", self.audit_images, 1)


@dataclass(frozen=True)
class AuditConfig:
    """How to audit a dataset on its cached features: wrong labels, duplicates and leakage across splits, outliers.

    Attributes:
        clf: the head whose out-of-fold probabilities (K-fold over train and val) rank the label issues.
        value: its swept hyper-parameter; None takes the value fit-head chose on val (the saved head's, else a fit).
        folds: K of the cross-validation.
        tap, preprocessing, pca, pool, seed: as for fit-head.
        threshold: the cosine similarity at or above which two images are near-duplicates (see bench/README.md
            for how the default was measured).
        dims: PCA components of the centred features the duplicate search compares; 0 compares them whole.
        neighbours: k of the outlier score, one minus the mean similarity to an image's k nearest neighbours.
        block_rows: rows compared at once by the duplicate search (memory: two blocks of similarities).
        train_cache, val_cache, test_cache: explicit cache files; None locates them from the extract settings (val
            and test are audited when they exist).
        output: the audit folder; None is ``audit/`` beside the caches.
    """

    clf: str = "logreg"
    value: float | None = None
    folds: int = 5
    tap: str | None = None
    preprocessing: str | None = None
    pca: int = 256
    pool: str = "avg"
    seed: int = 0
    threshold: float = 0.95
    dims: int = 256
    neighbours: int = 10
    block_rows: int = 4096
    train_cache: str | None = None
    val_cache: str | None = None
    test_cache: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        check_choice("clf", self.clf, HEAD_NAMES)
        if self.preprocessing is not None:
            check_choice("preprocessing", self.preprocessing, PREPROCESSING)
        check_choice("pool", self.pool, POOLS)
        for name, low in (("folds", 2), ("pca", 1), ("dims", 0), ("neighbours", 1), ("block_rows", 1)):
            check_at_least(name, getattr(self, name), low)
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.value is not None and self.value <= 0:
            raise ValueError(f"value must be positive, got {self.value}")
