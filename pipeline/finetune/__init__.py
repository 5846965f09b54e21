"""Fine-tuning, one room per job: freeze, optim, inputs, lpft (the model to train) and loop (the run); the public names."""

from __future__ import annotations

from ..config import FinetuneConfig
from ..data import stratified_subset
from ..recipes import RECIPES, Recipe
from .freeze import apply_freeze, backbone_stages, set_train_mode
from .inputs import train_transform
from .loop import FinetuneResult, finetune, resolve_init_head, run_dir
from .lpft import build_model, linear_init_from_head
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups

__all__ = [
    "FinetuneConfig", "FinetuneResult", "Recipe", "RECIPES", "finetune", "resolve_init_head", "build_model", "run_dir",
    "backbone_stages", "apply_freeze", "set_train_mode", "param_groups", "build_optimizer",
    "build_scheduler", "lr_factor", "train_transform", "stratified_subset", "linear_init_from_head",
]
