"""The fine-tuning settings: the dataset and backbone, a tutorial's recipe, and the training settings over it."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..recipes import DEFAULT_LR, FINETUNE_DEFAULTS, LPFT_DEFAULTS, RECIPES
from ..validate import check_at_least, check_choice, check_types
from .shared import AUGMENTS, HEAD_INITS, NORMS, ON_ERROR, OPTIMIZERS, SCHEDULES, BackboneOptions, DatasetOptions

__all__ = ["FinetuneConfig"]


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
        optimizer: ``sgd`` (with momentum) or ``adamw`` (the default; measured in ``recipes.FINETUNE_DEFAULTS``).
        lr: base learning rate; None takes the recipe's, else the optimizer's ``DEFAULT_LR`` (AdamW 1e-4, SGD 1e-3).
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
            features, to start from instead of a random classifier (LP-FT). The head's learning-rate multiplier,
            and the optimizer with its lr when neither is given, then default to ``LPFT_DEFAULTS`` (1, AdamW, 1e-5),
            over the recipe's: the head
            starts trained, and larger steps through frozen normalisation layers undo the probe (measured there).
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
        if self.init_head:
            # The optimizer and its lr go together: 1e-5 is AdamW's step, so an optimizer given alone keeps the recipe's lr.
            pair = ("optimizer", "lr") if self.optimizer is None and self.lr is None else ()
            for key in ("head_lr_mult", *pair):
                if getattr(self, key) is None:
                    object.__setattr__(self, key, LPFT_DEFAULTS[key])
        for key, default in FINETUNE_DEFAULTS.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset.get(key, default))
        if self.lr is None:
            object.__setattr__(self, "lr", preset.get("lr", DEFAULT_LR.get(self.optimizer, DEFAULT_LR["sgd"])))
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
