"""Fine-tuning: a backbone with a new classifier trained end to end on images, resumable, into one model file."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from . import layout, provenance
from .artifacts import TamperedArtifactError, load_head, read_meta, verified_artifact
from .backbones import Backbone, Preprocess, file_sha256, final_linear, load_backbone, replace_classifier, resolve_weights, weights_label
from .config import AUGMENTS, BACKBONE_AND_DATASET, HEAD_INITS, OPTIMIZERS, SCHEDULES, SPLITS, DatasetSpec, ExtractConfig, FinetuneConfig
from .data import ImageDataset, Split, collate_batch, load_split, stratified_subset
from .extract import auto_workers
from .files import atomic_write
from .recipes import RECIPES, Recipe
from .runtime import Runtime, resolve_runtime
from .taps import FeatureHooks, Tap, default_tap

__all__ = [
    "FinetuneConfig", "FinetuneResult", "Recipe", "RECIPES", "finetune", "resolve_init_head", "build_model", "run_dir",
    "backbone_stages", "apply_freeze", "set_train_mode", "param_groups", "build_optimizer",
    "build_scheduler", "lr_factor", "train_transform", "stratified_subset", "linear_init_from_head",
]

_RESUME_HINT = "; a re-run of the same command resumes after the last saved epoch"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


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


def run_dir(config: FinetuneConfig) -> Path:
    """Where a fine-tune writes: ``OUTPUT_DIR/<dataset>/<model>-<weights>/<name>/``."""
    weights = weights_label(resolve_weights(config.model, config.weights))
    return layout.run_dir(config.output_dir, config.dataset.name, config.model, weights, config.name)


# ---------------------------------------------------------------- the model: classifier, stages, freezing


def backbone_stages(model: nn.Module, classifier: str | None = None) -> list[tuple[str, list[str]]]:
    """The stages of a backbone, input first, as (label, module names); the unit of ``freeze=K``.

    - ResNet/ResNeXt/Wide-ResNet: ``conv1+bn1``, then ``layer1`` ... ``layer4``.
    - RegNet: ``stem``, then the blocks of ``trunk_output``.
    - Models with a ``features`` (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, Swin...) or ``layers``
      (MNASNet) sequence: its children.
    - Any other model: its top-level children with parameters, before the classifier's.

    Parameters held directly by the root module (e.g. ViT's ``class_token``) belong to the first stage.
    """
    if classifier is None:
        classifier, _ = final_linear(model)
    top = classifier.split(".")[0]
    children = dict(model.named_children())
    if all(n in children for n in ("conv1", "bn1", "layer1", "layer4")):
        return [("conv1+bn1", ["conv1", "bn1"])] + [(n, [n]) for n in ("layer1", "layer2", "layer3", "layer4") if n in children]
    if "stem" in children and isinstance(children.get("trunk_output"), nn.Sequential):
        blocks = [f"trunk_output.{n}" for n, _ in children["trunk_output"].named_children()]
        return [("stem", ["stem"])] + [(b, [b]) for b in blocks]
    for seq in ("features", "layers"):
        if isinstance(children.get(seq), nn.Sequential) and seq != top:
            return [(f"{seq}.{n}", [f"{seq}.{n}"]) for n, m in children[seq].named_children() if any(True for _ in m.parameters())]
    stages = []
    for n, m in children.items():
        if n == top:
            break
        if any(True for _ in m.parameters()) and n not in ("aux1", "aux2", "AuxLogits"):  # train-only side heads
            stages.append((n, [n]))
    return stages


def apply_freeze(model: nn.Module, freeze: str | int, classifier: str) -> list[str]:
    """Set ``requires_grad`` for a freezing choice; the classifier layer always trains.

    Args:
        model: the model, changed in place.
        freeze: ``none``, ``backbone`` (everything but the classifier layer) or K: the first K of
            :func:`backbone_stages`.
        classifier: the classifier layer's name.

    Returns:
        The frozen stages' labels (``["backbone"]`` for the whole backbone).

    Raises:
        ValueError: an unknown choice, or more stages than the model has.
    """
    freeze = str(freeze).strip().lower()
    model.requires_grad_(True)
    if freeze == "none":
        return []
    if freeze == "backbone":
        model.requires_grad_(False)
        model.get_submodule(classifier).requires_grad_(True)
        return ["backbone"]
    if not freeze.isdigit():
        raise ValueError(f"freeze must be none, backbone or a number of stages, got {freeze!r}")
    stages = backbone_stages(model, classifier)
    k = int(freeze)
    if k > len(stages):
        raise ValueError(
            f"cannot freeze {k} stages: {type(model).__name__} has {len(stages)} ({', '.join(s for s, _ in stages)}); "
            "use --freeze backbone to freeze all of it"
        )
    if k:
        for p in model.parameters(recurse=False):
            p.requires_grad_(False)
    for _, names in stages[:k]:
        for n in names:
            model.get_submodule(n).requires_grad_(False)
    return [s for s, _ in stages[:k]]


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """``model.train(training)``, except that frozen normalisation layers stay in eval mode.

    A BatchNorm (or InstanceNorm with running stats) whose parameters are all frozen keeps using and keeping its
    running statistics, so they do not drift towards the new data while its scale and shift cannot follow.
    """
    model.train(training)
    if training:
        for m in model.modules():
            if isinstance(m, _NORMS):
                params = list(m.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    m.eval()
    return model


# ---------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, classifier: str, lr: float, head_lr_mult: float, backbone_lr_mult: float) -> list[dict]:
    """Optimizer parameter groups: ``head`` (the classifier layer) and ``backbone`` (the rest), trainable only.

    Frozen parameters are left out; an empty group is dropped.
    """
    head_ids = {id(p) for p in model.get_submodule(classifier).parameters()}
    head = [p for p in model.get_submodule(classifier).parameters() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"name": "head", "params": head, "lr": lr * head_lr_mult}, {"name": "backbone", "params": rest, "lr": lr * backbone_lr_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over parameter groups that carry their own ``lr``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, schedule: str = "constant", warmup_steps: int = 0,
              step_epochs: int = 7, gamma: float = 0.1) -> float:
    """The multiplier of every group's lr at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from 1/warmup_steps to 1), then ``constant``; ``cosine`` from 1 to 0
    over the remaining steps; or ``step``: ``gamma`` to the power of completed ``step_epochs``.
    """
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        t = max(0, step - warmup_steps)
        span = max(1, total_steps - warmup_steps)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    if schedule == "step":
        return warm * gamma ** ((step // max(1, steps_per_epoch)) // step_epochs)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR of :func:`lr_factor` with the config's schedule and warm-up."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, steps_per_epoch=steps_per_epoch, schedule=config.schedule,
                         warmup_steps=warmup, step_epochs=config.step_epochs, gamma=config.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- data


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


def _part(label: str, spec: DatasetSpec, split_name: str, per_class: int | None, seed: int, on_error: str, classes: list[str] | None) -> tuple[_Part, Split]:
    split = load_split(spec, split_name)
    root = Path(spec.root)
    if split.rejected and on_error == "fail":
        path, why = split.rejected[0].path, split.rejected[0].reason
        more = f" (and {len(split.rejected) - 1} more)" if len(split.rejected) > 1 else ""
        raise ValueError(f"{root / path}: {why}{more}; remove it or pass --on-error skip")
    if len(split) == 0:
        raise ValueError(f"the {split_name} split of {root} has no images")
    if classes is not None and split.classes != classes:
        raise ValueError(f"{label}: {root} has classes {split.classes[:10]}, the train split has {classes[:10]}")
    pick = stratified_subset(split.labels, per_class, seed)
    return _Part(label, root, [split.paths[i] for i in pick], split.labels[pick], split.fingerprint), split


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


def _logits(out: Any) -> torch.Tensor:
    # Inception and GoogLeNet return (logits, aux...) named tuples in train mode.
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- LP-FT: a fitted linear head as the start


def _same_preprocess(a: dict, b: dict) -> bool:
    norm = lambda d: {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}  # noqa: E731
    return norm(a) == norm(b)


def linear_init_from_head(head: str | os.PathLike, backbone: Backbone, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a classifier layer that computes what a fitted linear head computes.

    The head's standardization is folded into the layer (``W' = W / scale``, ``b' = b - W' @ mean``), so the
    fine-tuned model starts with the head's decision function on the classifier's input.

    Args:
        head: the head's ``.json``, fitted by fit-head on caches of this backbone at its classifier-input tap.
        backbone: the backbone to fine-tune (before its classifier is replaced).
        classes: the dataset's classes, in order.

    Raises:
        ValueError: a head of another model, weights or preprocessing; another tap; other classes; or a head that
            is not linear in the features (PCA, l2, trees, kNN, ...).
    """
    from sklearn.preprocessing import StandardScaler

    from .heads import SpatialPool

    art = load_head(head)
    feats = art.meta.get("features", {})
    mine = {"model": backbone.name, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256, "preprocess": backbone.preprocess.to_dict()}
    diff = [f"{k}: head {feats.get(k)!r}, fine-tune {v!r}" for k, v in mine.items()
            if not (_same_preprocess(feats.get(k) or {}, v) if k == "preprocess" else feats.get(k) == v)]
    if diff:
        raise ValueError(f"{art.path} was fitted on features of another backbone ({'; '.join(diff)}); extract and fit a head with the same --model, --weights and preprocessing")
    if art.classes != list(classes):
        raise ValueError(f"{art.path} was fitted on classes {art.classes[:10]}, the dataset has {list(classes)[:10]}")
    model = backbone.model
    layer, linear = final_linear(model)
    tap = Tap.parse(art.meta["tap"])
    allowed = {f"{layer}:input", default_tap(model).name}
    if tap.name not in allowed:
        raise ValueError(f"{art.path} was fitted on the tap {tap.name}; initialising {layer} needs features of its input ({' or '.join(sorted(allowed))})")
    _check_feeds_classifier(model, tap, layer, backbone.preprocess.crop)

    *pre, (clf_name, clf) = art.pipeline.steps
    mean = np.zeros(linear.in_features)
    scale = np.ones(linear.in_features)
    for step_name, step in pre:
        if isinstance(step, SpatialPool) and len(step.input_shape_) == 1:
            continue
        if isinstance(step, StandardScaler):
            mean = step.mean_ if step.mean_ is not None else mean
            scale = step.scale_ if step.scale_ is not None else scale
            continue
        raise ValueError(
            f"{art.path} has a {step_name} step ({type(step).__name__}); only a linear head on the features, with at most "
            "standardization, can initialise a layer: fit one with --clf linear (or logreg/svm with --preprocessing standardize)"
        )
    if not (hasattr(clf, "coef_") and hasattr(clf, "intercept_")):
        raise ValueError(f"{art.path} is a {art.meta.get('clf')} head, not a linear one; use --clf linear (or logreg, svm) heads with --init-head")
    coef, intercept = np.asarray(clf.coef_, np.float64), np.atleast_1d(np.asarray(clf.intercept_, np.float64))
    fitted = np.asarray(clf.classes_)
    k = len(classes)
    if coef.shape[0] == 1 and len(fitted) == 2:  # a binary scikit-learn model: one score for the second class
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    if fitted.tolist() != list(range(k)) or coef.shape != (k, linear.in_features):
        raise ValueError(f"{art.path} scores classes {fitted.tolist()} with {coef.shape[1]} features; {layer} needs all {k} classes and {linear.in_features} features")
    weight = coef / scale[None, :]
    bias = intercept - weight @ mean
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def _check_feeds_classifier(model: nn.Module, tap: Tap, layer: str, size: int) -> None:
    """Refuse a tap whose features are not what the classifier layer receives (e.g. a norm layer between them)."""
    taps = [tap, Tap(layer, "input")] if tap.name != f"{layer}:input" else [tap]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    with FeatureHooks(model, taps) as hooks, torch.no_grad():
        model.eval()
        model(x)
        got = hooks.pop()
    a, b = got[taps[0].name].flatten(1), got[taps[-1].name].flatten(1)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the tap {tap.name} is not the input of {layer} in {type(model).__name__}; a head on it cannot initialise {layer}")


# ---------------------------------------------------------------- building and running


def build_model(config: FinetuneConfig, classes: Sequence[str]) -> tuple[nn.Module, Backbone, str]:
    """The backbone with its new classifier (random, or from ``init_head``), frozen as configured, on the CPU.

    Returns:
        (model, backbone as loaded, the classifier layer's name).
    """
    backbone = load_backbone(config.model, config.weights, resize=config.resize, crop=config.crop, mean=config.mean, std=config.std)
    model = backbone.model
    init = linear_init_from_head(config.init_head, backbone, list(classes)) if config.init_head else None
    layer = replace_classifier(model, len(classes), config.head_init, torch.Generator().manual_seed(config.seed))
    if init is not None:
        with torch.no_grad():
            model.get_submodule(layer).weight.copy_(init[0])
            model.get_submodule(layer).bias.copy_(init[1])
    apply_freeze(model, config.freeze, layer)
    model.eval()
    return model, backbone, layer


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
    from .fit import locate_head

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
    refused unless ``force``. The result, ``model.pt`` + ``model.json``, is accepted by evaluate and predict.

    Args:
        config: the settings; defaults to ``FinetuneConfig()``.
        source: the extract settings whose heads folder ``init_head`` names a head in (see :func:`resolve_init_head`).
        force: discard a run of other settings in the same folder.
        progress: progress bars within the epoch.
        log: receives one line per epoch (loss, accuracy per phase, lr, seconds) and every ``log_every`` batches.

    Returns:
        Where the model is, the best epoch and its val accuracy, and the history.

    Raises:
        ValueError: bad settings or data, an unusable ``init_head``, or a run of other settings without ``force``.
    """
    config = resolve_init_head(config or FinetuneConfig(), source)
    say = log or (lambda line: None)
    spec = config.dataset
    train, train_split = _part("train", spec, "train", config.subset, config.seed, config.on_error, None)
    classes = train_split.classes
    present = np.unique(train.labels)
    if len(present) < 2:
        raise ValueError(f"the train split of {train.root} has a single class; a classifier needs two or more")
    val, _ = _part("val", spec, "val", config.eval_subset, config.seed, config.on_error, classes)
    targets = []
    for t in config.targets:
        label, tspec, tsplit = _parse_target(t, spec)
        if label in [p.label for p in targets]:
            raise ValueError(f"--target {t} is given twice")
        targets.append(_part(label, tspec, tsplit, config.eval_subset, config.seed, config.on_error, classes)[0])

    model, backbone, layer = build_model(config, classes)
    runtime = resolve_runtime(config.device, config.amp)
    out = run_dir(config)
    init_sha = json.loads(Path(config.init_head).with_suffix(".json").read_text())["artifact_sha256"] if config.init_head else None
    skip = ("workers", "device", "log_every", "output_dir", "name")
    settings = _json({
        **{k: v for k, v in asdict(config).items() if k not in skip}, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "preprocess": backbone.preprocess.to_dict(), "amp": runtime.amp, "classes": classes, "classifier": layer,
        "train_fingerprint": train.fingerprint, "val_fingerprint": val.fingerprint,
        "target_fingerprints": {p.label: p.fingerprint for p in targets}, "init_head_sha256": init_sha,
    })
    meta_path, last_path, model_path, history_path = out / "model.json", out / "last.pt", out / "model.pt", out / "history.csv"

    if meta_path.exists():
        old = json.loads(meta_path.read_text()).get("settings")
        if old == settings:  # force discards runs of other settings only; a finished run of these is kept
            if model_path.exists():
                meta = json.loads(meta_path.read_text())
                return FinetuneResult(meta_path, out, "up-to-date", meta["best_epoch"], meta["val_accuracy"], meta["seconds"], meta["history"])
        elif not force:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(provenance.diff(old or {}, settings))}); pass --force to overwrite it, or --name for another run")
    checkpoint = None
    if last_path.exists() and not meta_path.exists():
        saved = torch.load(last_path, map_location="cpu", weights_only=True)
        old = json.loads(saved["settings"])
        if old == settings:
            checkpoint = saved  # an interrupted run of these settings: resume it, --force or not
        elif not force:
            raise ValueError(f"an interrupted fine-tune in {out} used other settings ({'; '.join(provenance.diff(old, settings))}); pass --force to discard it, or --name for another run")
    if checkpoint is None:
        for p in (meta_path, model_path, last_path, history_path):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    model = runtime.prepare(model)
    workers = auto_workers(runtime.device.type) if config.workers is None else config.workers
    steps_per_epoch = len(train.paths) // config.batch_size if len(train.paths) > config.batch_size else 1
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
        for epoch in range(start, config.epochs + 1):
            t0 = time.perf_counter()
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
            loader = _loader(train, train_tf, config.batch_size, workers, runtime,
                             generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch), drop_last=len(train.paths) > config.batch_size)
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
            provenance.write_history(history, history_path, hint=_RESUME_HINT)
            _atomic_save({
                "settings": json.dumps(settings), "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(runtime), "history": json.dumps(history),
                "best_epoch": best_epoch, "best_val_acc": best_acc, "best_state": best_state,
            }, last_path)
            phases = "  ".join(f"{p} loss {row[f'{p}_loss']:.4f} acc {row[f'{p}_acc']:.4f}" for p in ["train", "val", *[t.label for t in targets]])
            lr_text = "/".join(f"{v:.2e}" for v in lrs.values())
            say(f"epoch {epoch}/{config.epochs}  {phases}  lr {lr_text}  {row['seconds']:.1f} s{'  *best' if better else ''}")
    seconds = time.perf_counter() - t_all + sum(r["seconds"] for r in history[: start - 1])

    state = {"format": layout.FINETUNED_FORMAT, "format_version": layout.FINETUNED_FORMAT_VERSION, "model": config.model, "classifier": layer,
             "classes": list(classes), "preprocess": _json(backbone.preprocess.to_dict()), "epoch": best_epoch, "state_dict": best_state}
    _atomic_save(state, model_path)
    meta = {
        "format": layout.FINETUNED_FORMAT, "format_version": layout.FINETUNED_FORMAT_VERSION, "artifact": model_path.name, "artifact_sha256": file_sha256(model_path),
        "clf": "finetune", "model": config.model, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "classifier": layer, "classes": list(classes), "preprocess": _json(backbone.preprocess.to_dict()),
        "dataset": {"name": spec.name, **_json(asdict(spec)), "root": str(Path(spec.root).resolve())},
        "best_epoch": best_epoch, "val_accuracy": best_acc, "seconds": seconds, "history": history,
        "targets": [p.label for p in targets], "init_head": config.init_head, "runtime": runtime.describe(),
        "config": _json(asdict(config)), "settings": settings, "recipe": config.recipe,
        "recipe_source": RECIPES[config.recipe].source if config.recipe else None,
        "versions": provenance.versions(), "created": provenance.now(),
    }
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()), hint=_RESUME_HINT)
    return FinetuneResult(meta_path, out, status, best_epoch, best_acc, seconds, history)


def _train_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, part: _Part, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, runtime: Runtime, config: FinetuneConfig, epoch: int,
                 progress: bool, say: Callable[[str], None]) -> tuple[float, float]:
    set_train_mode(model, True)
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
