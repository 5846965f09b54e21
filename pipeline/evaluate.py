"""Evaluation: a head's metrics on the test cache (a fine-tuned model's on the test images), its confusion matrix, and the table of every head on a cache."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, top_k_accuracy_score

from .artifacts import HEAD_FORMAT, artifact_path, load_head, read_meta
from .backbones import file_sha256
from .files import atomic_write
from .cache import read_cache
from .data import DatasetSpec, load_split
from .extract import ExtractConfig, locate_cache
from .finetune import FORMAT, image_logits, is_finetuned, load_finetuned
from .fit import heads_dir, load_split_features

__all__ = ["evaluate", "compare", "scores", "plot_confusion", "load_predictions"]


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


def evaluate(head: str | os.PathLike, test_cache: str | os.PathLike | None = None, source: ExtractConfig | None = None, *,
             force: bool = False) -> dict:
    """Evaluate a fitted head on the test split; write ``<head>-test.json``, ``<head>-confusion.png`` and the
    per-image predictions ``<head>-test-predictions.npz`` (``y``, ``pred``, ``paths``, ``root``).

    A fine-tuned model (``model.json`` of pipeline finetune) is evaluated on the test split's images, since its
    backbone no longer computes the cached features. An evaluation of the same head on the same test split is
    reused (``status`` ``up-to-date``) unless ``force``.

    Args:
        head: the head's ``.json`` (or artifact) path, or a fine-tuned model's ``model.json``.
        test_cache: the test cache; None locates it from ``source``, or from the head's train cache folder.
        source: extract settings used to locate the test cache; for a fine-tuned model, its dataset replaces the
            one the model was trained on.

    Returns:
        The metrics: top-1, top-5 (more than 5 classes), balanced accuracy, per-class report, confusion matrix.
    """
    if is_finetuned(head):
        return _evaluate_finetuned(head, test_cache, source, force)
    meta_path, meta = read_meta(head, HEAD_FORMAT, "head", "pipeline head", "fit a head with pipeline fit-head first")
    if test_cache is None:
        train_path = Path(meta["train_cache"]["path"])
        test_cache = locate_cache(replace(source, split="test")) if source else train_path.with_name("test.h5")
    with read_cache(test_cache) as cache:
        inputs = {"head": _identity(meta_path, meta), "test": cache.identity}
        reused = None if force else _reusable(Path(head), inputs)
        if reused is not None:
            return reused
        art = load_head(head)
        art.check_features(cache.attrs)
        if cache.classes != art.classes:
            raise ValueError(f"{cache.path} has classes {cache.classes}, the head was fitted on {art.classes}")
        X, y = load_split_features(cache, art.meta["tap"], "test")
        test_path, paths, root = cache.path, cache.paths, cache.attrs.get("data_root", "")
    pred = art.pipeline.predict(X)
    classes = art.classes
    metrics = {
        "head": str(art.path), "clf": art.meta["clf"], "test_cache": str(test_path), "n": int(len(y)),
        "top1": float((pred == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "val_accuracy": art.meta.get("val_accuracy"), "fit_seconds": art.meta.get("fit_seconds"),
        "param": art.meta.get("param"), "value": art.meta.get("value"), "inputs": inputs,
    }
    return _report(metrics, y, pred, (lambda: scores(art.pipeline, X)), classes, art.path, art.meta["clf"], paths, root)


def _identity(meta_path: Path, meta: dict) -> dict:
    """A head's or model's identity for reuse: when it was made and its artifact's digest, as found on disk (so that
    a damaged artifact is never passed over by a reused result, but refused when it is loaded)."""
    try:
        digest = file_sha256(artifact_path(meta_path, meta))
    except ValueError:
        digest = None
    return {"artifact_sha256": digest, "created": meta.get("created")}


def _outputs(path: Path) -> tuple[Path, Path]:
    base = path.with_suffix("")
    return base.with_name(base.name + "-test.json"), base.with_name(base.name + "-test-predictions.npz")


def _reusable(path: Path, inputs: dict) -> dict | None:
    """The saved metrics of an evaluation made from exactly ``inputs``, with its predictions file, else None."""
    out, preds = _outputs(Path(path).with_suffix(".json"))
    try:
        metrics = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("inputs") != json.loads(json.dumps(inputs)) or not preds.is_file():
        return None
    return {**metrics, "json": str(out), "status": "up-to-date"}


def load_predictions(head: str | os.PathLike) -> dict:
    """The per-image test predictions saved by :func:`evaluate`: ``y``, ``pred``, ``paths`` and the image ``root``."""
    _, preds = _outputs(Path(head).with_suffix(".json"))
    if not preds.is_file():
        raise ValueError(f"no test predictions at {preds}; run pipeline evaluate on {head} first")
    with np.load(preds, allow_pickle=False) as z:
        return {"y": z["y"], "pred": z["pred"], "paths": [str(p) for p in z["paths"]], "root": str(z["root"])}


def _report(metrics: dict, y: np.ndarray, pred: np.ndarray, class_scores, classes: list[str], path: Path, name: str,
            paths: list[str], root: str) -> dict:
    """Add top-5, the per-class report and the confusion matrix to ``metrics``; write the JSON, PNG and predictions beside ``path``."""
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
    out, preds = _outputs(path)
    atomic_write(preds, lambda f: np.savez(f, y=np.asarray(y), pred=np.asarray(pred), paths=np.asarray(paths, dtype=str), root=np.asarray(str(root))))
    # The metrics last: their presence with matching inputs is what marks the evaluation done.
    atomic_write(out, lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    metrics["json"] = str(out)
    metrics["status"] = "evaluated"
    return metrics


def _evaluate_finetuned(path: str | os.PathLike, test_cache: str | os.PathLike | None, source: ExtractConfig | None, force: bool) -> dict:
    """A fine-tuned model on the test split's images of its dataset (or of ``source``'s)."""
    if test_cache is not None:
        raise ValueError(f"{path} is a fine-tuned model: it is evaluated on the test images, not on a feature cache; drop --test-cache")
    meta_path, meta = read_meta(path, FORMAT, "fine-tuned model", "fine-tuned model", "run pipeline finetune first")
    ds = meta["dataset"]
    spec = source.dataset if source else DatasetSpec(**{k: ds[k] for k in ("root", "labels_csv", "id_column", "label_column", "image_dir", "extension", "val_fraction", "test_fraction", "split_seed")})
    split = load_split(spec, "test")
    if len(split) == 0:
        raise ValueError(f"the test split of {spec.root} has no images")
    inputs = {"head": _identity(meta_path, meta), "test": {"root": str(Path(spec.root).resolve()), "fingerprint": split.fingerprint, "rows": len(split)}}
    reused = None if force else _reusable(Path(path), inputs)
    if reused is not None:
        return reused
    fm = load_finetuned(path)
    if split.classes != fm.classes:
        raise ValueError(f"the test split of {spec.root} has classes {split.classes[:10]}, the model was trained on {fm.classes[:10]}")
    positions, logits, bad = image_logits(fm, spec.root, split.paths, progress=True)
    y = split.labels[positions]
    pred = logits.argmax(1)
    metrics = {
        "head": str(fm.path), "clf": "finetune", "model": fm.meta["model"], "test_split": f"{spec.root}:test",
        "n": int(len(y)), "n_skipped": len(bad) + len(split.rejected), "top1": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "val_accuracy": fm.meta.get("val_accuracy"),
        "fit_seconds": fm.meta.get("seconds"), "best_epoch": fm.meta.get("best_epoch"), "inputs": inputs,
    }
    return _report(metrics, y, pred, lambda: logits, fm.classes, fm.path, f"finetune {fm.meta['model']}",
                   [split.paths[i] for i in positions], str(Path(spec.root).resolve()))


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
        if meta.get("format") != HEAD_FORMAT:
            continue
        test_path = meta_path.with_name(meta_path.stem + "-test.json")
        test = json.loads(test_path.read_text()) if test_path.is_file() else {}
        rows.append({
            "clf": meta["clf"], "val_accuracy": meta["val_accuracy"], "top1": test.get("top1"), "top5": test.get("top5"),
            "balanced_accuracy": test.get("balanced_accuracy"), "fit_seconds": meta["fit_seconds"],
            "param": meta["param"], "value": meta["value"], "preprocessing": meta["preprocessing"], "path": str(meta_path),
            "config": meta.get("config", {}), "subset": meta.get("subset"),
        })
    if not rows:
        raise ValueError(f"no heads in {folder}; fit one with pipeline fit-head")
    return sorted(rows, key=lambda r: -(r["top1"] if r["top1"] is not None else r["val_accuracy"]))
