"""Evaluation: a head's metrics on the test cache (a fine-tuned model's on the test images), its confusion matrix, and the table of every head on a cache."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, top_k_accuracy_score

from . import caveats, layout, provenance, stats
from .artifacts import artifact_path, is_finetuned, load_finetuned, load_head, read_meta, require_fields
from .cache import FeatureCache, read_cache
from .config import DatasetSpec, ExtractConfig
from .validate import expect_instance
from .data import load_split
from .extract import locate_cache
from .files import atomic_write, file_sha256
from .fit import check_disjoint, load_split_features
from .heads import head_probabilities, in_row_blocks
from .plots import plot_confusion
from .predict import image_logits

__all__ = ["evaluate", "compare", "load_predictions"]

# Raised when the metrics gain what older evaluations lack (2: the confidence interval, the calibration error and the
# warnings), so that those are made again rather than reused without them.
_RECORD = 2


def evaluate(head: str | os.PathLike, test_cache: str | os.PathLike | None = None, source: ExtractConfig | None = None, *,
             force: bool = False, allow_overlap: bool = False) -> dict:
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
        force: evaluate even when an up-to-date evaluation exists.
        allow_overlap: evaluate a head even on a test cache that shares images with the caches it was fitted or
            chosen on, with a warning (recorded in the metrics).

    Returns:
        The metrics: top-1 with its 95 % Wilson interval (``top1_ci``), top-5 (more than 5 classes), balanced accuracy,
        the expected calibration error of the probabilities ``pipeline predict`` gives (``ece``), per-class report,
        confusion matrix.

    Raises:
        ValueError: a test cache that shares images with the head's train or val cache (unless ``allow_overlap``),
            features the head was not fitted on, or a malformed head.
    """
    if source is not None:
        expect_instance("evaluate's source", source, ExtractConfig)
    if is_finetuned(head):
        return _evaluate_finetuned(head, test_cache, source, force)
    meta_path, meta = read_meta(head, layout.HEAD_FORMAT, "head", "pipeline head", "fit a head with pipeline fit-head first")
    require_fields(meta_path, meta, ("clf", "tap", "features", *(("train_cache.path",) if test_cache is None else ())))
    if test_cache is None:
        train_path = Path(meta["train_cache"]["path"])
        test_cache = locate_cache(replace(source, split="test")) if source else layout.sibling_cache(train_path, "test")
    with read_cache(test_cache) as cache:
        overlap = _check_unseen(meta_path, meta, cache, allow_overlap)
        inputs = {"head": _identity(meta_path, meta), "test": cache.identity, "record": _RECORD}
        reused = None if force else _reusable(Path(head), inputs)
        if reused is not None:
            return reused
        art = load_head(head)
        art.check_features(cache.attrs)
        if cache.classes != art.classes:
            raise ValueError(f"{cache.path} has classes {cache.classes}, the head was fitted on {art.classes}")
        X, y = load_split_features(cache, art.meta["tap"], "test")
        test_path, paths, root = cache.path, cache.paths, cache.attrs.get("data_root", "")
    pred = in_row_blocks(art.pipeline, "predict", X)
    classes = art.classes
    metrics = {
        "head": str(art.path), "clf": art.meta["clf"], "test_cache": str(test_path), "n": int(len(y)),
        "top1": float((pred == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "val_accuracy": art.meta.get("val_accuracy"), "fit_seconds": art.meta.get("fit_seconds"),
        "param": art.meta.get("param"), "value": art.meta.get("value"), **({"overlap": overlap} if overlap else {}),
        **provenance.stamp(inputs),
    }
    probabilities = head_probabilities(art.pipeline, X, art.temperature)
    return _report(metrics, y, pred, probabilities, classes, art.path, art.meta["clf"], paths, root)


def _check_unseen(meta_path: Path, meta: dict, test: FeatureCache, allow: bool) -> list[str]:
    """Refuse a test cache that shares images with the caches a head was fitted (train) and chosen (val) on.

    The head's caches are opened where it recorded them; where one is gone or unreadable, the dataset
    fingerprint recorded when the head was fitted still recognises the very same split.
    """
    hint = ("a head scored on images it was fitted or chosen on reports a flattering, wrong accuracy; evaluate it on a test "
            "split that shares none of them, or pass --allow-overlap to evaluate anyway")
    found: list[str] = []
    with ExitStack() as stack:
        seen: dict[str, FeatureCache] = {}
        for role in ("train", "val"):
            record = meta.get(f"{role}_cache")
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                continue
            try:
                seen[role] = stack.enter_context(read_cache(record["path"]))
            except ValueError:
                fingerprint = record.get("dataset_fingerprint")
                if fingerprint and fingerprint == test.attrs.get("dataset_fingerprint"):
                    found.append(f"{test.path} holds the {role} split that {meta_path} was {'fitted' if role == 'train' else 'chosen'} on "
                                 f"(the same dataset fingerprint, {fingerprint[:12]}...)")
        if found and not allow:
            raise ValueError(f"{'; '.join(found)}; {hint}")
        for line in found:
            warnings.warn(f"{line} (allowed)", stacklevel=3)
        return found + check_disjoint({**seen, "test": test}, allow=allow, hint=hint, against="test")


def _identity(meta_path: Path, meta: dict) -> dict:
    """A head's or model's identity for reuse: when it was made and its artifact's digest, as found on disk (so that
    a damaged artifact is never passed over by a reused result, but refused when it is loaded)."""
    try:
        digest = file_sha256(artifact_path(meta_path, meta), remember=True)
    except ValueError:
        digest = None
    return {"artifact_sha256": digest, "created": meta.get("created")}


def _reusable(path: Path, inputs: dict) -> dict | None:
    """The saved metrics of an evaluation made from exactly ``inputs``, with its predictions file, else None."""
    files = layout.evaluation_files(path)
    metrics = provenance.current_record(files.metrics, inputs, files.predictions)
    return None if metrics is None else {**metrics, "json": str(files.metrics), "status": "up-to-date"}


def load_predictions(head: str | os.PathLike) -> dict:
    """The per-image test predictions saved by :func:`evaluate`: ``y``, ``pred``, ``paths`` and the image ``root``."""
    preds = layout.evaluation_files(head).predictions
    if not preds.is_file():
        raise ValueError(f"no test predictions at {preds}; run pipeline evaluate on {head} first")
    with np.load(preds, allow_pickle=False) as z:
        return {"y": z["y"], "pred": z["pred"], "paths": [str(p) for p in z["paths"]], "root": str(z["root"])}


def _report(metrics: dict, y: np.ndarray, pred: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path, name: str,
            paths: list[str], root: str) -> dict:
    """Add top-1's confidence interval, top-5, the calibration error, the per-class report and the confusion matrix to
    ``metrics``; write the JSON, PNG and predictions beside ``path``."""
    labels = list(range(len(classes)))
    metrics["top1_ci"] = list(stats.wilson_interval(int((pred == y).sum()), len(y)))
    metrics["ece"] = stats.expected_calibration_error(probabilities, y)
    metrics["warnings"] = caveats.few_images(y, classes, "test")
    if len(classes) > 5:
        metrics["top5"] = float(top_k_accuracy_score(y, probabilities, k=5, labels=labels))
    metrics["per_class"] = classification_report(y, pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    metrics["confusion_matrix"] = cm.tolist()
    files = layout.evaluation_files(path)
    out, preds = files.metrics, files.predictions
    png = plot_confusion(cm, classes, files.confusion, f"{name}: test top-1 {metrics['top1']:.2%}")
    metrics["confusion_png"] = str(png)
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
    meta_path, meta = read_meta(path, layout.FINETUNED_FORMAT, "fine-tuned model", "fine-tuned model", "run pipeline finetune first")
    spec = source.dataset if source else _recorded_dataset(meta_path, meta)
    split = load_split(spec, "test")
    if len(split) == 0:
        raise ValueError(f"the test split of {spec.root} has no images")
    test = {"root": str(Path(spec.root).resolve()), "fingerprint": split.fingerprint, "rows": len(split)}
    inputs = {"head": _identity(meta_path, meta), "test": test, "record": _RECORD}
    reused = None if force else _reusable(Path(path), inputs)
    if reused is not None:
        return reused
    fm = load_finetuned(path)
    if split.classes != fm.classes:
        raise ValueError(f"the test split of {spec.root} has classes {split.classes[:10]}, the model was trained on {fm.classes[:10]}")
    positions, logits, bad = image_logits(fm, spec.root, split.paths, progress=True)
    if len(positions) == 0:
        raise ValueError(f"none of the {len(split)} test images of {spec.root} could be read; there is nothing to score")
    y = split.labels[positions]
    pred = logits.argmax(1)
    metrics = {
        "head": str(fm.path), "clf": "finetune", "model": fm.meta["model"], "test_split": f"{spec.root}:test",
        "n": int(len(y)), "n_skipped": len(bad) + len(split.rejected), "top1": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "val_accuracy": fm.meta.get("val_accuracy"),
        "fit_seconds": fm.meta.get("seconds"), "best_epoch": fm.meta.get("best_epoch"), **provenance.stamp(inputs),
    }
    return _report(metrics, y, pred, stats.softmax(logits), fm.classes, fm.path, f"finetune {fm.meta['model']}",
                   [split.paths[i] for i in positions], str(Path(spec.root).resolve()))


def _recorded_dataset(meta_path: Path, meta: dict) -> DatasetSpec:
    """The dataset a fine-tuned model's metadata records, checked field by field."""
    require_fields(meta_path, meta, ("dataset", "dataset.root"))
    ds = meta["dataset"]
    names = [f.name for f in dataclasses.fields(DatasetSpec)]
    missing = [k for k in names if k not in ds]
    if missing:
        raise ValueError(f"{meta_path} lacks the field 'dataset.{missing[0]}'; it is not a whole metadata file (train it again)")
    try:
        return DatasetSpec(**{k: ds[k] for k in names})
    except ValueError as e:
        raise ValueError(f"{meta_path}: the field 'dataset' does not describe a dataset ({e})") from None


def compare(folder: str | os.PathLike | None = None, source: ExtractConfig | None = None) -> list[dict]:
    """One row per head fitted on a cache: val and test accuracy (with its 95 % interval, ``top1_ci``), fit time,
    chosen hyper-parameter.

    Rows are ranked by val accuracy, the criterion every choice is made on; test accuracy is reported beside it.
    A metadata file that cannot be read is named in a warning and left out; one that is read but lacks a field the
    table shows (or holds it with the wrong type) is an error naming the file and the field.

    Args:
        folder: a heads folder; None locates ``<train cache folder>/heads`` from ``source``.
        source: extract settings.
    """
    if source is not None:
        expect_instance("compare's source", source, ExtractConfig)
    folder = Path(folder) if folder else layout.heads_dir(locate_cache(replace(source or ExtractConfig(), split="train")))
    if not folder.is_dir():
        raise ValueError(f"no heads in {folder}; fit one with pipeline fit-head")
    rows = []
    for meta_path in layout.head_metadata(folder):
        meta = provenance.read_record(meta_path)
        if meta is None:
            warnings.warn(f"{meta_path} is not readable JSON; left out of the comparison")
            continue
        if meta.get("format") != layout.HEAD_FORMAT:
            continue
        test = provenance.read_record(layout.evaluation_files(meta_path).metrics) or {}
        # A head file that is readable but lacks what the table shows is an error, not a row quietly left out.
        require_fields(meta_path, meta, ("clf", "val_accuracy", "fit_seconds", "param", "value", "preprocessing"))
        rows.append({
            "clf": meta["clf"], "val_accuracy": meta["val_accuracy"], "top1": test.get("top1"), "top1_ci": test.get("top1_ci"),
            "top5": test.get("top5"), "ece": test.get("ece"),
            "balanced_accuracy": test.get("balanced_accuracy"), "fit_seconds": meta["fit_seconds"],
            "param": meta["param"], "value": meta["value"], "preprocessing": meta["preprocessing"], "path": str(meta_path),
            "config": meta.get("config", {}), "subset": meta.get("subset"), "n_test": test.get("n"),
            "tap": meta.get("tap"), "taps_tried": meta.get("taps_tried", []),
            "warnings": [*meta.get("warnings", []), *test.get("warnings", [])],
            "made_by": provenance.made_by(meta, test),
        })
    if not rows:
        raise ValueError(f"no heads in {folder}; fit one with pipeline fit-head")
    return sorted(rows, key=lambda r: -float(r["val_accuracy"]))
