"""The report's content as sections, written out as one self-contained HTML page and its Markdown twin."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from .gather import chosen_on_val

__all__ = ["sections", "render_html", "render_markdown"]

# A section is (title, blocks); a block is a paragraph (str), a table (dict) or a figure ((caption, path)).
Sections = list[tuple[str, list[Any]]]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _ci(row: dict) -> str:
    """A row's 95 % interval of test top-1, in percent."""
    ci = row.get("top1_ci")
    return "–" if ci is None else f"{100 * ci[0]:.2f}-{100 * ci[1]:.2f} %"


def _secs(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _table(header: list[str], rows: list[list[str]]) -> dict:
    return {"header": header, "rows": rows}


def _settings(config: dict) -> str:
    return f"`{json.dumps({k: v for k, v in config.items() if v not in (None, [], ())})}`"


def _summary(d: dict) -> list[str]:
    train = d["caches"]["train"]
    s = train["settings"]
    best, best_head = d["best"], d["best_head"]
    counts = ", ".join(f"{c['rows']:,} {split}" for split, c in d["caches"].items())
    taps = train.get("taps") or [train["tap"]]
    tapped = (f"tap `{taps[0]}` ({' x '.join(map(str, train['shape']))} features)" if len(taps) == 1 else
              "taps " + ", ".join(f"`{t}`" for t in taps) + " (each head says which it uses)")
    summary = [
        f"Dataset **{s.get('dataset')}** ({counts} images, "
        f"{len(train['classes'])} classes); backbone **{s.get('model')}** with weights **{s.get('weights')}**, {tapped}"
        f"{', each image averaged with its mirror' if s.get('flip') else ''}, images at {train.get('image_size')} px.",
    ]
    if best:
        on = f" on tap `{best['tap']}`" if len(taps) > 1 and best.get("tap") else ""
        summary.append(f"Best model, chosen on val accuracy ({_pct(best['val_accuracy'])}): **{best['label']}**{on}, test top-1 "
                       f"**{_pct(best['top1'])}** (95 % CI {_ci(best)}), balanced accuracy {_pct(best['balanced_accuracy'])}. Every choice in this report "
                       "is made on val; test is only reported.")
    if best_head and d["config"]["quality_bar"] is not None:
        bar = d["config"]["quality_bar"]
        met = "met" if best_head["top1"] >= bar else "**not met**"
        summary.append(f"Quality bar: the cached head chosen on val ({best_head['label']}) reaches {_pct(best_head['top1'])} "
                       f"(95 % CI {_ci(best_head)}) against a bar of "
                       f"{_pct(bar)}: {met}.")
    return summary


def _taps_tried(heads: list[dict]) -> list[Any]:
    """The taps val chose among (fit-head --tap auto), with each one's val accuracy, for the heads that had a choice."""
    rows = [[r["label"], f"`{t['tap']}`", _pct(t["val_accuracy"]), f"{r['param']}={t['value']:g}", "yes" if t["tap"] == r.get("tap") else ""]
            for r in heads for t in r.get("taps_tried") or []]
    if not rows:
        return []
    return ["Taps compared on val (`--tap auto`): each tap of the cache and all of them joined, each with its own sweep; the best "
            "on val is kept, and only it is evaluated on test.", _table(["head", "tap", "val acc.", "chosen value", "kept"], rows)]


def _finetuning(d: dict) -> list[Any]:
    """Each fine-tune against the heads fitted on the cached features of the same images."""
    blocks: list[Any] = []
    for ft in d["finetunes"]:
        n = ft.get("subset")
        same = d["subset_heads"].get(str(n), []) if n else d["heads"]
        best_same = chosen_on_val(same)
        what = f"on {n} train images per class" if n else "on the whole train split"
        rows = [[ft["label"], _pct(ft["top1"]), _ci(ft), _pct(ft["balanced_accuracy"]), _pct(ft["val_accuracy"]), _secs(ft["fit_seconds"]),
                 f"best epoch {ft['best_epoch']} of {ft['epochs']}, freeze {ft['freeze']}" + (", from a linear probe (LP-FT)" if ft.get("init_head") else "")]]
        if best_same:
            rows.append([f"best cached head, same images ({best_same['label']})", _pct(best_same["top1"]), _ci(best_same),
                         _pct(best_same["balanced_accuracy"]),
                         _pct(best_same["val_accuracy"]), _secs(best_same["fit_seconds"]), f"{best_same['param']}={best_same['value']:g}, chosen on val"])
        for r in same:
            if r is not best_same:
                rows.append([f"cached head, same images ({r['label']})", _pct(r["top1"]), _ci(r), _pct(r["balanced_accuracy"]),
                             _pct(r["val_accuracy"]), _secs(r["fit_seconds"]), f"{r['param']}={r['value']:g}"])
        blocks += [f"Fine-tuning {what}, against heads fitted on the cached features of the same images (drawn with the same seed), "
                   f"all evaluated on the same {ft.get('n_test') or 0:,} test images. Fine-tune time is the training on "
                   f"{ft.get('runtime')}; a head's is its fit on the cache.",
                   _table(["model", "test top-1", "95 % CI", "balanced acc.", "val acc.", "time", "notes"], rows)]
    return blocks


def _noise(d: dict) -> list[Any]:
    """Which models' test accuracies differ from that of the head chosen on val by more than the noise."""
    chosen, rows = d["best_head"], []
    for r in d["noise"]:
        if "p" not in r:
            rows.append([r["label"], _pct(r["top1"]), _ci(r), "–", "–", "–", r["why"]])
            continue
        verdict = "within the noise" if r["within_noise"] else f"**{'better' if r['only_other'] > r['only_chosen'] else 'worse'}**"
        rows.append([r["label"], _pct(r["top1"]), _ci(r), f"{r['only_other']:,}", f"{r['only_chosen']:,}", f"{r['p']:.3g}", verdict])
    paired = [r for r in d["noise"] if "p" in r]
    n = f" on the same {paired[0]['n']:,} test images" if paired else ""
    return [f"Against the head chosen on val ({chosen['label']}, test top-1 {_pct(chosen['top1'])}, 95 % CI {_ci(chosen)}): McNemar's "
            f"exact test on the images one model got right and the other wrong{n}. A difference with p >= 0.05 is within the noise "
            "of a test split this size.",
            _table(["model", "test top-1", "95 % CI", "right where the chosen head is wrong", "wrong where it is right", "p", "difference"], rows)]


def _audit(a: dict, figures: dict, captions: dict) -> list[Any]:
    """What ``pipeline audit`` found, and the accuracy with and without acting on it."""
    dup, head = a["duplicates"], a["head"]
    pct = lambda n, total: f"{100 * n / total:.2f} %" if total else "–"  # noqa: E731
    blocks: list[Any] = [
        f"`pipeline audit` ranked the {a['labelled_images']:,} train and val images by cleanlab's label quality, from out-of-fold "
        f"probabilities of the {head['clf']} head ({head['param']}={head['value']:g}, {a['config']['folds']}-fold). It flags "
        f"**{a['label_issues']:,}** labels ({pct(a['label_issues'], a['labelled_images'])}) as likely wrong; the estimated label-noise "
        f"rate is {_pct(a['noise_rate'])}.",
        f"Duplicates: **{dup['exact']:,}** exact pairs (same file content) and **{dup['near']:,}** near pairs (cosine similarity of "
        f"the features at least {a['threshold']:g}), {dup['cross_split']:,} of them across splits: **{a['leaked_test_images']:,}** test "
        f"images also appear in train or val. Outliers: {a['outliers']:,} images beyond the far-out fence of the kNN distance.",
    ]
    if a.get("leaks"):
        blocks += ["Test accuracy with and without the leaked test images (from each head's saved predictions):",
                   _table(["head", "test top-1, every image", "without the leaked ones", "images kept"],
                          [[r["label"], _pct(r["top1"]), _pct(r["top1_kept"]), f"{r['kept']:,} of {r['n']:,}"] for r in a["leaks"]])]
    if a.get("cleaned"):
        blocks += ["Heads fitted without the audit's most suspect train and val images (`fit-head --exclude label_issues.csv --top N`), "
                   "against the same head fitted on every image:",
                   _table(["head", "images left out", "test top-1", "on every image", "val acc.", "on every image"],
                          [[r["label"], f"{r['excluded']:,}", _pct(r["top1"]), _pct(r["full_top1"]), _pct(r["val_accuracy"]),
                            _pct(r["full_val_accuracy"])] for r in a["cleaned"]])]
    if figures.get("audit"):
        blocks.append((captions["audit"], figures["audit"]))
    return blocks


def _rerun(d: dict) -> list[Any]:
    """How to make this report again: the commands that made what it shows, as they were run, then the report's own."""
    made = [*d.get("commands", []), *([d["command"]] if d.get("command") else [])]
    python = ("From Python, each command is one call: `extract_splits(ExtractConfig(...))`, `fit_head(HeadConfig(clf=...))`, "
              "`evaluate(path)`, `finetune(FinetuneConfig(...))`, `build_report()`. Every stage reuses what is up to date.")
    if not made:
        return [f"Nothing it shows recorded a command line (it was made from Python). {python}"]
    default = d["caches"]["train"].get("settings", {}).get("dataset") == "fashion-mnist"
    return ["The commands that made what this report shows, in the order they ran" + (" (`make all` runs them all)" if default else "")
            + ":", _table(["command"], [[f"`{c}`"] for c in made]), python]


def _data(d: dict) -> list[Any]:
    """What stage one left out or decoded specially: skipped and ignored files, 16-bit and transparent images, by split."""
    out: list[Any] = []
    caches = d["caches"]
    skipped = [[split, f"`{p}`", why] for split, c in caches.items() for p, why in c.get("skipped_files", [])]
    if skipped:
        total = sum(c.get("skipped", 0) for c in caches.values())
        out += [f"{total} unreadable image(s) were skipped (`--on-error skip`) and have no features"
                + (f"; the first {len(skipped)} are listed, `pipeline info CACHE` lists them all" if total > len(skipped) else "") + ":",
                _table(["split", "file", "why"], skipped)]
    ignored = {split: c["ignored"] for split, c in caches.items() if c.get("ignored")}
    if ignored:
        out.append("Files that are not images (hidden or system files, other extensions) were ignored, as torchvision's "
                   "ImageFolder ignores them: " + ", ".join(f"{n} in {split}" for split, n in ignored.items()) + ".")
    kinds = {}
    for split, c in caches.items():
        for kind, n in (c.get("decoding") or {}).items():
            kinds.setdefault(kind, []).append(f"{n} in {split}")
    notes = {"16-bit": "16-bit images were scaled to 8 bits (0-65535 onto 0-255), not clipped",
             "float": "floating-point images were mapped to 8 bits (0-1, or 0-255, onto 0-255)",
             "transparent": "images with transparency were composited on white"}
    for kind, where in kinds.items():
        out.append(f"Decoding: {notes.get(kind, kind)} ({', '.join(where)}); a plain `Image.convert(\"RGB\")` differs, so new "
                   "images must be decoded the same way (README, \"Images\").")
    return out


def sections(d: dict) -> Sections:
    """The report's content, as (title, blocks).

    Args:
        d: what ``build_report`` gathered: ``caches``, ``heads``, ``subset_heads``, ``finetunes``, ``best``, ``best_head``,
            ``config``, ``figures`` (name -> PNG), ``captions`` (name -> caption), ``created`` and ``pipeline``.
    """
    train = d["caches"]["train"]
    s = train["settings"]
    out: Sections = [("Summary", _summary(d))]
    if d.get("warnings"):
        out.append(("Warnings: where the numbers cannot mean much", [
            "What fit-head and evaluate warned of, for the models below:",
            _table(["warning", "models"], [[w["warning"], ", ".join(w["models"])] for w in d["warnings"]])]))

    stage1 = _table(["split", "images", "features", "dtype", "cache size", "throughput", "engine"], [
        [split, f"{c['rows']:,}", " x ".join(map(str, c["shape"])), c["dtype"], f"{c['bytes'] / 2**20:.1f} MiB",
         f"{c['images_per_s']:.0f} img/s" if c.get("images_per_s") else "–", f"{c.get('engine')} ({c.get('runtime')})"]
        for split, c in d["caches"].items()])
    out.append(("Stage one: feature extraction", [
        "The frozen backbone runs once per image; every head below trains on these cached arrays. Throughput is that of the "
        "run that completed the cache.", stage1, *_data(d)]))

    several = len(train.get("taps") or [train["tap"]]) > 1  # a cache of several taps: a column says which each head uses
    heads = _table(["head", "test top-1", "95 % CI", "balanced acc.", "top-5", "val acc.", "fit time", "chosen", "preprocessing", *(["tap"] * several)], [
        [r["label"], _pct(r["top1"]), _ci(r), _pct(r["balanced_accuracy"]), _pct(r.get("top5")), _pct(r["val_accuracy"]), _secs(r["fit_seconds"]),
         f"{r['param']}={r['value']:g}", r["preprocessing"], *([f"`{r.get('tap')}`"] * several)] for r in d["heads"]])
    figures, captions = d["figures"], d["captions"]
    out.append(("Stage two: heads on the cached features", [
        f"Each head family sweeps its hyper-parameter on the val split ({d['caches'].get('val', {}).get('rows', 0):,} images) and is "
        "evaluated once on test. Heads are listed by val accuracy. Fit time includes the whole sweep.", heads, *_taps_tried(d["heads"]),
        (captions["accuracy_vs_time"], figures.get("accuracy_vs_time"))]))
    if d.get("noise"):
        out.append(("Differences from the chosen head: real or noise", _noise(d)))

    if d["finetunes"]:
        out.append(("Fine-tuning", _finetuning(d)))

    if d.get("audit"):
        out.append(("Audit: labels, duplicates and outliers", _audit(d["audit"], figures, captions)))

    names = ("learning_curves", "confusion", "projection", "misclassified")
    out.append(("Figures", [(captions[name], figures[name]) for name in names if figures.get(name)]))

    settings = _table(["setting", "value"], [[k, f"`{json.dumps(v) if not isinstance(v, str) else v}`"] for k, v in s.items()])
    versions = _table(["library", "version"], [[k, v] for k, v in train.get("versions", {}).items()])
    head_cfg = _table(["head", "settings"], [[r["label"], _settings(r["config"])]
                                             for r in d["heads"] + [x for rows in d["subset_heads"].values() for x in rows]])
    ft_cfg = _table(["fine-tune", "settings"], [[ft["label"], _settings(ft["config"])] for ft in d["finetunes"]])
    blocks = [f"Made {d['created']} by pipeline {d['pipeline']}.", *_rerun(d), "Extraction settings (they define the cache):", settings,
              "Heads:", head_cfg]
    if d["finetunes"]:
        blocks += ["Fine-tunes:", ft_cfg]
    blocks += ["Library versions:", versions]
    out.append(("Settings, versions and how to rerun", blocks))
    return out


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


def render_html(title: str, content: Sections) -> str:
    """One self-contained page: styles inline, figures embedded as data URIs."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>"]
    for heading, blocks in content:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            if isinstance(b, str):
                parts.append(f"<p>{_inline(b)}</p>")
            elif isinstance(b, dict):
                head = "".join(f"<th>{_inline(h)}</th>" for h in b["header"])
                body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in b["rows"])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[1]:
                caption, path = b
                data = base64.b64encode(Path(path).read_bytes()).decode()
                parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, content: Sections) -> str:
    """The same content as Markdown, with the figures as PNG files beside it."""
    lines = [f"# {title}", ""]
    for heading, blocks in content:
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
            elif b[1]:
                caption, path = b
                lines += [f"![{caption}]({Path(path).name})", ""]
    return "\n".join(lines)
