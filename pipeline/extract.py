"""Stage one: run a frozen backbone once over a split and write its tapped features to the HDF5 cache."""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import layout, provenance
from .backbones import WeightsUnavailableError, load_backbone
from .cache import PartialRun, read_cache, write_cache
from .config import ExtractConfig
from .validate import expect_instance
from .data import ImageDataset, Split, load_splits, refuse_unreadable
from .distributed import Group, process_group
from .engines import BatchRunner
from .files import file_lock, remove_stale_temps
from .runtime import Runtime, resolve_runtime
from .taps import TapExtractor, resolve_taps

__all__ = ["ExtractConfig", "ExtractResult", "extract", "extract_splits", "extract_cache_path", "locate_cache", "auto_workers"]


@dataclass
class ExtractResult:
    """What one extraction did: ``status`` is ``extracted``, ``resumed`` or ``up-to-date``.

    ``n_computed`` counts the images decoded and run through the backbone by this call, over all ranks: less
    than ``n_images + n_skipped`` when earlier work was resumed.
    """

    path: Path
    status: str
    n_images: int
    n_skipped: int
    seconds: float = 0.0
    images_per_s: float = 0.0
    engine: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_computed: int = 0
    ignored: list[tuple[str, str]] = field(default_factory=list)
    split: str = ""


def auto_workers(device_type: str, ranks_on_node: int = 1) -> int:
    # The ranks of one node share its cores.
    cores = max(1, (os.cpu_count() or 1) // ranks_on_node)
    if device_type != "cpu":
        return min(8, cores)
    # On a CPU run the model keeps every core busy; a decoding process only competes with it unless there
    # are cores to spare (measured on 2 cores: 0 workers ran 15-20 % faster than 1, see bench/README.md).
    return min(4, cores // 4)


def extract_cache_path(config: ExtractConfig, weights: str, tap_slugs: list[str]) -> Path:
    """The cache path of a config: ``config.output`` or the convention under ``config.cache_dir``."""
    if config.output:
        return Path(config.output)
    return layout.cache_path(config.cache_dir, layout.dataset_key(config.cache_dir, config.data), config.model, weights, tap_slugs, config.split,
                             flip=config.flip)


def locate_cache(config: ExtractConfig) -> Path:
    """Where ``extract(config)`` writes its cache, found without loading weights or touching the data.

    Raises:
        ValueError: an unknown model, weights name or tap.
    """
    from .backbones import resolve_weights, weights_label

    weights = weights_label(resolve_weights(config.model, config.weights))
    return extract_cache_path(config, weights, list(_tap_slugs(config.model, tuple(config.layers), config.capture)))


@functools.lru_cache(maxsize=16)
def _tap_slugs(model_name: str, layers: tuple[str, ...], capture: str) -> tuple[str, ...]:
    """The taps' path components of a model, from its module tree alone (built on the meta device, about 0.1 s;
    fit-head and evaluate ask once per head)."""
    import torchvision

    with torch.device("meta"):  # the module tree only: no memory, no weights
        model = torchvision.models.get_model(model_name, weights=None)
    return tuple(t.slug for t in resolve_taps(model, list(layers), capture))


def extract(config: ExtractConfig | None = None, *, force: bool = False, progress: bool = True) -> ExtractResult:
    """Extract features of one split into the cache, resuming an interrupted run.

    A complete cache with the same settings is left alone (status ``up-to-date``); one with other settings is
    refused unless ``force``, and then kept, readable, until the new one is complete and renamed over it. Work
    is saved batch by batch, so an interrupted run continues where it stopped and ends with the same rows as an
    uninterrupted one. One process at a time writes a cache: a second stops with
    :class:`~pipeline.files.BusyError`.

    Under ``torchrun`` (or inside an initialised ``torch.distributed`` process group) every rank calls this
    with the same config: each extracts its own contiguous block of the split, rank 0 then assembles the one
    cache, rows in dataset order, equal to a single-process run's. Every rank returns the same result.

    Args:
        config: the settings; defaults to ``ExtractConfig()``.
        force: overwrite a cache or partial run made with other settings (a cache of these settings is kept).
        progress: show a progress bar with images/s and time left (rank 0 only).

    Returns:
        What was done, and where the cache is.

    Raises:
        ValueError: bad settings, a bad dataset, an unreadable file under ``on_error="fail"``, or a cache
            with other settings without ``force``. In a distributed run every rank raises
            :class:`~pipeline.distributed.RankError` when one of them fails.
    """
    config = ExtractConfig() if config is None else config
    expect_instance("extract's config", config, ExtractConfig)
    with ExitStack() as stack:
        return _extract_one(config, _Shared([config.split], stack), force=force, progress=progress)


def extract_splits(config: ExtractConfig | None = None, splits: Sequence[str] = ("train", "val", "test"), *, force: bool = False,
                   progress: bool = True, done: Callable[[ExtractResult], Any] | None = None) -> list[ExtractResult]:
    """:func:`extract` for several splits of one dataset, in order, sharing what they can: the dataset is scanned once
    (train and a val carved from it share a scan), and the backbone, its hooks and its engine (an ONNX export and
    check takes seconds) are built once. ``config.split`` is ignored; ``done`` is called with each split's result
    as soon as it is finished."""
    config = ExtractConfig() if config is None else config
    expect_instance("extract's config", config, ExtractConfig)
    if config.output and len(splits) > 1:
        raise ValueError("output names one file: extract one split with it")
    with ExitStack() as stack:
        shared = _Shared(list(splits), stack)
        results = []
        for split in splits:
            results.append(_extract_one(replace(config, split=split), shared, force=force, progress=progress))
            if done is not None:
                done(results[-1])
        return results


class _Shared:
    """What the extractions of one call share: the scanned splits, the backbone and its taps, the hooked model and
    the engine."""

    def __init__(self, splits: list[str], stack: ExitStack) -> None:
        self.splits, self.stack = splits, stack
        self._scanned: dict | None = None
        self.backbone: Any = None
        self.taps: list = []
        self.extractor: TapExtractor | None = None
        self.engine: Any = None

    def split(self, config: ExtractConfig) -> Split:
        if self._scanned is None:
            self._scanned = load_splits(config.dataset, self.splits)
        return self._scanned[config.split]

    def model(self, config: ExtractConfig) -> tuple[Any, list]:
        if self.backbone is None:
            self.backbone = load_backbone(config.model, config.weights, resize=config.resize, crop=config.crop, mean=config.mean, std=config.std)
            self.taps = resolve_taps(self.backbone.model, config.layers, config.capture)
        return self.backbone, self.taps

    def hooked(self, config: ExtractConfig) -> TapExtractor:
        """The model with its taps' hooks, held until the last split is done."""
        if self.extractor is None:
            self.extractor = self.stack.enter_context(TapExtractor(self.backbone.model, self.taps, flip=config.flip))
        return self.extractor


def _extract_one(config: ExtractConfig, shared: _Shared, *, force: bool, progress: bool) -> ExtractResult:
    runtime = resolve_runtime(config.device, config.amp, decode=config.decode)
    group, device = process_group(runtime.device)
    runtime = replace(runtime, device=device)
    with ExitStack() as held:  # rank 0 locks the cache from the start of its work to the end
        return _extract(config, runtime, group, held, shared, force=force, progress=progress and group.is_main)


# What a rank may fail with and the other ranks must hear about (anything else is a bug, and torchrun's to stop).
_ERRORS = (ValueError, TypeError, OSError, WeightsUnavailableError)


def _extract(config: ExtractConfig, runtime: Runtime, group: Group, held: ExitStack, shared: _Shared, *, force: bool,
             progress: bool) -> ExtractResult:
    root = Path(config.data)

    def prepare() -> tuple:
        split = shared.split(config)
        if len(split) == 0:
            raise ValueError(f"the {config.split} split of {root} has no images")
        return (split, *shared.model(config))

    split, backbone, taps = group.agree(prepare, _ERRORS)
    path = extract_cache_path(config, backbone.weights, [t.slug for t in taps])
    inputs = runtime.inputs(backbone.preprocess)  # float32 made here, or uint8 finished on the device; JPEGs read or decoded
    # What determines the cache's content; how fast it is made (batch size, workers, device, ranks) is left out.
    settings = {
        "dataset": config.dataset.name, "dataset_fingerprint": split.fingerprint, "split": config.split,
        "carved": split.carved, "model": config.model, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "taps": [t.name for t in taps], "preprocess": backbone.preprocess.to_dict(), "dtype": config.dtype,
        "compression": config.compression, "amp": runtime.amp, "engine": config.engine,
    }
    if config.decode != "host":  # another decoder and resize, other features; absent at the default, so older caches stay current
        settings["decode"] = config.decode
    if config.flip:  # likewise
        settings["flip"] = True
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    settings["preprocess"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings["preprocess"].items()}
    partial = PartialRun(path)
    decoded: dict[str, int] = {}  # images decoded unlike a plain RGB conversion, by kind (16-bit, float, transparent)

    def open_run() -> ExtractResult | bool:
        """On rank 0: the up-to-date result, or whether earlier work is resumed, with the partial run ready."""
        if not config.output:
            layout.claim_dataset(config.cache_dir, config.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(file_lock(path))
        remove_stale_temps(path)  # a final file that a killed run was writing
        if path.exists():
            try:
                with read_cache(path) as cache:
                    old, n_old, skipped_old = cache.attrs.get("settings"), len(cache), cache.skipped
            except ValueError:
                old, n_old, skipped_old = {"file": "unreadable or not a complete cache"}, 0, []
            if provenance.same(old, settings):  # force discards caches of other settings only; an up-to-date one is kept
                return ExtractResult(path, "up-to-date", n_old, len(skipped_old), skipped=skipped_old, split=config.split)
            if not force:
                resume = " (and to finish the interrupted run that began to)" if provenance.same(partial.settings(), settings) else ""
                raise ValueError(f"{path} was made with other settings ({'; '.join(provenance.diff(old, settings))}); pass --force to overwrite it{resume}")
            # Kept until the new cache is complete and renamed over it: readers go on reading it meanwhile, and an
            # interrupted --force run leaves it as it was.
        # Only when there is work to do: an up-to-date cache costs no scan of its images.
        refuse_unreadable(split, config.on_error, Path(config.cache_dir) / layout.dataset_key(config.cache_dir, config.data), kinds=decoded)
        if partial.exists() and not provenance.same(partial.settings(), settings):
            # A run that stopped before its first batch was saved holds nothing to lose: it is simply started over.
            if not force and partial.rows_done() > 0:
                diff = "; ".join(provenance.diff(partial.settings() or {}, settings))
                raise ValueError(f"an interrupted extraction in {partial.dir} used other settings ({diff}); pass --force to discard it")
            partial.remove()
        if not partial.exists():
            partial.start(settings)
        return partial.rows_done() > 0

    opened = group.broadcast(group.agree(open_run if group.is_main else lambda: None, _ERRORS))
    if isinstance(opened, ExtractResult):
        return opened

    def run() -> tuple[int, float, str]:
        """Extract what is missing of this rank's block; return (images done, seconds, engine name)."""
        lo, hi = group.range(len(split), align=config.batch_size)
        gaps = partial.missing(lo, hi)
        # Batches never straddle a gap's end, so each shard's name states exactly the rows it holds.
        batches = [list(range(a, min(a + config.batch_size, b))) for g0, b in gaps for a in range(g0, b, config.batch_size)]
        todo = sum(len(b) for b in batches)
        workers = auto_workers(runtime.device.type, group.local_world) if config.workers is None else config.workers
        loader = torch.utils.data.DataLoader(
            ImageDataset(root, split.paths, inputs.transform, encoded_jpegs=inputs.device_decode),
            batch_sampler=batches, num_workers=workers if batches else 0, collate_fn=inputs.collate,
            pin_memory=runtime.pin_memory, prefetch_factor=4 if workers and batches else None, persistent_workers=False,
        )
        dtype = np.dtype(config.dtype)
        desc = f"extract {config.split}" + (f" (rank 0 of {group.world}, rows {lo}-{hi - 1})" if group.distributed else "")
        t0 = time.perf_counter()
        with tqdm(
            total=hi - lo, initial=hi - lo - todo, unit="img", desc=desc, disable=not progress, dynamic_ncols=True, smoothing=0.1,
            mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not a flood
        ) as bar:
            runner = BatchRunner(loader, shared.hooked(config), config.engine, runtime, on_error=config.on_error, name=lambda i: str(root / split.paths[i]),
                                 parallel=config.parallel, inputs=inputs, engine=shared.engine)
            for batch, (index, features, bad) in zip(batches, runner):
                pos, stop = batch[0], batch[-1] + 1
                if features is not None:
                    feats = [f.astype(dtype, copy=False) for f in features]
                else:
                    feats = [np.zeros((0,), dtype) for _ in taps]
                partial.write(pos, stop, feats, index, bad)
                bar.update(stop - pos)
        shared.engine = runner.engine or shared.engine
        return todo, time.perf_counter() - t0, runner.engine.name if runner.engine else ""

    ranks = group.gather(group.agree(run, _ERRORS))  # also the barrier: every block is on disk after it
    done = sum(r[0] for r in ranks)
    seconds = max(r[1] for r in ranks)
    engine_name = next((r[2] for r in ranks if r[2]), config.engine)

    def finish() -> ExtractResult:
        """On rank 0: assemble the one cache from every rank's shards, and summarise it."""
        attrs = {
            "settings": settings, "dataset": config.dataset.name, "data_root": str(root.resolve()), "split": config.split,
            "model": config.model, "weights": backbone.weights, "taps": [t.name for t in taps],
            "preprocess": backbone.preprocess.to_dict(), "image_size": backbone.preprocess.crop, "dtype": config.dtype,
            "dataset_fingerprint": split.fingerprint, "split_seed": config.split_seed, "carved": split.carved or {},
            "engine": engine_name, "runtime": runtime.describe(), "versions": provenance.versions(),
            "created": provenance.now(), "batch_size": config.batch_size,
            "world_size": group.world, "n_ignored": len(split.ignored), "images_per_s": done / seconds if seconds > 0 else 0.0,
        }
        if provenance.COMMAND.get():
            attrs["command"] = provenance.COMMAND.get()
        attrs["decoding"] = decoded  # the header scan before the work saw every image of the split, resumed or not
        write_cache(
            partial, tap_names=[t.name for t in taps], paths=split.paths, labels=split.labels, classes=split.classes,
            rejected=[(r.path, r.reason) for r in split.rejected], attrs=attrs, compression=config.compression,
        )
        with read_cache(path) as cache:
            skipped, n_rows = cache.skipped, len(cache)
        status = "resumed" if opened else "extracted"
        return ExtractResult(path, status, n_rows, len(skipped), seconds, attrs["images_per_s"], engine_name, skipped, n_computed=done,
                             ignored=[(r.path, r.reason) for r in split.ignored], split=config.split)

    return group.broadcast(group.agree(finish if group.is_main else lambda: None, _ERRORS))
