"""Figures: the confusion matrix of an evaluation and the report's plots, drawn on ``matplotlib.figure.Figure``.

Figures are built directly, never through pyplot, so that drawing one changes no global matplotlib state (no
backend switch, no open-figure registry) under a notebook user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from .files import atomic_write

__all__ = ["plot_confusion", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | os.PathLike, title: str) -> Path:
    """Save a row-normalised confusion matrix with counts as a PNG."""
    from matplotlib.figure import Figure

    n = len(classes)
    size = max(5.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size * 0.9))
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
