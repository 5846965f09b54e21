"""LP-FT and the model to train: a fitted linear head folded into the new classifier, and the backbone built with it."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..artifacts import load_head
from ..backbones import Backbone, final_linear, load_backbone, replace_classifier
from ..config import FinetuneConfig
from ..taps import FeatureHooks, Tap, default_tap
from .freeze import apply_freeze

__all__ = ["linear_init_from_head", "build_model"]


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

    from ..heads import SpatialPool

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

