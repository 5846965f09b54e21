"""Evaluation: a head's metrics on the test cache (a fine-tuned model's on the test images), its confusion matrix, and the table of every head on a cache."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, top_k_accuracy_score

from .artifacts import load_head
from .cache import read_cache
from .data import DatasetSpec, load_split
from .extract import ExtractConfig, locate_cache
from .finetune import image_logits, is_finetuned, load_finetuned
from .fit import heads_dir, load_split_features

__all__ = ["evaluate", "compare", "scores", "plot_confusion"]


def scores(pipe, X: np.ndarray) -> np.ndarray | None:
    """Class scores for top-k: probabilities where the head has them, else decision values; None for neither."""
    for method in ("predict_proba", "decision_function"):
        if hasattr(pipe, method):
            try:
                return np.asarray(getattr(pipe, method)(X))
            except AttributeError:  # e.g. SVC without probability=True
                continue
    return None


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Save a row-normalised confusion matrix with counts as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(head: str | os.PathLike, test_cache: str | os.PathLike | None = None, source: ExtractConfig | None = None) -> dict:
    """Evaluate a fitted head on the test split; write ``<head>-test.json`` and ``<head>-confusion.png``.

    A fine-tuned model (``model.json`` of pipeline finetune) is evaluated on the test split's images, since its
    backbone no longer computes the cached features.

    Args:
        head: the head's ``.json`` (or artifact) path, or a fine-tuned model's ``model.json``.
        test_cache: the test cache; None locates it from ``source``, or from the head's train cache folder.
        source: extract settings used to locate the test cache; for a fine-tuned model, its dataset replaces the
            one the model was trained on.

    Returns:
        The metrics: top-1, top-5 (more than 5 classes), balanced accuracy, per-class report, confusion matrix.
    """
    if is_finetuned(head):
        return _evaluate_finetuned(head, test_cache, source)
    art = load_head(head)
    if test_cache is None:
        train_path = Path(art.meta["train_cache"]["path"])
        test_cache = locate_cache(replace(source, split="test")) if source else train_path.with_name("test.h5")
    with read_cache(test_cache) as cache:
        art.check_features(cache.attrs)
        if cache.classes != art.classes:
            raise ValueError(f"{cache.path} has classes {cache.classes}, the head was fitted on {art.classes}")
        X, y = load_split_features(cache, art.meta["tap"], "test")
        test_path = cache.path
    pred = art.pipeline.predict(X)
    classes = art.classes
    metrics = {
        "head": str(art.path), "clf": art.meta["clf"], "test_cache": str(test_path), "n": int(len(y)),
        "top1": float((pred == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "val_accuracy": art.meta.get("val_accuracy"), "fit_seconds": art.meta.get("fit_seconds"),
        "param": art.meta.get("param"), "value": art.meta.get("value"),
    }
    return _report(metrics, y, pred, (lambda: scores(art.pipeline, X)), classes, art.path, art.meta["clf"])


def _report(metrics: dict, y: np.ndarray, pred: np.ndarray, class_scores, classes: list[str], path: Path, name: str) -> dict:
    """Add top-5, the per-class report and the confusion matrix to ``metrics``; write the JSON and PNG beside ``path``."""
    labels = list(range(len(classes)))
    if len(classes) > 5:
        s = class_scores()
        if s is not None:
            metrics["top5"] = float(top_k_accuracy_score(y, s, k=5, labels=labels))
    metrics["per_class"] = classification_report(y, pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    metrics["confusion_matrix"] = cm.tolist()
    base = path.with_suffix("")
    png = plot_confusion(cm, classes, base.with_name(base.name + "-confusion.png"), f"{name}: test top-1 {metrics['top1']:.2%}")
    metrics["confusion_png"] = str(png)
    out = base.with_name(base.name + "-test.json")
    out.write_text(json.dumps(metrics, indent=1))
    metrics["json"] = str(out)
    return metrics


def _evaluate_finetuned(path: str | os.PathLike, test_cache: str | os.PathLike | None, source: ExtractConfig | None) -> dict:
    """A fine-tuned model on the test split's images of its dataset (or of ``source``'s)."""
    if test_cache is not None:
        raise ValueError(f"{path} is a fine-tuned model: it is evaluated on the test images, not on a feature cache; drop --test-cache")
    fm = load_finetuned(path)
    ds = fm.meta["dataset"]
    spec = source.dataset if source else DatasetSpec(**{k: ds[k] for k in ("root", "labels_csv", "id_column", "label_column", "image_dir", "extension", "val_fraction", "test_fraction", "split_seed")})
    split = load_split(spec, "test")
    if len(split) == 0:
        raise ValueError(f"the test split of {spec.root} has no images")
    if split.classes != fm.classes:
        raise ValueError(f"the test split of {spec.root} has classes {split.classes[:10]}, the model was trained on {fm.classes[:10]}")
    positions, logits, bad = image_logits(fm, spec.root, split.paths)
    y = split.labels[positions]
    pred = logits.argmax(1)
    metrics = {
        "head": str(fm.path), "clf": "finetune", "model": fm.meta["model"], "test_split": f"{spec.root}:test",
        "n": int(len(y)), "n_skipped": len(bad) + len(split.rejected), "top1": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "val_accuracy": fm.meta.get("val_accuracy"),
        "fit_seconds": fm.meta.get("seconds"), "best_epoch": fm.meta.get("best_epoch"),
    }
    return _report(metrics, y, pred, lambda: logits, fm.classes, fm.path, f"finetune {fm.meta['model']}")


def compare(folder: str | os.PathLike | None = None, source: ExtractConfig | None = None) -> list[dict]:
    """One row per head fitted on a cache: val and test accuracy, fit time, chosen hyper-parameter.

    Args:
        folder: a heads folder; None locates ``<train cache folder>/heads`` from ``source``.
        source: extract settings.
    """
    folder = Path(folder) if folder else heads_dir(locate_cache(replace(source or ExtractConfig(), split="train")))
    if not folder.is_dir():
        raise ValueError(f"no heads in {folder}; fit one with pipeline fit-head")
    rows = []
    for meta_path in sorted(folder.glob("*.json")):
        if meta_path.name.endswith("-test.json"):
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "pipeline-head":
            continue
        test_path = meta_path.with_name(meta_path.stem + "-test.json")
        test = json.loads(test_path.read_text()) if test_path.is_file() else {}
        rows.append({
            "clf": meta["clf"], "val_accuracy": meta["val_accuracy"], "top1": test.get("top1"), "top5": test.get("top5"),
            "balanced_accuracy": test.get("balanced_accuracy"), "fit_seconds": meta["fit_seconds"],
            "param": meta["param"], "value": meta["value"], "preprocessing": meta["preprocessing"], "path": str(meta_path),
        })
    if not rows:
        raise ValueError(f"no heads in {folder}; fit one with pipeline fit-head")
    return sorted(rows, key=lambda r: -(r["top1"] if r["top1"] is not None else r["val_accuracy"]))
