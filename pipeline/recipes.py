"""Recipes: the training settings of the source tutorials, as named presets for ``pipeline finetune``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Recipe", "RECIPES", "FINETUNE_DEFAULTS", "LPFT_DEFAULTS", "DEFAULT_LR"]


@dataclass(frozen=True)
class Recipe:
    """A named preset: the training settings of one source tutorial.

    Attributes:
        name: the ``--recipe`` name.
        source: the tutorial it reproduces.
        description: what it does, in one line.
        settings: FinetuneConfig fields; explicit options override them.
    """

    name: str
    source: str
    description: str
    settings: dict[str, Any]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "jdw-finetune",
            "seed 000: jindongwang/transferlearning code/deep/finetune_AlexNet_ResNet/finetune_office31.py",
            "ResNet-50, all layers trained; SGD momentum 0.9, lr 1e-4 with the new fc at 10x, no weight decay, constant lr; "
            "fc init N(0, 0.005) with bias 0.1; RandomResizedCrop + flip; batch 64, 100 epochs; pass --target for the target domain",
            dict(model="resnet50", freeze="none", optimizer="sgd", lr=1e-4, head_lr_mult=10.0, backbone_lr_mult=1.0,
                 momentum=0.9, weight_decay=0.0, schedule="constant", warmup_epochs=0.0, epochs=100, batch_size=64,
                 augment="crop-flip", head_init="normal"),
        ),
        Recipe(
            "ants-bees",
            "seed 001: the hymenoptera (ants/bees) ResNet-18 fine-tune of the PyTorch course it quotes (finetune_resnet18.py)",
            "ResNet-18, all layers trained with the backbone at 0.1x through parameter groups; SGD momentum 0.9, lr 1e-3, "
            "StepLR every 7 epochs x0.1; RandomResizedCrop + flip; batch 16, 25 epochs",
            dict(model="resnet18", freeze="none", optimizer="sgd", lr=1e-3, head_lr_mult=1.0, backbone_lr_mult=0.1,
                 momentum=0.9, weight_decay=0.0, schedule="step", step_epochs=7, gamma=0.1, warmup_epochs=0.0, epochs=25,
                 batch_size=16, augment="crop-flip", head_init="torch"),
        ),
        Recipe(
            "dog-breed",
            "seed 002: the Kaggle dog-breed ResNet-50 fine-tune (4.1 Fine tuning), with --labels-csv labels.csv",
            "ResNet-50 frozen, only the new fc trained; Adam (AdamW without weight decay) lr 1e-3; "
            "Resize + RandomResizedCrop + flip + rotation 30; batch 256, 9 epochs",
            dict(model="resnet50", freeze="backbone", optimizer="adamw", lr=1e-3, head_lr_mult=1.0, backbone_lr_mult=1.0,
                 weight_decay=0.0, schedule="constant", warmup_epochs=0.0, epochs=9, batch_size=256,
                 augment="crop-flip-rotate", head_init="torch"),
        ),
        Recipe(
            "d2l-hotdog",
            "seed 003: d2l.ai 13.2 Fine-Tuning (hot dog), train_fine_tuning(finetune_net, 5e-5)",
            "ResNet-18, all layers trained; plain SGD (no momentum) lr 5e-5 with the new fc at 10x, weight decay 1e-3; "
            "fc xavier_uniform; RandomResizedCrop + flip; batch 128, 5 epochs",
            dict(model="resnet18", freeze="none", optimizer="sgd", lr=5e-5, head_lr_mult=10.0, backbone_lr_mult=1.0,
                 momentum=0.0, weight_decay=1e-3, schedule="constant", warmup_epochs=0.0, epochs=5, batch_size=128,
                 augment="crop-flip", head_init="xavier"),
        ),
        Recipe(
            "cifar100-resnet18",
            "seed 004: 'pytorch怎么finetuning', ResNet-18 on CIFAR-100",
            "ResNet-18, all layers trained at one lr; SGD momentum 0.9, lr 1e-3, no weight decay; no augmentation; "
            "batch 32, 100 epochs; a log line every 100 batches",
            dict(model="resnet18", freeze="none", optimizer="sgd", lr=1e-3, head_lr_mult=1.0, backbone_lr_mult=1.0,
                 momentum=0.9, weight_decay=0.0, schedule="constant", warmup_epochs=0.0, epochs=100, batch_size=32,
                 augment="none", head_init="torch", log_every=100),
        ),
    )
}

# What a field left at None becomes when the recipe does not set it; the lr follows the optimizer (DEFAULT_LR).
# AdamW at 1e-4: full fine-tuning of MobileNetV2 (frozen normalisation layers) from a random head, 160 px, 3 epochs,
# val accuracy after epochs 0-3. scikit-learn's digits (754 train, 324 val): SGD 1e-3 (the previous default) 8.6,
# 10.2, 10.8, 14.2 %; SGD 1e-2 and AdamW 1e-3 at chance; AdamW 1e-4 8.6, 17.6, 41.7, 52.5 %. Fashion-MNIST, 50 train
# and 30 val images per class: SGD 1e-3 16.0, 14.3, 54.0, 55.7 %; SGD 1e-2 and AdamW 1e-3 at chance; AdamW 1e-4
# 16.0, 54.3, 63.0, 67.3 %.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    model="mobilenet_v2", weights="DEFAULT", freeze="none", optimizer="adamw", head_lr_mult=10.0,
    backbone_lr_mult=1.0, momentum=0.9, weight_decay=1e-4, schedule="cosine", warmup_epochs=0.0, step_epochs=7,
    gamma=0.1, epochs=5, batch_size=32, augment="crop-flip", head_init="xavier", norm="frozen", log_every=0,
)

# What a field left at None becomes with --init-head (LP-FT), over the recipe's and FINETUNE_DEFAULTS' values: the
# head starts trained, so it gets the backbone's lr, not the 10x of a head trained from scratch; and the frozen
# normalisation layers multiply the updates of some of MobileNetV2's depthwise channels by up to 107 (gamma over the
# square root of a running variance near zero), so SGD at lr 1e-3 sends the probe to chance within one epoch.
# Measured on Fashion-MNIST, 100 images per class, 160 px, val accuracy of 500 images after epochs 0 (the probe),
# 1, 2, 3: SGD lr 1e-3 85.6, 10.0, 10.0, 10.0 %; SGD lr 1e-4 85.6, 83.2, 82.8, 84.4 %; the same with crop-flip
# 85.6, 80.4, 83.0, 83.6 %; AdamW lr 1e-5 85.6, 85.0, 84.8, 84.8 %, the one that keeps the probe's accuracy
# (within the noise of 500 images).
LPFT_DEFAULTS: dict[str, Any] = dict(head_lr_mult=1.0, optimizer="adamw", lr=1e-5)

# The lr of an optimizer named without one, where the recipe sets none: SGD keeps its earlier default.
DEFAULT_LR: dict[str, float] = {"adamw": 1e-4, "sgd": 1e-3}
