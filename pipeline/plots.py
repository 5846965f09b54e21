"""Figures: the confusion matrix of an evaluation and the report's plots, each drawn on a ``matplotlib.figure.Figure``."""

# Never through pyplot, so that drawing one changes no global matplotlib state (no backend switch, no open-figure
# registry) under a notebook user. Each function takes arrays and rows already read from disk and writes one PNG.

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_confusion", "save_figure", "plot_accuracy_vs_time", "plot_learning_curves", "plot_projection", "plot_misclassified",
           "plot_audit"]

# How each kind of row is drawn in the accuracy-against-time plot, and its legend entry.
_KINDS = {
    "head": ("o", 45, "head (full train set)"),
    "subset head": ("s", 45, "head on the fine-tune's subset"),
    "finetune": ("*", 90, "fine-tune"),
}


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | os.PathLike, title: str) -> Path:
    """Save a row-normalised confusion matrix with counts as a PNG."""
    n = len(classes)
    size = max(5.0, 0.45 * n + 2)
    fig = _figure(size, size * 0.9)
    ax = fig.add_subplot()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8 if n <= 30 else 5)
    ax.set_yticks(range(n), classes, fontsize=8 if n <= 30 else 5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return save_figure(fig, path, dpi=120)


def plot_accuracy_vs_time(rows: list[dict], path: str | os.PathLike) -> Path:
    """Test top-1 against fit time (log scale), one point per head or fine-tune.

    Args:
        rows: dicts with ``kind`` (``head``, ``subset head`` or ``finetune``), ``label``, ``fit_seconds`` and ``top1``;
            rows without a fit time are left out.
        path: the PNG to write.
    """
    fig = _figure(8.5, 4.5)
    ax = fig.add_subplot()
    for kind, (marker, size, legend) in _KINDS.items():
        pts = [r for r in rows if r["kind"] == kind and r.get("fit_seconds")]
        if not pts:
            continue
        ax.scatter([r["fit_seconds"] for r in pts], [100 * r["top1"] for r in pts], marker=marker, s=size, label=legend, zorder=3)
        for r in pts if kind != "subset head" else []:  # subset heads crowd together: the table names them
            ax.annotate(r["label"], (r["fit_seconds"], 100 * r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("fit time, s (log scale; the sweep on val included)")
    ax.set_ylabel("test top-1, %")
    ax.grid(True, which="both", alpha=0.3)
    # Outside the axes, so that it never hides a point.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title("Accuracy against fit time")
    return save_figure(fig, path)


def plot_learning_curves(panels: Sequence[tuple[str, list[dict]]], path: str | os.PathLike) -> Path | None:
    """Per-epoch accuracy, one panel per model: train, val and test where the history has them.

    Args:
        panels: (title, history) pairs; a history is a list of rows with ``epoch`` and ``train_acc``, ``val_acc``,
            ``test_acc`` (numbers or their text, as read from CSV). Empty histories are left out.
        path: the PNG to write.

    Returns:
        The PNG, or None when no panel has a history.
    """
    panels = [(title, history) for title, history in panels if history]
    if not panels:
        return None
    fig = _figure(5.5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, history) in zip(axes[0], panels):
        epochs = [int(r["epoch"]) for r in history]
        one = len(epochs) == 1  # a single epoch is a point: a line needs two
        for key, marker in (("train_acc", "o"), ("val_acc", "s"), ("test_acc", "^")):
            if history[0].get(key) not in ("", None):
                ax.plot(epochs, [100 * float(r[key]) for r in history], marker=marker, linestyle="none" if one else "-",
                        ms=7 if one else 3, label=key.replace("_acc", ""))
        ax.set_xlabel("epoch")
        if one:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("accuracy, %")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_projection(Z: np.ndarray, y: np.ndarray, classes: list[str], title: str, path: str | os.PathLike) -> Path:
    """A 2-D map of features, coloured by class.

    Args:
        Z: the 2-D coordinates, one row per image.
        y: the class index of each row.
        classes: class names, by index.
        title: the figure's title.
        path: the PNG to write.
    """
    import matplotlib

    fig = _figure(7, 6)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for c, name in enumerate(classes):
        sel = y == c
        if sel.any():
            ax.scatter(Z[sel, 0], Z[sel, 1], s=5 if len(y) > 200 else 20, color=cmap(c % cmap.N), label=name, alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    return save_figure(fig, path)


def plot_misclassified(images: Sequence[np.ndarray | None], titles: Sequence[str], path: str | os.PathLike) -> Path | None:
    """A grid of images a model got wrong, each titled (e.g. ``true\\n-> predicted``).

    Args:
        images: RGB arrays; None draws "unreadable" in its cell.
        titles: one per image.
        path: the PNG to write.

    Returns:
        The PNG, or None for no image.
    """
    if not images:
        return None
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    fig = _figure(1.6 * cols, 1.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        if img is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        else:
            ax.imshow(img)
        ax.set_title(title, fontsize=7, color="darkred")
    fig.suptitle("misclassified test images: true -> predicted", fontsize=9)
    return save_figure(fig, path)


def plot_audit(panels: Sequence[tuple[str, Sequence[tuple[np.ndarray | None, str]]]], path: str | os.PathLike) -> Path | None:
    """The audit's top suspects, one row per kind (label issues, duplicates, outliers), a caption under each image.

    Args:
        panels: (title, items) per row; an item is an RGB array (a duplicate pair side by side) or None for
            "unreadable", and the text under it (e.g. ``given: shirt`` and ``suggested: t-shirt`` on two lines).
            Rows without items are left out.
        path: the PNG to write.

    Returns:
        The PNG, or None when there is nothing to show.
    """
    panels = [(title, list(items)) for title, items in panels if items]
    if not panels:
        return None
    cols = max(len(items) for _, items in panels)
    fig = _figure(1.75 * cols, 2.1 * len(panels))
    axes = fig.subplots(len(panels), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (title, items) in zip(axes, panels):
        row[0].set_title(title, fontsize=9, loc="left", fontweight="bold")
        for ax, (img, caption) in zip(row, items):
            if img is None:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(img)
            # Under the image, not over it: the labels are what a reader checks the picture against.
            ax.text(0.5, -0.04, caption, ha="center", va="top", fontsize=6.5, transform=ax.transAxes)
    return save_figure(fig, path)
