"""The report: every head and fine-tune fitted on one dataset and backbone, in a self-contained HTML page and its
Markdown twin, with the plots people look at first.

``build_report`` gathers what earlier stages left on disk (the caches, ``heads/``, fine-tune runs and their test
evaluations); it computes nothing expensive but the 2-D projection, and is reused while its inputs are unchanged.
``check_render`` opens the page in headless Chromium and checks that every image in it decoded.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .provenance import PIPELINE_VERSION as __version__
from .backbones import file_sha256
from .cache import read_cache
from .config import PROJECTIONS, SPLITS, ExtractConfig, ReportConfig
from .data import load_rgb, stratified_subset
from .evaluate import compare, load_predictions
from .extract import locate_cache
from .files import atomic_write
from .plots import plot_confusion

__all__ = ["ReportConfig", "ReportResult", "build_report", "check_render", "find_chromium", "RenderCheck", "PROJECTIONS"]

@dataclass
class ReportResult:
    """A written report: ``status`` is ``written``, or ``up-to-date`` when its inputs had not changed."""

    html: Path
    markdown: Path
    status: str
    best: dict | None = None
    seconds: float = 0.0
    figures: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- gathering what the stages left


def _caches(source: ExtractConfig) -> dict[str, dict]:
    out = {}
    for split in SPLITS:
        path = locate_cache(replace(source, split=split))
        if not path.is_file():
            continue
        with read_cache(path) as cache:
            attrs = cache.attrs
            tap = cache.taps[0]
            out[split] = {
                "path": str(path), "rows": len(cache), "shape": list(cache.dataset(tap).shape[1:]), "tap": tap,
                "dtype": str(cache.dataset(tap).dtype), "bytes": path.stat().st_size, "images_per_s": attrs.get("images_per_s"),
                "engine": attrs.get("engine"), "runtime": attrs.get("runtime"), "created": attrs.get("created"),
                "skipped": len(cache.skipped), "settings": attrs.get("settings", {}), "versions": attrs.get("versions", {}),
                "classes": cache.classes, "data_root": attrs.get("data_root"), "image_size": attrs.get("image_size"),
            }
    if "train" not in out or "test" not in out:
        raise ValueError(f"no train and test caches for {source.data} with {source.model} ({source.weights}); run pipeline extract "
                         "--split train --split val --split test first")
    return out


def _head_rows(folder: Path) -> list[dict]:
    """compare()'s rows of the heads in ``folder`` that were evaluated on test, with their full metadata."""
    if not folder.is_dir() or not any(folder.glob("*.json")):
        return []
    try:
        rows = compare(folder)
    except ValueError:
        return []
    out = []
    for r in rows:
        if r["top1"] is None:
            continue
        out.append({**r, "name": r["clf"], "kind": "head"})
    return out


def _finetunes(runs_dir: Path, caches: dict) -> list[dict]:
    """Fine-tune runs of this dataset and backbone that were evaluated on test."""
    train = caches["train"]
    root = str(Path(train["data_root"]).resolve()) if train.get("data_root") else None
    out = []
    for meta_path in sorted(runs_dir.glob("*/*/*/model.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("format") != "pipeline-finetuned" or meta.get("model") != train["settings"].get("model"):
            continue
        if meta.get("weights") != train["settings"].get("weights") or (root and meta.get("dataset", {}).get("root") != root):
            continue
        test_path = meta_path.with_name("model-test.json")
        if not test_path.is_file():
            continue
        test = json.loads(test_path.read_text())
        config = meta.get("config", {})
        out.append({
            "kind": "finetune", "name": f"finetune: {meta_path.parent.name}", "path": str(meta_path), "top1": test["top1"],
            "top5": test.get("top5"), "balanced_accuracy": test["balanced_accuracy"], "val_accuracy": meta.get("val_accuracy"),
            "fit_seconds": meta.get("seconds"), "best_epoch": meta.get("best_epoch"), "epochs": config.get("epochs"),
            "subset": config.get("subset"), "init_head": meta.get("init_head"), "freeze": config.get("freeze"),
            "history": meta.get("history", []), "config": config, "n_test": test.get("n"), "runtime": meta.get("runtime"),
        })
    return out


def _inputs(caches: dict, heads: list[dict], subset_heads: dict, finetunes: list[dict], config: ReportConfig) -> dict:
    """Everything the report is made from, by content: when this is unchanged, so is the report."""
    files = [r["path"] for r in heads] + [r["path"] for rows in subset_heads.values() for r in rows] + [r["path"] for r in finetunes]
    digests = {}
    for f in files:
        p = Path(f)
        test = p.with_name(p.stem + "-test.json")
        digests[f] = [file_sha256(p), file_sha256(test) if test.is_file() else None]
    history = [Path(r["path"]).with_name("linear-history.csv") for r in heads if r["clf"] == "linear"]
    digests.update({str(h): file_sha256(h) for h in history if h.is_file()})
    return {"caches": {s: [c["path"], c["created"], c["rows"]] for s, c in caches.items()}, "files": digests,
            "config": asdict(config), "pipeline": __version__}


# ---------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    _plt().close(fig)
    return path


def plot_accuracy_vs_time(rows: list[dict], path: Path) -> Path:
    """Test top-1 against fit time (log scale), one labelled point per head or fine-tune."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"head": "o", "subset head": "s", "finetune": "*"}
    for kind in markers:
        pts = [r for r in rows if r["kind"] == kind and r.get("fit_seconds")]
        if not pts:
            continue
        ax.scatter([r["fit_seconds"] for r in pts], [100 * r["top1"] for r in pts], marker=markers[kind], s=90 if kind == "finetune" else 45,
                   label={"head": "head (full train set)", "subset head": "head on the fine-tune's subset"}.get(kind, kind), zorder=3)
        for r in pts if kind != "subset head" else []:  # subset heads crowd together: the table names them
            ax.annotate(r["label"], (r["fit_seconds"], 100 * r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("fit time, s (log scale; the sweep on val included)")
    ax.set_ylabel("test top-1, %")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Accuracy against fit time")
    return _save(fig, path)


def plot_learning_curves(linear: list[dict] | None, finetune: dict | None, path: Path) -> Path | None:
    """Per-epoch accuracy of the linear head (train, val) and of the fine-tune (train, val, test)."""
    panels = [(f"linear head (weight decay {linear[0]:g})", linear[1]) if linear else None,
              (finetune["name"], finetune["history"]) if finetune and finetune.get("history") else None]
    panels = [p for p in panels if p]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, history) in zip(axes[0], panels):
        epochs = [int(r["epoch"]) for r in history]
        for key, style in (("train_acc", "-o"), ("val_acc", "-s"), ("test_acc", "-^")):
            if key in history[0] and history[0][key] not in ("", None):
                ax.plot(epochs, [100 * float(r[key]) for r in history], style, ms=3, label=key.replace("_acc", ""))
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("accuracy, %")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_projection(X: np.ndarray, y: np.ndarray, classes: list[str], method: str, seed: int, path: Path) -> Path:
    """A 2-D map of features, coloured by class: t-SNE (after PCA to 50 dimensions) or PCA."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X.reshape(len(X), -1))
    if method == "tsne":
        from sklearn.manifold import TSNE

        Z = PCA(min(50, *Z.shape), random_state=seed).fit_transform(Z)
        Z = TSNE(2, init="pca", perplexity=min(30.0, (len(Z) - 1) / 3), random_state=seed).fit_transform(Z)
    else:
        Z = PCA(2, random_state=seed).fit_transform(Z)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        sel = y == c
        if sel.any():
            ax.scatter(Z[sel, 0], Z[sel, 1], s=5, color=cmap(c % cmap.N), label=name, alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(y)} cached test features")
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, path)


def plot_misclassified(preds: dict, classes: list[str], n: int, seed: int, path: Path) -> Path | None:
    """A grid of test images the model got wrong, titled with the true and the predicted class."""
    wrong = np.flatnonzero(preds["y"] != preds["pred"])
    if len(wrong) == 0:
        return None
    pick = np.sort(np.random.default_rng(seed).permutation(wrong)[:n])
    cols = min(8, len(pick))
    rows = math.ceil(len(pick) / cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, pick):
        try:
            img = load_rgb(Path(preds["root"]) / preds["paths"][i])
            ax.imshow(np.asarray(img))
        except (OSError, ValueError):
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        ax.set_title(f"{classes[int(preds['y'][i])]}\n-> {classes[int(preds['pred'][i])]}", fontsize=7, color="darkred")
    fig.suptitle("misclassified test images: true -> predicted", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------- the page


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _secs(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _table(header: list[str], rows: list[list[str]]) -> dict:
    return {"header": header, "rows": rows}


def _sections(d: dict) -> list[tuple[str, list[Any]]]:
    """The report's content, as (title, blocks); a block is a paragraph (str), a table (dict) or a figure (tuple)."""
    train = d["caches"]["train"]
    s = train["settings"]
    best, best_head = d["best"], d["best_head"]
    counts = ", ".join(f"{c['rows']:,} {split}" for split, c in d["caches"].items())
    summary = [
        f"Dataset **{s.get('dataset')}** ({counts} images, "
        f"{len(train['classes'])} classes); backbone **{s.get('model')}** with weights **{s.get('weights')}**, tap "
        f"`{train['tap']}` ({' x '.join(map(str, train['shape']))} features), images at {train.get('image_size')} px.",
    ]
    if best:
        summary.append(f"Best model on the test set: **{best['label']}**, top-1 **{_pct(best['top1'])}**, balanced accuracy "
                       f"{_pct(best['balanced_accuracy'])}.")
    if best_head and d["config"]["quality_bar"] is not None:
        bar = d["config"]["quality_bar"]
        met = "met" if best_head["top1"] >= bar else "**not met**"
        summary.append(f"Quality bar: the best cached head ({best_head['label']}) reaches {_pct(best_head['top1'])} against a bar of "
                       f"{_pct(bar)}: {met}.")
    sections: list[tuple[str, list[Any]]] = [("Summary", summary)]

    stage1 = _table(["split", "images", "features", "dtype", "cache size", "throughput", "engine"], [
        [split, f"{c['rows']:,}", " x ".join(map(str, c["shape"])), c["dtype"], f"{c['bytes'] / 2**20:.1f} MiB",
         f"{c['images_per_s']:.0f} img/s" if c.get("images_per_s") else "–", f"{c.get('engine')} ({c.get('runtime')})"]
        for split, c in d["caches"].items()])
    sections.append(("Stage one: feature extraction", [
        "The frozen backbone runs once per image; every head below trains on these cached arrays. Throughput is that of the "
        "run that completed the cache.", stage1]))

    heads = _table(["head", "test top-1", "balanced acc.", "top-5", "val acc.", "fit time", "chosen", "preprocessing"], [
        [r["label"], _pct(r["top1"]), _pct(r["balanced_accuracy"]), _pct(r.get("top5")), _pct(r["val_accuracy"]), _secs(r["fit_seconds"]),
         f"{r['param']}={r['value']:g}", r["preprocessing"]] for r in d["heads"]])
    sections.append(("Stage two: heads on the cached features", [
        f"Each head family sweeps its hyper-parameter on the val split ({d['caches'].get('val', {}).get('rows', 0):,} images) and is "
        "evaluated once on test. Fit time includes the whole sweep.", heads,
        ("Accuracy against fit time", d["figures"].get("accuracy_vs_time"))]))

    if d["finetunes"]:
        blocks: list[Any] = []
        for ft in d["finetunes"]:
            n = ft.get("subset")
            same = d["subset_heads"].get(str(n), []) if n else d["heads"]
            best_same = max(same, key=lambda r: r["val_accuracy"]) if same else None
            what = f"on {n} train images per class" if n else "on the whole train split"
            rows = [[ft["label"], _pct(ft["top1"]), _pct(ft["balanced_accuracy"]), _pct(ft["val_accuracy"]), _secs(ft["fit_seconds"]),
                     f"best epoch {ft['best_epoch']} of {ft['epochs']}, freeze {ft['freeze']}" + (", from a linear probe (LP-FT)" if ft.get("init_head") else "")]]
            if best_same:
                rows.append([f"best cached head, same images ({best_same['label']})", _pct(best_same["top1"]), _pct(best_same["balanced_accuracy"]),
                             _pct(best_same["val_accuracy"]), _secs(best_same["fit_seconds"]), f"{best_same['param']}={best_same['value']:g}, chosen on val"])
            for r in same:
                if r is not best_same:
                    rows.append([f"cached head, same images ({r['label']})", _pct(r["top1"]), _pct(r["balanced_accuracy"]),
                                 _pct(r["val_accuracy"]), _secs(r["fit_seconds"]), f"{r['param']}={r['value']:g}"])
            blocks += [f"Fine-tuning {what}, against heads fitted on the cached features of the same images (drawn with the same seed), "
                       f"all evaluated on the same {ft.get('n_test') or 0:,} test images. Fine-tune time is the training on "
                       f"{ft.get('runtime')}; a head's is its fit on the cache.",
                       _table(["model", "test top-1", "balanced acc.", "val acc.", "time", "notes"], rows)]
        sections.append(("Fine-tuning", blocks))

    figures = [("Learning curves", d["figures"].get("learning_curves")),
               (f"Confusion matrix of the best model ({best['label'] if best else '–'})", d["figures"].get("confusion")),
               ("2-D projection of the cached test features", d["figures"].get("projection")),
               ("Misclassified test images", d["figures"].get("misclassified"))]
    sections.append(("Figures", [f for f in figures if f[1]]))

    settings = _table(["setting", "value"], [[k, f"`{json.dumps(v) if not isinstance(v, str) else v}`"] for k, v in s.items()])
    versions = _table(["library", "version"], [[k, v] for k, v in train.get("versions", {}).items()])
    head_cfg = _table(["head", "settings"], [[r["label"], f"`{json.dumps({k: v for k, v in r['config'].items() if v not in (None, [], ())})}`"]
                                             for r in d["heads"] + [x for rows in d["subset_heads"].values() for x in rows]])
    ft_cfg = _table(["fine-tune", "settings"], [[ft["label"], f"`{json.dumps({k: v for k, v in ft['config'].items() if v not in (None, [], ())})}`"]
                                                for ft in d["finetunes"]])
    rerun = ("To rerun everything from a fresh clone: `make all` (add `FULL=1` for the full-size fine-tune, meant for a GPU). "
             "Each stage reuses what is up to date; `make extract`, `make heads`, `make finetune` and `make report` run one "
             "stage. From Python: `extract(ExtractConfig(...))`, `fit_head(HeadConfig(clf=...))`, `evaluate(path)`, "
             "`finetune(FinetuneConfig(...))`, `build_report()`.")
    blocks = [f"Made {d['created']} by pipeline {d['pipeline']}.", rerun, "Extraction settings (they define the cache):", settings,
              "Heads:", head_cfg]
    if d["finetunes"]:
        blocks += ["Fine-tunes:", ft_cfg]
    blocks += ["Library versions:", versions]
    sections.append(("Settings, versions and how to rerun", blocks))
    return sections


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
code{background:#f4f4f4;padding:0 .2em;font-size:.85em;word-break:break-all}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"""


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in an escaped HTML string."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(title: str, sections: list[tuple[str, list[Any]]]) -> str:
    """One self-contained page: styles inline, figures embedded as data URIs."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            if isinstance(b, str):
                parts.append(f"<p>{_inline(b)}</p>")
            elif isinstance(b, dict):
                head = "".join(f"<th>{_inline(h)}</th>" for h in b["header"])
                body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in b["rows"])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                caption, path = b
                data = base64.b64encode(Path(path).read_bytes()).decode()
                parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, sections: list[tuple[str, list[Any]]]) -> str:
    """The same content as Markdown, with the figures as PNG files beside it."""
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for b in blocks:
            if isinstance(b, str):
                lines += [b, ""]
            elif isinstance(b, dict):
                cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
                lines.append("| " + " | ".join(b["header"]) + " |")
                lines.append("|" + "|".join("---" for _ in b["header"]) + "|")
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b["rows"]]
                lines.append("")
            else:
                caption, path = b
                lines += [f"![{caption}]({Path(path).name})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- building


def report_dir(source: ExtractConfig, config: ReportConfig, caches: dict) -> Path:
    s = caches["train"]["settings"]
    return layout.report_dir(config.out_dir, s.get("dataset", "dataset"), s.get("model"), s.get("weights"))


def _label(r: dict) -> str:
    if r["kind"] == "finetune":
        return r["name"].replace("finetune: ", "fine-tune ") + (f" ({r['subset']}/class)" if r.get("subset") else "")
    return r["clf"] + (f" ({r['subset']['per_class']}/class)" if r.get("subset") else "")


def build_report(source: ExtractConfig | None = None, config: ReportConfig | None = None, *, force: bool = False,
                 log: Any = None) -> ReportResult:
    """Write ``index.html`` (self-contained) and ``index.md`` (with PNGs) for one dataset and backbone.

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
    caches = _caches(source)
    folder = layout.heads_dir(caches["train"]["path"])
    heads = _head_rows(folder)
    if not heads:
        raise ValueError(f"no head in {folder} was evaluated on test; run pipeline fit-head and pipeline evaluate first")
    subset_heads = {}
    for sub in sorted(folder.glob("subset-*")):
        rows = [{**r, "kind": "subset head"} for r in _head_rows(sub)]
        if rows:
            subset_heads[sub.name.removeprefix("subset-")] = rows
    finetunes = _finetunes(Path(config.runs_dir), caches)
    for r in heads + [x for rows in subset_heads.values() for x in rows] + finetunes:
        r["label"] = _label(r)

    out = report_dir(source, config, caches)
    html_path, md_path, data_path = out / "index.html", out / "index.md", out / "report.json"
    inputs = _inputs(caches, heads, subset_heads, finetunes, config)
    if not force and html_path.is_file() and md_path.is_file():
        try:
            old = json.loads(data_path.read_text())
            if old.get("inputs") == json.loads(json.dumps(inputs)):
                return ReportResult(html_path, md_path, "up-to-date", old.get("best"), 0.0)
        except (OSError, ValueError):
            pass
    out.mkdir(parents=True, exist_ok=True)
    classes = caches["train"]["classes"]
    candidates = heads + finetunes
    best = max(candidates, key=lambda r: r["top1"])
    best_head = max(heads, key=lambda r: r["top1"])
    figures: dict[str, Path | None] = {}

    say("report: accuracy against fit time")
    everything = heads + [x for rows in subset_heads.values() for x in rows] + finetunes
    figures["accuracy_vs_time"] = plot_accuracy_vs_time(everything, out / "accuracy_vs_time.png")

    say("report: learning curves")
    linear = next((r for r in heads if r["clf"] == "linear"), None)
    curve = None
    if linear:
        history_path = Path(linear["path"]).with_name("linear-history.csv")
        if history_path.is_file():
            import csv

            with open(history_path, newline="") as f:
                curve = (linear["value"], list(csv.DictReader(f)))
    figures["learning_curves"] = plot_learning_curves(curve, max(finetunes, key=lambda r: r["top1"]) if finetunes else None,
                                                      out / "learning_curves.png")

    say(f"report: confusion matrix of {best['label']}")
    test_metrics = json.loads(Path(best["path"]).with_name(Path(best["path"]).stem + "-test.json").read_text())
    cm = np.asarray(test_metrics["confusion_matrix"])
    figures["confusion"] = plot_confusion(cm, classes, out / "confusion.png", f"{best['label']}: test top-1 {best['top1']:.2%}")

    say(f"report: {config.projection} of {config.projection_points} test features")
    with read_cache(caches["test"]["path"]) as cache:
        y = cache.labels
        per_class = max(1, config.projection_points // max(1, len(np.unique(y))))
        rows = stratified_subset(y, per_class, config.seed)
        X = cache.dataset(caches["test"]["tap"])[rows].astype(np.float32)
    figures["projection"] = plot_projection(X, y[rows], classes, config.projection, config.seed, out / "projection.png")

    say("report: misclassified test images")
    try:
        preds = load_predictions(best["path"])
        figures["misclassified"] = plot_misclassified(preds, classes, config.grid_images, config.seed, out / "misclassified.png")
    except ValueError:
        figures["misclassified"] = None

    data = {
        "caches": {k: {kk: vv for kk, vv in v.items()} for k, v in caches.items()}, "heads": heads, "subset_heads": subset_heads,
        "finetunes": finetunes, "best": {k: best[k] for k in ("label", "kind", "path", "top1", "balanced_accuracy")},
        "best_head": {k: best_head[k] for k in ("label", "path", "top1", "balanced_accuracy")}, "config": asdict(config),
        "figures": {k: str(v) for k, v in figures.items() if v}, "inputs": inputs, "pipeline": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    s = caches["train"]["settings"]
    title = f"pipeline report: {s.get('dataset')} with {s.get('model')} ({s.get('weights')})"
    sections = _sections({**data, "best": best, "best_head": best_head, "figures": {k: v for k, v in figures.items() if v}})
    for path, text in ((md_path, render_markdown(title, sections)), (html_path, render_html(title, sections))):
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
    # Last: it marks the report complete for reuse.
    atomic_write(data_path, lambda f: f.write(json.dumps(data, indent=1, default=str).encode()))
    return ReportResult(html_path, md_path, "written", data["best"], time.perf_counter() - t0, [v for v in figures.values() if v])


# ---------------------------------------------------------------- does it render?


@dataclass
class RenderCheck:
    """What headless Chromium saw: how many images the page has, which failed to decode, and a screenshot."""

    images: int
    broken: list[str]
    height: int
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return self.images > 0 and not self.broken


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


_PROBE = ("<script>addEventListener('load',()=>{const im=[...document.images];document.body.setAttribute('data-render-check',"
          "JSON.stringify({images:im.length,broken:im.filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.alt),"
          "height:document.body.scrollHeight}))})</script>")


def check_render(page: str | os.PathLike, *, chromium: str | None = None, screenshot: str | os.PathLike | None = None,
                 timeout: float = 120) -> RenderCheck:
    """Open ``page`` in headless Chromium and report whether every image decoded.

    A copy of the page with a small probe script is loaded (the report itself carries no script); Chromium dumps
    the DOM after the load event, where the probe has recorded each image's state.

    Raises:
        FileNotFoundError: no Chromium on PATH.
        RuntimeError: Chromium failed or its output carries no probe result.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium); the render check needs it")
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory(prefix="pipeline-render-") as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--hide-scrollbars", f"--user-data-dir={tmp}/profile", "--virtual-time-budget=15000"]
        run = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=timeout)
        found = re.search(r'data-render-check="([^"]*)"', run.stdout)
        if run.returncode != 0 or not found:
            raise RuntimeError(f"chromium could not render {page} (exit {run.returncode}): {run.stderr.strip()[-500:]}")
        seen = json.loads(html.unescape(found.group(1)))
        shot = None
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            height = min(max(int(seen["height"]), 800), 16000)
            subprocess.run([*base, f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()],
                           capture_output=True, text=True, timeout=timeout)
            if not shot.is_file():
                raise RuntimeError(f"chromium wrote no screenshot of {page}")
    return RenderCheck(int(seen["images"]), list(seen["broken"]), int(seen["height"]), shot)
