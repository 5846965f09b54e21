"""Building the report: gather what the stages left, draw the figures, write the page, and reuse it while its inputs are unchanged."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import layout, plots, provenance
from ..files import file_sha256
from ..config import ExtractConfig, ReportConfig
from ..files import atomic_write
from . import gather
from .render import render_html, render_markdown, sections

__all__ = ["ReportResult", "build_report"]

# The keys of a model's row that the report's record and result keep for it.
_BEST_KEYS = ("label", "kind", "path", "val_accuracy", "top1", "top1_ci", "balanced_accuracy", "tap")


@dataclass
class ReportResult:
    """A written report: ``status`` is ``written``, or ``up-to-date`` when its inputs had not changed.

    ``best`` is the model chosen on val accuracy (its label, kind, path, val accuracy and test metrics).
    """

    html: Path
    markdown: Path
    status: str
    best: dict | None = None
    seconds: float = 0.0
    figures: list[Path] = field(default_factory=list)


def _inputs(caches: dict, heads: list[dict], subset_heads: dict, finetunes: list[dict], config: ReportConfig, audit: dict | None,
            cleaned: list[dict]) -> dict:
    """Everything the report is made from, by content: when this is unchanged, so is the report."""
    paths = [r["path"] for r in heads] + [r["path"] for rows in subset_heads.values() for r in rows] + [r["path"] for r in finetunes]
    paths += [r["path"] for r in cleaned]
    digests = {}
    for p in paths:
        test = layout.evaluation_files(p).metrics
        digests[p] = [file_sha256(p), file_sha256(test) if test.is_file() else None]
    for r in heads:  # the linear head's history feeds the learning curves
        history = layout.head_files(r["path"]).history
        if history.is_file():
            digests[str(history)] = file_sha256(history)
    if audit is not None:  # its summary changes whenever it is redone
        digests[audit["files"]["summary"]] = file_sha256(audit["files"]["summary"])
    return {"caches": {s: [c["path"], c["created"], c["rows"]] for s, c in caches.items()}, "files": digests,
            "config": asdict(config), "pipeline": provenance.PIPELINE_VERSION}


def _project(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of standardised features: t-SNE (after PCA to 50 dimensions) or PCA."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X.reshape(len(X), -1))
    if method == "tsne":
        from sklearn.manifold import TSNE

        Z = PCA(min(50, *Z.shape), random_state=seed).fit_transform(Z)
        return TSNE(2, init="pca", perplexity=min(30.0, (len(Z) - 1) / 3), random_state=seed).fit_transform(Z)
    return PCA(2, random_state=seed).fit_transform(Z)


def _figures(files: layout.ReportFiles, caches: dict, heads: list[dict], subset_heads: dict, finetunes: list[dict], best: dict,
             config: ReportConfig, audit: dict | None, say: Callable[[str], Any]) -> tuple[dict[str, Path | None], dict[str, str]]:
    """Draw every figure into the report's folder; returns the PNGs (None where there is nothing to draw) and their captions."""
    classes = caches["train"]["classes"]
    figures: dict[str, Path | None] = {}
    captions = {"accuracy_vs_time": "Accuracy against fit time", "learning_curves": "Learning curves",
                "confusion": f"Confusion matrix of the best model, chosen on val ({best['label']})",
                "misclassified": f"Misclassified test images of the best model ({best['label']})"}

    say("report: accuracy against fit time")
    everything = heads + [x for rows in subset_heads.values() for x in rows] + finetunes
    figures["accuracy_vs_time"] = plots.plot_accuracy_vs_time(everything, files.figure("accuracy_vs_time"))

    say("report: learning curves")
    linear = next((r for r in heads if r["clf"] == "linear"), None)
    finetune = gather.chosen_on_val(finetunes)
    panels = [(f"linear head ({linear['param']} {linear['value']:g})", gather.linear_history(linear)) if linear else ("", []),
              (finetune["label"], finetune["history"]) if finetune else ("", [])]
    figures["learning_curves"] = plots.plot_learning_curves(panels, files.figure("learning_curves"))

    say(f"report: confusion matrix of {best['label']}")
    figures["confusion"] = plots.plot_confusion(gather.confusion_matrix(best), classes, files.figure("confusion"),
                                                f"{best['label']}: test top-1 {best['top1']:.2%}")

    X, y = gather.projection_sample(caches["test"]["path"], caches["test"]["tap"], config.projection_points, config.seed)
    method = "t-SNE" if config.projection == "tsne" else "PCA"
    counts = np.bincount(y)
    counts = counts[counts > 0]
    per_class = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()} to {counts.max()}"
    captions["projection"] = f"{method} of {len(y):,} cached test features ({per_class} per class)"
    say(f"report: {method} of {len(y):,} test features")
    figures["projection"] = plots.plot_projection(_project(X, config.projection, config.seed), y, classes, captions["projection"],
                                                  files.figure("projection"))

    if audit is not None:
        say("report: the audit's top suspects")
        captions["audit"] = ("The audit's top suspects: the labels cleanlab finds least likely, the most similar pairs (cross-split "
                             "first), the images farthest from all others")
        figures["audit"] = plots.plot_audit(gather.audit_thumbnails(audit, caches, config.audit_images), files.figure("audit"))

    say("report: misclassified test images")
    try:
        images, titles = gather.misclassified(best, classes, config.grid_images, config.seed)
        figures["misclassified"] = plots.plot_misclassified(images, titles, files.figure("misclassified"))
    except ValueError:
        figures["misclassified"] = None
    return figures, captions


def build_report(source: ExtractConfig | None = None, config: ReportConfig | None = None, *, force: bool = False,
                 log: Callable[[str], Any] | None = None) -> ReportResult:
    """Write ``index.html`` (self-contained) and ``index.md`` (with PNGs) for one dataset and backbone.

    The best model, and the head the quality bar is held against, are those with the best val accuracy; their test
    accuracy is reported, never used to choose.

    Args:
        source: the extract settings that locate the caches (and so ``heads/``); defaults to ``ExtractConfig()``.
        config: the report settings.
        force: write it even when nothing it is made from has changed.
        log: called with a line per step (progress), e.g. ``print``.

    Raises:
        ValueError: no train and test caches, or no head evaluated on test.
    """
    source = source or ExtractConfig()
    config = config or ReportConfig()
    say = log or (lambda line: None)
    t0 = time.perf_counter()
    caches = gather.read_caches(source)
    folder = layout.heads_dir(caches["train"]["path"])
    heads = gather.head_rows(folder)
    if not heads:
        raise ValueError(f"no head in {folder} was evaluated on test; run pipeline fit-head and pipeline evaluate first")
    subset_heads = gather.subset_head_rows(folder)
    finetunes = gather.finetune_rows(Path(config.runs_dir), caches)
    audit = gather.audit_summary(caches)
    leaks, cleaned = gather.audit_accuracies(audit, heads, folder) if audit else ([], [])

    s = caches["train"]["settings"]
    root = caches["train"].get("data_root")
    key = layout.dataset_key(config.out_dir, root) if root else s.get("dataset", "dataset")
    files = layout.report_files(layout.report_dir(config.out_dir, key, s.get("model"), s.get("weights")))
    inputs = _inputs(caches, heads, subset_heads, finetunes, config, audit, cleaned)
    if not force:
        old = provenance.current_record(files.data, inputs, files.html, files.markdown)
        if old is not None:
            return ReportResult(files.html, files.markdown, "up-to-date", old.get("best"), 0.0)

    if root:
        layout.claim_dataset(config.out_dir, root)
    files.dir.mkdir(parents=True, exist_ok=True)
    best = gather.chosen_on_val(heads + finetunes)
    best_head = gather.chosen_on_val(heads)
    others = [r for r in heads + [x for rows in subset_heads.values() for x in rows] + finetunes if r is not best_head]
    noise = gather.against_chosen(best_head, others)
    cautions = gather.warnings_of([best_head, *others])
    figures, captions = _figures(files, caches, heads, subset_heads, finetunes, best, config, audit, say)
    drawn = {k: v for k, v in figures.items() if v}

    data = {
        "caches": caches, "heads": heads, "subset_heads": subset_heads, "finetunes": finetunes, "noise": noise, "warnings": cautions,
        "best": {k: best.get(k) for k in _BEST_KEYS}, "best_head": {k: best_head.get(k) for k in _BEST_KEYS if k != "kind"},
        "audit": None if audit is None else {**{k: v for k, v in audit.items() if k not in ("inputs", "versions")}, "leaks": leaks, "cleaned": cleaned},
        "config": asdict(config), "figures": {k: str(v) for k, v in drawn.items()}, "pipeline": provenance.PIPELINE_VERSION,
        "commands": gather.commands([*caches.values(), *heads, *(r for rows in subset_heads.values() for r in rows), *finetunes]),
        **provenance.stamp(inputs),
    }
    title = f"pipeline report: {s.get('dataset')} with {s.get('model')} ({s.get('weights')})"
    content = sections({**data, "best": best, "best_head": best_head, "figures": drawn, "captions": captions})
    for path, text in ((files.markdown, render_markdown(title, content)), (files.html, render_html(title, content))):
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
    # Last: it marks the report complete for reuse.
    atomic_write(files.data, lambda f: f.write(json.dumps(data, indent=1, default=str).encode()))
    return ReportResult(files.html, files.markdown, "written", data["best"], time.perf_counter() - t0, list(drawn.values()))
