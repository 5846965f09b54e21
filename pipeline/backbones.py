"""Backbones: torchvision classifiers by name, their weights (named, local file or none) and their preprocessing."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .config import HEAD_INITS
from .files import file_sha256

__all__ = [
    "replace_classifier", "available_weights", "offline_weights",
    "Backbone", "Preprocess", "WeightsUnavailableError", "load_backbone", "resolve_weights", "weights_label", "list_backbones", "final_linear",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsUnavailableError(ValueError, RuntimeError):
    """Named weights are neither in the torch hub cache nor downloadable."""


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing: resize the short side, centre-crop, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    antialias: bool = True

    def transform(self) -> Callable:
        """A callable turning a PIL RGB image into a normalised CHW float tensor."""
        return T.Compose(
            [
                T.Resize(self.resize, interpolation=InterpolationMode(self.interpolation), antialias=self.antialias),
                T.CenterCrop(self.crop),
                T.PILToTensor(),
                T.ConvertImageDtype(torch.float32),
                T.Normalize(self.mean, self.std),
            ]
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A loaded classifier and what it takes to reproduce it.

    Attributes:
        model: the torchvision module, in eval mode.
        name: the torchvision model name.
        weights: the resolved weights: a torchvision enum name, ``file:<name>`` or ``none``.
        weights_sha256: digest of a local weights file, else None.
        preprocess: the preprocessing the weights expect, with any overrides applied.
        categories: the class names of the pretrained head, when the weights know them.
    """

    model: nn.Module
    name: str
    weights: str
    weights_sha256: str | None
    preprocess: Preprocess
    categories: list[str] | None = None


def list_backbones() -> list[str]:
    """Names of torchvision's classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_model_name(name: str) -> None:
    names = list_backbones()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=3)
        raise ValueError(
            f"unknown model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
            + " (pipeline models lists all torchvision classifiers)"
        )


def _looks_like_file(spec: str) -> bool:
    return spec.endswith(_WEIGHT_FILE_SUFFIXES) or os.sep in spec or "/" in spec or os.path.exists(spec)


def resolve_weights(name: str, spec: str) -> torchvision.models.WeightsEnum | Path | None:
    """Turn a weights spec into a torchvision enum member, a file path, or None for random weights.

    Args:
        name: the torchvision model name.
        spec: ``DEFAULT``, an enum name such as ``IMAGENET1K_V1``, a path to a state_dict file, or ``none``.
    """
    _check_model_name(name)
    if spec is None or str(spec).strip() == "":
        raise ValueError("no weights given: pass a torchvision weights name (e.g. DEFAULT), a state_dict file, or 'none' for random weights")
    spec = str(spec).strip()
    if spec.lower() in ("none", "random"):
        return None
    if _looks_like_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"weights file {path} not found")
        return path
    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception:
        raise ValueError(f"{name} has no pretrained weights in torchvision; pass a state_dict file or 'none'") from None
    valid = ["DEFAULT"] + [w.name for w in enum]
    key = spec.upper()
    if key not in valid:
        raise ValueError(f"unknown weights {spec!r} for {name}; expected one of {', '.join(valid)}, a state_dict file, or 'none'")
    return enum.DEFAULT if key == "DEFAULT" else enum[key]


def weights_label(resolved: torchvision.models.WeightsEnum | Path | None) -> str:
    """The name of resolved weights in caches and artifacts: ``IMAGENET1K_V1``, ``file:<name>`` or ``none``."""
    if resolved is None:
        return "none"
    if isinstance(resolved, Path):
        return f"file:{resolved.name}"
    return resolved.name


def _hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def available_weights(name: str) -> list[str]:
    """The torchvision weights of model ``name`` whose files are already in the torch hub cache (usable offline)."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception:
        return []
    return [w.name for w in enum if _hub_file(w).is_file()]


def offline_weights() -> dict[str, list[str]]:
    """Every classification model with weights in the torch hub cache, and those weights' names."""
    found = {}
    for name in list_backbones():
        names = available_weights(name)
        if names:
            found[name] = names
    return found


def _ensure_named_weights(name: str, weights: torchvision.models.WeightsEnum) -> None:
    """Make sure the weights file is in the torch hub cache, downloading it where that is possible."""
    cached = _hub_file(weights)
    if cached.is_file():
        return
    here = available_weights(name)
    usable = f"Weights of {name} available here: {', '.join(f'--weights {w}' for w in here)}. " if here else ""
    how = (
        f"{usable}Provide them by copying the file to {cached}, by running once where {urlparse(weights.url).netloc} is reachable, "
        f"or by passing --weights /path/to/state_dict.pth. Random weights must be asked for: --weights none."
    )
    if os.environ.get("PIPELINE_OFFLINE"):
        raise WeightsUnavailableError(f"{name} {weights.name} weights are not in {cached.parent} and PIPELINE_OFFLINE is set. {how}")
    try:
        weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # urllib, ssl, socket and hash errors all mean "not obtainable here".
        raise WeightsUnavailableError(
            f"{name} {weights.name} weights could not be downloaded ({type(e).__name__}: {e}). {how}"
        ) from e


def _file_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load weights file {path} as a state_dict with weights_only=True ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
    # Checkpoints saved from DataParallel/DistributedDataParallel prefix every key.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in module order: the classifier layer (``fc``, ``classifier.1``, ``heads.head``...)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return found[-1]


def _load_strict(model: nn.Module, state: dict, source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}"
        )


def _preprocess_for(
    name: str, weights: torchvision.models.WeightsEnum | None, resize: int | None, crop: int | None,
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
) -> Preprocess:
    """The weights' own preprocessing (or the model's default weights' for files and random weights), with overrides."""
    base = weights
    if base is None:
        try:
            base = torchvision.models.get_model_weights(name).DEFAULT
        except Exception:
            base = None
    fields = {"resize": 256, "crop": 224, "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "interpolation": "bilinear", "antialias": True}
    if base is not None:
        t = base.transforms()
        if all(hasattr(t, a) for a in ("crop_size", "resize_size", "mean", "std")):
            fields.update(
                resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(map(float, t.mean)),
                std=tuple(map(float, t.std)), interpolation=t.interpolation.value, antialias=bool(t.antialias),
            )
    if crop is not None and resize is None:
        # Keep the weights' resize/crop ratio when only the crop is overridden.
        resize = int(round(crop * fields["resize"] / fields["crop"]))
    for key, value in (("resize", resize), ("crop", crop), ("mean", mean), ("std", std)):
        if value is not None:
            fields[key] = tuple(map(float, value)) if key in ("mean", "std") else int(value)
    if len(fields["mean"]) != 3 or len(fields["std"]) != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got {fields['mean']} and {fields['std']}")
    if fields["crop"] > fields["resize"]:
        raise ValueError(f"crop {fields['crop']} is larger than resize {fields['resize']}")
    return Preprocess(**fields)


def load_backbone(
    name: str,
    weights: str = "DEFAULT",
    *,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Backbone:
    """Build a torchvision classifier with its weights, frozen and in eval mode.

    Never falls back to random weights: those need ``weights="none"``.

    Args:
        name: a torchvision classification model name, e.g. ``resnet50``.
        weights: ``DEFAULT``, a torchvision weights name, a state_dict file, or ``none`` (random, seed 0).
        resize: override of the short-side resize.
        crop: override of the centre crop (the image size the model sees).
        mean: override of the normalisation mean.
        std: override of the normalisation std.

    Raises:
        ValueError: unknown model or weights, or a file that does not fit the model.
        WeightsUnavailableError: named weights that are not cached and cannot be downloaded.
    """
    resolved = resolve_weights(name, weights)
    categories = None
    sha = None
    if isinstance(resolved, Path):
        state = _file_state_dict(resolved)
        model = torchvision.models.get_model(name, weights=None)
        layer_name, layer = final_linear(model)
        w = state.get(f"{layer_name}.weight")
        if w is not None and w.shape[0] != layer.out_features:
            # A fine-tuned checkpoint: rebuild with its number of classes.
            model = torchvision.models.get_model(name, weights=None, num_classes=int(w.shape[0]))
        _load_strict(model, state, str(resolved))
        sha, named = file_sha256(resolved), None
    elif resolved is None:
        # Seeded, so that "none" names one model: resumed and repeated runs see the same random weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None)
        named = None
    else:
        _ensure_named_weights(name, resolved)
        # get_model with the enum sets the model options that go with those weights (e.g. transform_input).
        model = torchvision.models.get_model(name, weights=resolved)
        named, categories = resolved, list(resolved.meta["categories"])
    model.eval()
    model.requires_grad_(False)
    return Backbone(
        model=model, name=name, weights=weights_label(resolved), weights_sha256=sha,
        preprocess=_preprocess_for(name, named, resize, crop, mean, std), categories=categories,
    )


def replace_classifier(model: nn.Module, num_classes: int, init: str = "torch", generator: torch.Generator | None = None) -> str:
    """Put a new ``nn.Linear`` for ``num_classes`` where the model's final classifier layer is.

    The layer is found by :func:`final_linear` (``fc``, ``classifier.1``, ``heads.head``, ...), so every torchvision
    family works the same way.

    Args:
        model: the classifier, changed in place.
        num_classes: outputs of the new layer.
        init: ``torch`` (nn.Linear's own), ``xavier`` (xavier_uniform weight, as d2l) or ``normal``
            (N(0, 0.005) weight and bias 0.1, as tutorial 000).
        generator: random source of the init.

    Returns:
        The layer's dotted name.
    """
    if init not in HEAD_INITS:
        raise ValueError(f"init must be one of {', '.join(HEAD_INITS)}, got {init!r}")
    name, old = final_linear(model)
    # Made empty, then drawn from `generator`: nn.Linear's own init would consume the global random state.
    new = nn.Linear(old.in_features, num_classes, bias=True, device="meta", dtype=old.weight.dtype).to_empty(device=old.weight.device)
    bound = 1 / math.sqrt(old.in_features)
    with torch.no_grad():
        if init == "normal":
            new.weight.normal_(0.0, 0.005, generator=generator)
            new.bias.fill_(0.1)
        else:
            if init == "xavier":
                nn.init.xavier_uniform_(new.weight, generator=generator)
            else:
                nn.init.kaiming_uniform_(new.weight, a=math.sqrt(5), generator=generator)  # what nn.Linear does
            new.bias.uniform_(-bound, bound, generator=generator)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return name
