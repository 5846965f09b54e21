"""The fine-tune run: its folder, the epoch loop over train, val and targets, and the resumable checkpoint."""

from __future__ import annotations

import json
import pickle
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import caveats, layout, provenance
from ..backbones import resolve_weights, weights_label
from ..config import BACKBONE_AND_DATASET, ExtractConfig, FinetuneConfig
from ..extract import auto_workers
from ..data import load_splits
from ..files import atomic_write, file_lock, file_sha256, remove_stale_temps
from ..recipes import RECIPES
from ..runtime import Runtime, resolve_runtime
from .freeze import set_train_mode
from .inputs import _loader, _parse_target, _Part, _part, refuse_unreadable_parts, train_transform
from .lpft import build_model
from .optim import build_optimizer, build_scheduler, param_groups

__all__ = ["FinetuneResult", "run_dir", "resolve_init_head", "finetune"]

_RESUME_HINT = "; a re-run of the same command resumes after the last saved epoch"


@dataclass
class FinetuneResult:
    """What one fine-tune did: ``status`` is ``trained``, ``resumed`` or ``up-to-date``."""

    path: Path
    run_dir: Path
    status: str
    best_epoch: int
    val_accuracy: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_dir(config: FinetuneConfig) -> Path:
    """Where a fine-tune writes: ``OUTPUT_DIR/<dataset>/<model>-<weights>/<name>/``."""
    weights = weights_label(resolve_weights(config.model, config.weights))
    return layout.run_dir(config.output_dir, layout.dataset_key(config.output_dir, config.data), config.model, weights, config.name)


def _logits(out: Any) -> torch.Tensor:
    # Inception and GoogLeNet return (logits, aux...) named tuples in train mode.
    return out.logits if hasattr(out, "logits") else out


def _batches(model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime) -> Iterator[tuple[np.ndarray, torch.Tensor | None, list]]:
    """Eval-mode forward passes: (positions, logits on the device or None, bad images) per batch."""
    with torch.no_grad():
        for index, x, bad in loader:
            if x is None:
                yield index, None, bad
                continue
            with runtime.autocast():
                out = _logits(model(runtime.to_device(x)))
            yield index, out.float(), bad


def _evaluate(model: nn.Module, part: _Part, loader: torch.utils.data.DataLoader, runtime: Runtime, on_error: str, progress: bool) -> tuple[float, float]:
    set_train_mode(model, False)
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    n = 0
    labels = torch.from_numpy(part.labels)
    for index, logits, bad in tqdm(_batches(model, loader, runtime), total=len(loader), desc=f"  {part.label}", unit="batch",
                                   disable=not progress, leave=False, dynamic_ncols=True):
        _fail_on_bad(bad, part, on_error)
        if logits is None:
            continue
        y = labels[torch.from_numpy(index)].to(runtime.device)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    if n == 0:
        raise ValueError(f"no readable image in the {part.label} split")
    return float(loss_sum) / n, int(correct) / n


def _fail_on_bad(bad: list[tuple[int, str]], part: _Part, on_error: str) -> None:
    if bad and on_error == "fail":
        i, why = bad[0]
        raise ValueError(f"{part.root / part.paths[i]}: {why}; fix or remove the file, or pass --on-error skip")


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), hint=_RESUME_HINT)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _rng_state(runtime: Runtime) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_checkpoint(path: Path, force: bool) -> tuple[dict[str, Any], dict] | None:
    """``last.pt`` and the settings it was saved with; None for a damaged file when ``force`` (the run starts over).

    Raises:
        ValueError: a file that does not read back as a checkpoint (cut short, overwritten), without ``force``.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), str):
            raise ValueError("no settings recorded")
        return saved, json.loads(saved["settings"])
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        if force:
            return None
        # torch's messages run to several sentences (and the weights-only one suggests an unsafe load): keep the first
        why = str(e).split(". ")[0].splitlines()[0] if isinstance(e, (RuntimeError, ValueError)) and str(e) else "not a whole checkpoint"
        raise ValueError(f"{path} is damaged ({why}); pass --force to start the run over, or --name for another run") from None


def _json(obj: Any) -> Any:
    """The JSON view of settings, so that saved and fresh ones compare equal (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def resolve_init_head(config: FinetuneConfig, source: ExtractConfig | None = None) -> FinetuneConfig:
    """``config`` with ``init_head`` as a metadata path: a head's name (``linear``, ``subset-100/linear``) is looked
    up in the heads folder of the caches that ``source`` locates (default: this config's dataset and backbone).

    Raises:
        ValueError: a name with no head of that name.
    """
    name = config.init_head
    if not name or Path(name).is_file() or name.endswith(".json"):
        return config
    from ..fit import locate_head

    source = source or ExtractConfig(**{k: getattr(config, k) for k in BACKBONE_AND_DATASET})
    found = locate_head(name, source=source)
    if not found.is_file():
        raise ValueError(f"--init-head {name}: no head file of that name, and no {found}; fit it with pipeline fit-head first")
    return replace(config, init_head=str(found))


def finetune(config: FinetuneConfig | None = None, *, source: ExtractConfig | None = None, force: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune a backbone with a new classifier on the train split, keeping the epoch with the best val accuracy.

    Every epoch trains on train (augmented), then evaluates val and each target split, appends a row to
    ``history.csv`` and saves ``last.pt``. A re-run with the same settings resumes from ``last.pt`` and ends with
    the same model as an uninterrupted run; a finished run is left alone (``up-to-date``); other settings are
    refused unless ``force``. The result, ``model.pt`` + ``model.json``, is accepted by evaluate and predict. One
    process at a time runs a fine-tune in one folder.

    Args:
        config: the settings; defaults to ``FinetuneConfig()``.
        source: the extract settings whose heads folder ``init_head`` names a head in (see :func:`resolve_init_head`).
        force: discard a run of other settings, or a damaged one, in the same folder.
        progress: progress bars within the epoch.
        log: receives one line per epoch (loss, accuracy per phase, lr, seconds) and every ``log_every`` batches.

    Returns:
        Where the model is, the best epoch and its val accuracy, and the history.

    Raises:
        ValueError: bad settings or data, an unusable ``init_head``, or (without ``force``) a run of other settings or
            a damaged ``last.pt`` or ``model.json``.
        BusyError: another process is running the same fine-tune (same folder).
    """
    with ExitStack() as held:  # the run folder's lock, from before its files are looked at to the end
        return _finetune(config, source, held, force=force, progress=progress, log=log)


def _finetune(config: FinetuneConfig | None, source: ExtractConfig | None, held: ExitStack, *, force: bool, progress: bool,
              log: Callable[[str], None] | None) -> FinetuneResult:
    config = resolve_init_head(config or FinetuneConfig(), source)
    say = log or (lambda line: None)
    spec = config.dataset
    scanned = load_splits(spec, ["train", "val"])  # one scan of train/ when val is carved from it
    train, train_split = _part("train", spec, "train", config.subset, config.seed, None, scanned["train"])
    classes = train_split.classes
    present = np.unique(train.labels)
    if len(present) < 2:
        raise ValueError(f"the train split of {train.root} has a single class; a classifier needs two or more")
    val, val_split = _part("val", spec, "val", config.eval_subset, config.seed, classes, scanned["val"])
    read = [(train, train_split), (val, val_split)]  # what the run reads, checked for unreadable images once there is work
    targets = []
    for t in config.targets:
        label, tspec, tsplit = _parse_target(t, spec)
        if label in [p.label for p in targets]:
            raise ValueError(f"--target {t} is given twice")
        read.append(_part(label, tspec, tsplit, config.eval_subset, config.seed, classes))
        targets.append(read[-1][0])

    model, backbone, layer = build_model(config, classes)
    runtime = resolve_runtime(config.device, config.amp)
    out = run_dir(config)
    init_meta = json.loads(layout.head_files(config.init_head).meta.read_text()) if config.init_head else None
    init_sha = init_meta["artifact_sha256"] if init_meta else None
    notes = caveats.mirrored_probe(init_meta)
    skip = ("workers", "device", "log_every", "output_dir", "name")
    settings = _json({
        **{k: v for k, v in asdict(config).items() if k not in skip}, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "preprocess": backbone.preprocess.to_dict(), "amp": runtime.amp, "classes": classes, "classifier": layer,
        "train_fingerprint": train.fingerprint, "val_fingerprint": val.fingerprint,
        "target_fingerprints": {p.label: p.fingerprint for p in targets}, "init_head_sha256": init_sha,
    })
    files = layout.run_files(out)
    layout.claim_dataset(config.output_dir, config.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    held.enter_context(file_lock(out))
    for p in (files.meta, files.model, files.last, files.history):
        remove_stale_temps(p)  # of a killed run

    if files.meta.exists():
        recorded = provenance.read_record(files.meta)
        if recorded is None and not force:
            raise ValueError(f"{files.meta} is unreadable; pass --force to start the run over, or --name for another run")
        old = (recorded or {}).get("settings")
        if provenance.same(old, settings):  # force discards runs of other settings only; a finished run of these is kept
            if files.model.exists():
                return FinetuneResult(files.meta, out, "up-to-date", recorded["best_epoch"], recorded["val_accuracy"], recorded["seconds"], recorded["history"],
                                          list(recorded.get("warnings", [])))
        elif not force:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(provenance.diff(old or {}, settings))}); pass --force to overwrite it, or --name for another run")
    refuse_unreadable_parts(read, config.on_error)  # only now: an up-to-date run costs no decoding
    checkpoint = None
    if files.last.exists() and not files.meta.exists():
        saved = _read_checkpoint(files.last, force)  # None: damaged, and force starts over
        if saved is not None and provenance.same(saved[1], settings):
            checkpoint = saved[0]  # an interrupted run of these settings: resume it, --force or not
        elif saved is not None and not force:
            raise ValueError(f"an interrupted fine-tune in {out} used other settings ({'; '.join(provenance.diff(saved[1], settings))}); pass --force to discard it, or --name for another run")
    if checkpoint is None:
        for p in (files.meta, files.model, files.last, files.history):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    model = runtime.prepare(model)
    workers = auto_workers(runtime.device.type) if config.workers is None else config.workers
    # The last, partial batch is kept; only a lone last image is left out where batch statistics need two.
    drop_last = config.norm == "train" and len(train.paths) > config.batch_size and len(train.paths) % config.batch_size == 1
    if drop_last:
        say(f"1 of {len(train.paths)} train images (a different one each epoch) is left out: BatchNorm layers in train mode "
            "cannot normalise a batch of one; --batch-size or --norm frozen avoids it")
    steps_per_epoch = len(train.paths) // config.batch_size if drop_last else -(-len(train.paths) // config.batch_size)
    optimizer = build_optimizer(param_groups(model, layer, config.lr, config.head_lr_mult, config.backbone_lr_mult),
                                config.optimizer, config.lr, config.momentum, config.weight_decay)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    eval_tf = backbone.preprocess.transform()
    eval_loaders = [(p, _loader(p, eval_tf, config.batch_size, workers, runtime)) for p in (val, *targets)]
    train_tf = train_transform(backbone.preprocess, config.augment)
    history: list[dict] = []
    best_epoch, best_acc, best_state = 0, -1.0, None
    start = 1
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    status = "trained"
    t_all = time.perf_counter()
    # The caller's random state is left as it was; inside, the seed (or the checkpoint) decides.
    with torch.random.fork_rng(devices=devices):
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            _set_rng_state(checkpoint["rng"], runtime)
            history = json.loads(checkpoint["history"])
            best_epoch, best_acc, best_state = checkpoint["best_epoch"], checkpoint["best_val_acc"], checkpoint["best_state"]
            start = checkpoint["epoch"] + 1
            status = "resumed"
            say(f"resuming {out} after epoch {checkpoint['epoch']}")
            del checkpoint
        else:
            torch.manual_seed(config.seed)
            if runtime.device.type == "cuda":
                torch.cuda.manual_seed_all(config.seed)
            # Epoch 0: the model as initialised, so the history shows at once whether the start is the probe's.
            t0 = time.perf_counter()
            row = {"epoch": 0, "lr_head": "", "lr_backbone": ""}
            train_eval = _loader(train, eval_tf, config.batch_size, workers, runtime)
            row["train_loss"], row["train_acc"] = _evaluate(model, train, train_eval, runtime, config.on_error, progress)
            for part, eval_loader in eval_loaders:
                row[f"{part.label}_loss"], row[f"{part.label}_acc"] = _evaluate(model, part, eval_loader, runtime, config.on_error, progress)
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            best_epoch, best_acc, best_state = 0, row["val_acc"], _cpu_state(model)
            phases = "  ".join(f"{p} loss {row[f'{p}_loss']:.4f} acc {row[f'{p}_acc']:.4f}" for p in ["train", "val", *[t.label for t in targets]])
            say(f"epoch 0/{config.epochs} (as initialised)  {phases}  {row['seconds']:.1f} s")
        for epoch in range(start, config.epochs + 1):
            t0 = time.perf_counter()
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
            loader = _loader(train, train_tf, config.batch_size, workers, runtime,
                             generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch), drop_last=drop_last)
            loss, acc = _train_epoch(model, loader, train, optimizer, scheduler, runtime, config, epoch, progress, say)
            row: dict[str, Any] = {"epoch": epoch, "lr_head": lrs.get("head", ""), "lr_backbone": lrs.get("backbone", ""),
                                   "train_loss": loss, "train_acc": acc}
            for part, eval_loader in eval_loaders:
                row[f"{part.label}_loss"], row[f"{part.label}_acc"] = _evaluate(model, part, eval_loader, runtime, config.on_error, progress)
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            better = row["val_acc"] > best_acc
            if better:
                best_epoch, best_acc, best_state = epoch, row["val_acc"], _cpu_state(model)
            provenance.write_history(history, files.history, hint=_RESUME_HINT)
            _atomic_save({
                "settings": json.dumps(settings), "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(runtime), "history": json.dumps(history),
                "best_epoch": best_epoch, "best_val_acc": best_acc, "best_state": best_state,
            }, files.last)
            phases = "  ".join(f"{p} loss {row[f'{p}_loss']:.4f} acc {row[f'{p}_acc']:.4f}" for p in ["train", "val", *[t.label for t in targets]])
            lr_text = "/".join(f"{v:.2e}" for v in lrs.values())
            say(f"epoch {epoch}/{config.epochs}  {phases}  lr {lr_text}  {row['seconds']:.1f} s{'  *best' if better else ''}")
    seconds = time.perf_counter() - t_all + (sum(r["seconds"] for r in history[:start]) if status == "resumed" else 0.0)

    state = {"format": layout.FINETUNED_FORMAT, "format_version": layout.FINETUNED_FORMAT_VERSION, "model": config.model, "classifier": layer,
             "classes": list(classes), "preprocess": _json(backbone.preprocess.to_dict()), "epoch": best_epoch, "state_dict": best_state}
    _atomic_save(state, files.model)
    meta = {
        "format": layout.FINETUNED_FORMAT, "format_version": layout.FINETUNED_FORMAT_VERSION, "artifact": files.model.name, "artifact_sha256": file_sha256(files.model),
        "clf": "finetune", "model": config.model, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "classifier": layer, "classes": list(classes), "preprocess": _json(backbone.preprocess.to_dict()),
        "dataset": {"name": spec.name, **_json(asdict(spec)), "root": str(Path(spec.root).resolve())},
        "best_epoch": best_epoch, "val_accuracy": best_acc, "seconds": seconds, "history": history,
        "targets": [p.label for p in targets], "init_head": config.init_head, "runtime": runtime.describe(),
        "config": _json(asdict(config)), "settings": settings, "recipe": config.recipe,
        "recipe_source": RECIPES[config.recipe].source if config.recipe else None, "warnings": notes,
        **provenance.stamp(settings),
    }
    atomic_write(files.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()), hint=_RESUME_HINT)
    return FinetuneResult(files.meta, out, status, best_epoch, best_acc, seconds, history, notes)


def _train_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, part: _Part, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, runtime: Runtime, config: FinetuneConfig, epoch: int,
                 progress: bool, say: Callable[[str], None]) -> tuple[float, float]:
    set_train_mode(model, True, config.norm)
    labels = torch.from_numpy(part.labels)
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    n = 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    with bar:
        for i, (index, x, bad) in enumerate(loader, 1):
            _fail_on_bad(bad, part, config.on_error)
            if x is not None:
                y = labels[torch.from_numpy(index)].to(runtime.device)
                with runtime.autocast():
                    logits = _logits(model(runtime.to_device(x))).float()
                loss = nn.functional.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                n += len(y)
            scheduler.step()
            bar.update(1)
            if n and (i % 10 == 0 or i == len(loader)):
                bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}", acc=f"{int(correct) / n:.3f}", refresh=False)
            if config.log_every and i % config.log_every == 0 and n:
                say(f"  epoch {epoch} batch {i}/{len(loader)}  loss {float(loss_sum) / n:.4f}  acc {int(correct) / n:.4f}")
    if n == 0:
        raise ValueError(f"no readable image in the train split of {part.root}")
    return float(loss_sum) / n, int(correct) / n
