"""Optimisation for fine-tuning: head and backbone parameter groups, the optimizer, and the per-step lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OPTIMIZERS, SCHEDULES, FinetuneConfig

__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler"]


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
