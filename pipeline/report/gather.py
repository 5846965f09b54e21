"""What the report is made from, read from disk: the caches, heads, subset heads, fine-tune runs and their test evaluations."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import layout, provenance, stats
from ..cache import read_cache
from ..config import SPLITS, ExtractConfig
from ..data import load_rgb, stratified_subset
from ..evaluate import compare, load_predictions
from ..extract import locate_cache

__all__ = ["read_caches", "head_rows", "subset_head_rows", "finetune_rows", "chosen_on_val", "against_chosen", "warnings_of",
           "linear_history", "confusion_matrix",
           "projection_sample", "misclassified", "audit_summary", "audit_accuracies", "audit_thumbnails"]


def read_caches(source: ExtractConfig) -> dict[str, dict]:
    """What each split's cache holds and how it was made, by split.

    Raises:
        ValueError: no train or no test cache.
    """
    out = {}
    for split in SPLITS:
        path = locate_cache(replace(source, split=split))
        if not path.is_file():
            continue
        with read_cache(path) as cache:
            attrs = cache.attrs
            tap = cache.taps[0]
            out[split] = {
                "path": str(path), "rows": len(cache), "shape": list(cache.dataset(tap).shape[1:]), "tap": tap, "taps": cache.taps,
                "dtype": str(cache.dataset(tap).dtype), "bytes": path.stat().st_size, "images_per_s": attrs.get("images_per_s"),
                "engine": attrs.get("engine"), "runtime": attrs.get("runtime"), "created": attrs.get("created"),
                "skipped": len(cache.skipped), "settings": attrs.get("settings", {}), "versions": attrs.get("versions", {}),
                "classes": cache.classes, "data_root": attrs.get("data_root"), "image_size": attrs.get("image_size"),
                "skipped_files": cache.skipped[:_LISTED], "ignored": attrs.get("n_ignored", 0), "decoding": attrs.get("decoding", {}),
                "made_by": provenance.made_by(attrs),
            }
    if "train" not in out or "test" not in out:
        raise ValueError(f"no train and test caches for {source.data} with {source.model} ({source.weights}); run pipeline extract "
                         "--split train --split val --split test first")
    return out


# Skipped files listed by name in the report, per split (the cache holds them all: pipeline info).
_LISTED = 20


def commands(rows: Iterable[dict]) -> list[str]:
    """The distinct command lines that made the given caches, heads and fine-tunes (their ``made_by``), oldest first."""
    made = [pair for row in rows for pair in (row.get("made_by") or [])]
    out: list[str] = []
    for _, command in sorted(made, key=lambda pair: pair[0] or ""):
        if command not in out:
            out.append(command)
    return out


def _head_label(clf: str, subset: dict | None) -> str:
    return clf + (f" ({subset['per_class']}/class)" if subset else "")


def head_rows(folder: Path, kind: str = "head") -> list[dict]:
    """compare()'s rows of the heads in ``folder`` that were evaluated on test (ranked by val), with ``kind`` and ``label``."""
    if not folder.is_dir() or not layout.head_metadata(folder):
        return []
    try:
        rows = compare(folder)
    except ValueError:
        return []
    return [{**r, "name": r["clf"], "kind": kind, "label": _head_label(r["clf"], r.get("subset")), "top1_ci": _interval(r)}
            for r in rows if r["top1"] is not None]


def _interval(row: dict) -> list[float] | None:
    """The 95 % interval of a row's test top-1: as its evaluation recorded it, else (an older evaluation) from its
    top-1 and test size, which give back the count of right answers exactly."""
    if row.get("top1_ci") is not None:
        return row["top1_ci"]
    n = row.get("n_test")
    return None if not n else list(stats.wilson_interval(round(row["top1"] * n), n))


def subset_head_rows(folder: Path) -> dict[str, list[dict]]:
    """The evaluated heads of each ``subset-<N>`` folder of a heads folder, by N (as text: it is a JSON key)."""
    out = {}
    for n, sub in layout.subset_head_dirs(folder):
        rows = head_rows(sub, kind="subset head")
        if rows:
            out[str(n)] = rows
    return out


def finetune_rows(runs_dir: Path, caches: dict) -> list[dict]:
    """The fine-tune runs of the caches' dataset and backbone that were evaluated on test."""
    train = caches["train"]
    s = train["settings"]
    root = str(Path(train["data_root"]).resolve()) if train.get("data_root") else None
    out = []
    key = layout.dataset_key(runs_dir, root) if root else s.get("dataset", "")
    for meta_path in layout.run_metadata(runs_dir, key, s.get("model", ""), s.get("weights", "")):
        meta = provenance.read_record(meta_path)
        if meta is None or meta.get("format") != layout.FINETUNED_FORMAT or meta.get("model") != s.get("model"):
            continue
        if meta.get("weights") != s.get("weights") or (root and meta.get("dataset", {}).get("root") != root):
            continue
        test = provenance.read_record(layout.evaluation_files(meta_path).metrics)
        if test is None:
            continue
        config = meta.get("config", {})
        name = meta_path.parent.name
        label = f"fine-tune {name}" + (f" ({config['subset']}/class)" if config.get("subset") else "")
        row = {
            "kind": "finetune", "name": f"finetune: {name}", "label": label,
            "path": str(meta_path), "top1": test["top1"], "top5": test.get("top5"), "balanced_accuracy": test["balanced_accuracy"],
            "val_accuracy": meta.get("val_accuracy"), "fit_seconds": meta.get("seconds"), "best_epoch": meta.get("best_epoch"),
            "epochs": config.get("epochs"), "subset": config.get("subset"), "init_head": meta.get("init_head"), "freeze": config.get("freeze"),
            "history": meta.get("history", []), "config": config, "n_test": test.get("n"), "runtime": meta.get("runtime"),
            "top1_ci": test.get("top1_ci"), "ece": test.get("ece"), "warnings": [*meta.get("warnings", []), *test.get("warnings", [])],
            "made_by": provenance.made_by(meta, test),
        }
        out.append({**row, "top1_ci": _interval(row)})
    return out


def _val(row: dict) -> float:
    v = row.get("val_accuracy")
    return -1.0 if v is None else float(v)


def chosen_on_val(rows: list[dict]) -> dict | None:
    """The row with the best val accuracy (the first of equals), or None for no rows: every choice is made on val, never on test."""
    return max(rows, key=_val) if rows else None


def _answers(row: dict) -> dict[str, tuple[int, bool]] | None:
    """A model's saved test predictions by image (its resolved path): the true class and whether it was right."""
    try:
        preds = load_predictions(row["path"])
    except ValueError:
        return None
    root = Path(preds["root"]).resolve()
    return {str(root / p): (int(t), bool(t == q)) for p, t, q in zip(preds["paths"], preds["y"].tolist(), preds["pred"].tolist())}


def against_chosen(chosen: dict, others: list[dict]) -> list[dict]:
    """Whether each other model's test top-1 differs from the chosen one's by more than the noise: McNemar's exact test
    on the per-image predictions both saved, when they scored the same test images with the same labels.

    Returns:
        Per other model: ``label``, ``top1``, ``top1_ci``, ``n``, ``only_chosen`` and ``only_other`` (the images only
        one of the two got right), ``p`` and ``within_noise`` (p >= 0.05); or, where the two cannot be paired,
        ``label`` and ``why``. Empty when the chosen model saved no predictions.
    """
    mine = _answers(chosen)
    if mine is None:
        return []
    out = []
    for row in others:
        theirs = _answers(row)
        if theirs is None or theirs.keys() != mine.keys() or any(theirs[k][0] != v[0] for k, v in mine.items()):
            why = "no saved test predictions" if theirs is None else "not scored on the same test images"
            out.append({"label": row["label"], "top1": row["top1"], "top1_ci": row.get("top1_ci"), "why": why})
            continue
        a = np.array([v[1] for v in mine.values()])
        b = np.array([theirs[k][1] for k in mine])
        only_chosen, only_other = stats.discordant_pairs(a, b)
        p = stats.mcnemar(a, b)
        out.append({"label": row["label"], "top1": row["top1"], "top1_ci": row.get("top1_ci"), "n": len(a), "only_chosen": only_chosen,
                    "only_other": only_other, "p": p, "within_noise": p >= 0.05})
    return out


def warnings_of(rows: list[dict]) -> list[dict]:
    """The warnings fit-head and evaluate recorded for these models, each once with the models it concerns (in order)."""
    found: dict[str, list[str]] = {}
    for row in rows:
        for line in row.get("warnings") or []:
            found.setdefault(line, []).append(row["label"])
    return [{"warning": line, "models": labels} for line, labels in found.items()]


def linear_history(head: dict) -> list[dict]:
    """The per-epoch history a linear head wrote beside itself (rows of text, as CSV reads them), or [] for none."""
    path = layout.head_files(head["path"]).history
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confusion_matrix(row: dict) -> np.ndarray:
    """The test confusion matrix of a head or fine-tune, from its evaluation."""
    metrics = provenance.read_record(layout.evaluation_files(row["path"]).metrics)
    if metrics is None or "confusion_matrix" not in metrics:
        raise ValueError(f"no readable test evaluation of {row['path']}; run pipeline evaluate on it")
    return np.asarray(metrics["confusion_matrix"])


def projection_sample(cache_path: str | Path, tap: str, points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About ``points`` rows of a cache, the same number per class (fewer where a class has fewer), and their labels;
    a spatial tap's maps averaged over H and W."""
    with read_cache(cache_path) as cache:
        y = cache.labels
        per_class = max(1, points // max(1, len(np.unique(y))))
        rows = stratified_subset(y, per_class, seed)
        X = cache.dataset(tap)[rows].astype(np.float32)
    return (X.mean((2, 3)) if X.ndim == 4 else X), y[rows]  # spatial maps averaged, as the heads see them by default


def misclassified(row: dict, classes: list[str], n: int, seed: int) -> tuple[list[np.ndarray | None], list[str]]:
    """Up to ``n`` test images a head or fine-tune got wrong, drawn with ``seed``, with ``true\\n-> predicted`` titles.

    Raises:
        ValueError: its evaluation saved no predictions.
    """
    preds = load_predictions(row["path"])
    wrong = np.flatnonzero(preds["y"] != preds["pred"])
    pick = np.sort(np.random.default_rng(seed).permutation(wrong)[:n])
    images: list[np.ndarray | None] = []
    for i in pick:
        try:
            images.append(np.asarray(load_rgb(Path(preds["root"]) / preds["paths"][i])))
        except (OSError, ValueError):
            images.append(None)
    titles = [f"{classes[int(preds['y'][i])]}\n-> {classes[int(preds['pred'][i])]}" for i in pick]
    return images, titles


# ---------------------------------------------------------------- the audit


def audit_summary(caches: dict) -> dict | None:
    """The summary of the audit beside the caches (``pipeline audit``), with its files, or None when there is none."""
    files = layout.audit_files(layout.audit_dir(caches["train"]["path"]))
    summary = provenance.read_record(files.summary)
    if summary is None or summary.get("format") != "pipeline-audit" or not all(
            p.is_file() for p in (files.label_issues, files.duplicates, files.outliers)):
        return None
    return {**summary, "files": {k: str(getattr(files, k)) for k in ("summary", "label_issues", "duplicates", "outliers")}}


def audit_accuracies(audit: dict, heads: list[dict], folder: Path) -> tuple[list[dict], list[dict]]:
    """What acting on the audit changes, measured.

    Returns:
        Per evaluated head, test top-1 on every test image and without those the audit found in train or val (from
        the head's saved predictions); and per head fitted without the audit's most suspect images (``heads/exclude-N/``),
        its test top-1 beside that of the same head fitted on every image.
    """
    from ..audit import leaked_test_paths

    leaked = leaked_test_paths(audit["files"]["duplicates"])
    leaks = []
    for r in heads:
        try:
            preds = load_predictions(r["path"])
        except ValueError:
            continue
        keep = np.asarray([p not in leaked for p in preds["paths"]], dtype=bool)
        right = preds["y"] == preds["pred"]
        leaks.append({"label": r["label"], "n": len(right), "top1": float(right.mean()), "kept": int(keep.sum()),
                      "top1_kept": float(right[keep].mean()) if keep.any() else None})
    by_clf = {r["clf"]: r for r in heads}
    cleaned = []
    for n, sub in layout.exclude_head_dirs(folder):
        for r in head_rows(sub, kind="head without suspects"):
            full = by_clf.get(r["clf"])
            cleaned.append({"label": r["clf"], "excluded": n, "top1": r["top1"], "val_accuracy": r["val_accuracy"], "path": r["path"],
                            "full_top1": full["top1"] if full else None, "full_val_accuracy": full["val_accuracy"] if full else None})
    return leaks, cleaned


def _image(root: str | None, path: str) -> np.ndarray | None:
    try:
        return np.asarray(load_rgb(Path(root or "") / path))
    except (OSError, ValueError):
        return None


def _pair(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Two images side by side at the same height, a white gap between."""
    if a is None or b is None:
        return None
    from PIL import Image

    h = max(a.shape[0], b.shape[0])
    a, b = (np.asarray(Image.fromarray(x).resize((max(1, round(x.shape[1] * h / x.shape[0])), h))) for x in (a, b))
    return np.concatenate([a, np.full((h, max(2, h // 12), 3), 255, np.uint8), b], axis=1)


def audit_thumbnails(audit: dict, caches: dict, n: int) -> list[tuple[str, list[tuple[np.ndarray | None, str]]]]:
    """The top ``n`` suspects of each kind, as (title, [(image, caption)]): given and suggested labels under each."""
    with open(audit["files"]["label_issues"], newline="") as f:
        issues = list(csv.DictReader(f))
    suggested = {(r["split"], r["path"]): r["suggested"] for r in issues}
    given: dict[tuple[str, str], str] = {}
    for split, c in caches.items():
        with read_cache(c["path"]) as cache:
            given.update({(split, p): c["classes"][y] for p, y in zip(cache.paths, cache.labels.tolist())})
    roots = {split: c.get("data_root") for split, c in caches.items()}

    def labels(split: str, path: str) -> str:
        s = suggested.get((split, path))
        return f"{split}: {given.get((split, path), '?')}" + (f"\nsuggested: {s}" if s and s != given.get((split, path)) else "")

    flagged = issues[:min(n, audit["label_issues"])]
    label_items = [(_image(roots.get(r["split"]), r["path"]), f"given: {r['given']}\nsuggested: {r['suggested']}\nscore {float(r['score']):.3f}")
                   for r in flagged]
    with open(audit["files"]["duplicates"], newline="") as f:
        pairs = [r for _, r in zip(range(n), csv.DictReader(f))]
    dup_items = [(_pair(_image(roots.get(r["split_a"]), r["path_a"]), _image(roots.get(r["split_b"]), r["path_b"])),
                  f"{r['split_a']}: {given.get((r['split_a'], r['path_a']), '?')} | {r['split_b']}: {given.get((r['split_b'], r['path_b']), '?')}"
                  f"\n{r['kind']}, similarity {float(r['similarity']):.3f}") for r in pairs]
    with open(audit["files"]["outliers"], newline="") as f:
        far = [r for _, r in zip(range(n), csv.DictReader(f))]
    out_items = [(_image(roots.get(r["split"]), r["path"]), f"{labels(r['split'], r['path'])}\nscore {float(r['score']):.3f}") for r in far]
    return [("label issues, most suspect first (given -> suggested)", label_items),
            ("duplicates, cross-split first", dup_items), ("outliers, most unusual first", out_items)]
