"""Warnings where the numbers cannot mean much: a split too small per class, a head at chance, a sweep that chose nothing.

Each check returns its warnings as lines (none when all is well): fit-head and evaluate record them in their JSON, the
command line prints each once as ``warning: ...``, and the report lists them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_PER_CLASS", "CHANCE_MARGIN", "few_images", "at_chance", "tied_sweep", "mirrored_probe"]

MIN_PER_CLASS = 5
"""Below this many images of a class in val or test, one image moves that class's accuracy by more than 20 points."""

CHANCE_MARGIN = 0.02
"""A train accuracy within this of 1/classes is chance: the head learnt nothing it can be judged by."""


def few_images(labels: np.ndarray, classes: list[str], split: str) -> list[str]:
    """A warning when some class has fewer than :data:`MIN_PER_CLASS` images in a split that scores or chooses.

    Args:
        labels: the split's class indices.
        classes: the class names, by index.
        split: the split's name, for the message (``val`` or ``test``).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    few = [(classes[i], int(n)) for i, n in enumerate(counts) if n < MIN_PER_CLASS]
    if not few:
        return []
    shown = ", ".join(f"{name} {n}" for name, n in few[:5]) + (f" and {len(few) - 5} more" if len(few) > 5 else "")
    use = "choices made on it are" if split == "val" else "its per-class numbers are"
    return [f"the {split} split has fewer than {MIN_PER_CLASS} images of {len(few)} of its {len(classes)} classes ({shown}): "
            f"one image moves a class's accuracy by 20 points or more, so {use} mostly noise"]


def at_chance(train_accuracy: float | None, n_classes: int) -> list[str]:
    """A warning when a head does no better than chance on the very images it was fitted on."""
    if train_accuracy is None or n_classes < 2:
        return []
    chance = 1 / n_classes
    if train_accuracy > chance + CHANCE_MARGIN:
        return []
    return [f"the head's train accuracy {train_accuracy:.2%} is at chance (1/{n_classes} = {chance:.2%}): it learnt nothing from "
            "the features; check the labels, the features (a random backbone?) and the swept values"]


def tied_sweep(sweep: list[dict], param: str, chosen: float) -> list[str]:
    """A warning when every value of a sweep reached the same val accuracy: val chose nothing, the first value tried won."""
    scored = [row for row in sweep if "val_accuracy" in row]
    if len(scored) < 2 or len({row["val_accuracy"] for row in scored}) > 1:
        return []
    values = ", ".join(format(row["value"], "g") for row in scored)
    return [f"every {param} of the sweep ({values}) gave the same val accuracy "
            f"{scored[0]['val_accuracy']:.2%}: val did not choose {param}={chosen:g}, it was the first tried; sweep other values"]


def mirrored_probe(head_meta: dict | None) -> list[str]:
    """A warning when a fine-tune starts from a probe of flip-averaged features (``extract --flip``): the network sees
    each image once, so its epoch 0 is that probe on plain features, not the probe's own accuracy."""
    if not head_meta or not head_meta.get("features", {}).get("flip"):
        return []
    return ["LP-FT starts from a probe fitted on features averaged with the mirror images' (extract --flip); the network computes "
            "plain features, so epoch 0 is the probe on those, not the probe's own val accuracy"]
