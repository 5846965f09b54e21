"""The settings of extraction, head fitting, the report and the audit: one frozen dataclass per stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import check_at_least, check_choice, check_types
from .shared import (
    CAPTURES, COMPRESSIONS, DECODES, DTYPES, ENGINES, HEAD_NAMES, ON_ERROR, PARALLEL, POOLS, PREPROCESSING, PROJECTIONS, SPLITS, BackboneOptions,
    DatasetOptions,
)

__all__ = ["ExtractConfig", "HeadConfig", "ReportConfig", "AuditConfig"]


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
        parallel: how the ONNX Runtime engine uses the cores: ``operators`` (one run at a time, each operator split
            over every core) or ``batches`` (one single-threaded run per core, each on its own batch: it degrades
            with the CPU actually free on a busy machine instead of stalling at every operator). The eager engine
            ignores it. Not part of a cache's identity: the features are the same either way.
        decode: where JPEG files (known by their first bytes) are decoded: ``host``, by the DataLoader workers with
            PIL, as every other format; or ``device``, a batch at a time by torchvision's ``decode_jpeg`` on the
            extraction's device (nvJPEG on CUDA, libjpeg-turbo on the CPU), then resized, cropped and normalised
            there, the workers only reading the files. Another decoder and resize, so features within a tolerance
            of the host's (README) and part of a cache's identity; other formats are decoded on the host either way.
        flip: average each image's features with those of its horizontal mirror (test-time augmentation; twice
            the forward work). Part of a cache's identity and path, and applied again by predict and export.
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
    # batches: on 2 cores, as fast as operators when quiet (1.05x) and above 0.4x of that beside two busy processes,
    # where operators fell to 0.26x before torch was held to one thread around the engine (bench/busy_bench.py).
    parallel: str = "batches"
    decode: str = "host"
    flip: bool = False
    on_error: str = "fail"
    cache_dir: str = "features"
    output: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        for name, choices in (("split", SPLITS), ("dtype", DTYPES), ("compression", COMPRESSIONS), ("engine", ENGINES),
                              ("parallel", PARALLEL), ("decode", DECODES), ("on_error", ON_ERROR), ("capture", CAPTURES)):
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
        tap: which tap of the cache: a name, several joined by ``+`` (side by side, spatial maps averaged), or
            ``auto`` (val chooses among each tap and all of them joined); None takes the first.
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
