"""Commands about heads: fit-head, evaluate, compare, report, predict and export."""

from __future__ import annotations

from typing import Any

import click

from ..config import HEAD_NAMES, ON_ERROR, POOLS, PREPROCESSING, PROJECTIONS, HeadConfig, ReportConfig
from ..settings_file import CONFIG_FILE, load_config, settings_from
from .options import cache_options, cache_source, friendly, metrics_text, pop_cache_args, print_metrics, print_warnings
from .group import cli

_H = HeadConfig()  # the library's defaults are the CLI's: help texts read them from here
_R = ReportConfig()


@cli.command("fit-head")
@click.option("--clf", "clfs", multiple=True, type=click.Choice(HEAD_NAMES), help=f"Head family; repeat for several, fitted one after the other.  [default: {_H.clf}]")
@click.option("--tap", help="Tap of the cache to use; several joined by + (side by side, spatial maps averaged); or auto: fit on each tap and on "
              "all of them joined, and keep the best on val.  [default: the first]")
@click.option("--preprocessing", type=click.Choice(PREPROCESSING), help="Feature preprocessing.  [default: per head]")
@click.option("--pca", type=click.IntRange(1), help=f"PCA components where PCA is used.  [default: {_H.pca}]")
@click.option("--pool", type=click.Choice(POOLS), help=f"Pooling of spatial features.  [default: {_H.pool}]")
@click.option("--grid", help="Comma-separated values of the swept hyper-parameter.  [default: per head]")
@click.option("--refine", type=click.IntRange(0), help=f"Halving rounds around the best value of a log grid.  [default: {_H.refine}]")
@click.option("--seed", type=int, help=f"Random state.  [default: {_H.seed}]")
@click.option("--train-cache", type=click.Path(dir_okay=False), help="Train cache file.  [default: located from the extract settings]")
@click.option("--val-cache", type=click.Path(dir_okay=False), help="Val cache file.  [default: located from the extract settings]")
@click.option("--stream/--no-stream", default=None, help="Read train features in blocks instead of loading them (linear, logreg, svm).  [default: when larger than --memory-budget-mb]")
@click.option("--memory-budget-mb", type=click.IntRange(1), help=f"Train features larger than this are streamed.  [default: {_H.memory_budget_mb}]")
@click.option("--epochs", type=click.IntRange(1), help=f"Passes over the data: the linear head's, and any head's when streaming.  [default: {_H.epochs}]")
@click.option("--subset", type=click.IntRange(1), help="Fit on at most this many train images per class (stratified, seeded: the images of finetune --subset).  [default: all]")
@click.option("--exclude", type=click.Path(dir_okay=False), help="An audit's label_issues.csv: leave its most suspect train and val images out of the fit and the sweep.")
@click.option("--top", "exclude_top", type=click.IntRange(0), help="How many of its first rows to leave out (alone: those of the audit beside the caches).  [default: the images the audit flagged]")
@click.option("--output", "-o", help="Where to save the head (no suffix).  [default: <cache folder>/heads/<clf>, heads/subset-N/<clf> with --subset N, heads/exclude-M/<clf> without M suspects]")
@click.option("--refit", is_flag=True, help="Fit even when a head fitted with the same settings on the same caches is saved there.")
@click.option("--evaluate", "then_evaluate", is_flag=True, help="Then evaluate each head on the test split (as pipeline evaluate does; reused when up to date).")
@click.option("--allow-overlap", is_flag=True, help="Fit (and evaluate) even when train, val and test share images; warn instead of refusing.")
@cache_options
@friendly("interrupted; a head is saved only when its fit is complete, so nothing of this fit was kept")
def fit_head_cmd(config_file: str | None, output: str | None, grid: str | None, refit: bool, then_evaluate: bool, clfs: tuple[str, ...],
                 allow_overlap: bool, **options: Any) -> None:
    """Fit a head on cached train features, choosing its hyper-parameter on val.

    A head already fitted with the same settings on the same caches is reused: re-running is free.
    """
    from ..evaluate import evaluate
    from ..fit import fit_head

    if output and len(clfs) > 1:
        raise click.UsageError("--output names one head; give one --clf with it")
    if grid:
        try:
            options["grid"] = tuple(float(v) if any(c in v for c in ".eE") else int(v) for v in grid.split(","))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {grid!r}", param_hint="--grid") from None
    source = cache_source(config_file, pop_cache_args(options))
    config = load_config(config_file)
    for clf in clfs or (None,):
        head = settings_from(HeadConfig, config, "head", {**options, "clf": clf}, source=config_file or CONFIG_FILE)
        result = fit_head(head, source, out=output, refit=refit, log=lambda line: click.echo(line, err=True), allow_overlap=allow_overlap)
        if result.status == "up-to-date":
            click.echo(f"{result.clf}: up to date ({result.param}={result.value:g}, val accuracy {result.val_accuracy:.4f}); "
                       f"nothing to do, --refit to fit again -> {result.path}")
        else:
            chosen = f"tap {result.tap} (best of {len(result.taps)} on val), " if result.taps else ""
            click.echo(f"{result.clf}: {chosen}{result.param}={result.value:g}, val accuracy {result.val_accuracy:.4f}, fit {result.fit_seconds:.1f} s -> {result.path}")
        print_warnings(result.warnings)
        if then_evaluate:
            print_metrics(evaluate(result.path, allow_overlap=allow_overlap))



@cli.command("evaluate")
@click.argument("head", required=False, type=click.Path(dir_okay=False))
@click.option("--clf", type=click.Choice(HEAD_NAMES), help="Evaluate this head of the cache located from the extract settings, instead of HEAD.")
@click.option("--test-cache", type=click.Path(dir_okay=False), help="Test cache file.  [default: test.h5 beside the head's train cache]")
@click.option("--subset", type=click.IntRange(1), help="With --clf: the head fitted on this many train images per class (fit-head --subset).")
@click.option("--force", is_flag=True, help="Evaluate even when this head was already evaluated on this test split.")
@click.option("--allow-overlap", is_flag=True, help="Evaluate even on a test cache that shares images with the head's train or val cache; warn instead of refusing.")
@cache_options
@friendly()
def evaluate_cmd(head: str | None, clf: str | None, test_cache: str | None, subset: int | None, force: bool, allow_overlap: bool,
                 config_file: str | None, **options: Any) -> None:
    """Evaluate a fitted HEAD (its .json) on the test split: metrics JSON and a confusion-matrix PNG.

    HEAD may also be a fine-tuned model.json (pipeline finetune), evaluated on the test split's images.
    """
    from ..evaluate import evaluate
    from ..fit import locate_head

    if (head is None) == (clf is None):
        raise click.UsageError("give either HEAD (a head's .json) or --clf NAME")
    if head is None:
        head = str(locate_head(clf, subset, cache_source(config_file, options)))
    m = evaluate(head, test_cache, force=force, allow_overlap=allow_overlap)
    click.echo(f"{m['clf']}: {metrics_text(m)}")
    click.echo(f"  metrics {m['json']}\n  confusion matrix {m['confusion_png']}")
    if m["status"] == "up-to-date":
        click.echo("  up to date: evaluated before on this test split; --force to evaluate again")
    print_warnings(m.get("warnings", []))


@cli.command("compare")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@cache_options
@friendly()
def compare_cmd(folder: str | None, config_file: str | None, **options: Any) -> None:
    """One table of every head fitted on a cache (FOLDER, or located from the extract settings), best on val first."""
    from ..evaluate import compare

    rows = compare(folder, None if folder else cache_source(config_file, options))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    ci = lambda v: "-" if v is None else f"{v[0]:.4f}-{v[1]:.4f}"  # noqa: E731
    click.echo(f"{'head':<12} {'test top-1':>10} {'95 % CI':>13} {'top-5':>7} {'bal. acc':>8} {'val acc':>8} {'fit s':>7}  chosen")
    several = len({r["tap"] for r in rows}) > 1  # heads of one cache on different taps: say which
    for r in rows:
        on = f" on {r['tap']}" if several else ""
        click.echo(f"{r['clf']:<12} {fmt(r['top1']):>10} {ci(r['top1_ci']):>13} {fmt(r['top5']):>7} {fmt(r['balanced_accuracy']):>8} "
                   f"{fmt(r['val_accuracy']):>8} {r['fit_seconds']:>7.1f}  {r['param']}={r['value']:g} ({r['preprocessing']}){on}")
        for t in r["taps_tried"]:
            click.echo(f"{'':<12} tap {t['tap']}: val acc {t['val_accuracy']:.4f}{'  <- chosen' if t['tap'] == r['tap'] else ''}")


@cli.command("report")
@click.option("--out-dir", help=f"Root of OUT_DIR/<dataset>/<model>-<weights>/.  [default: {_R.out_dir}]")
@click.option("--runs-dir", help=f"Where pipeline finetune wrote its runs; those of this dataset and backbone are included.  [default: {_R.runs_dir}]")
@click.option("--quality-bar", type=click.FloatRange(0, 1, min_open=True), help="A test top-1 the head chosen on val should reach, reported as met or not.")
@click.option("--projection", type=click.Choice(PROJECTIONS), help=f"2-D map of the test features.  [default: {_R.projection}]")
@click.option("--projection-points", type=click.IntRange(10), help=f"Test images in that map.  [default: {_R.projection_points}]")
@click.option("--grid-images", type=click.IntRange(1), help=f"Misclassified test images shown.  [default: {_R.grid_images}]")
@click.option("--audit-images", type=click.IntRange(1), help=f"Images shown for each kind of suspect the audit found.  [default: {_R.audit_images}]")
@click.option("--force", is_flag=True, help="Write it even when nothing it is made from has changed.")
@click.option("--check/--no-check", default=False, help="Open the page in headless Chromium and fail if an image does not render (skipped with a note when Chromium is absent).")
@cache_options
@friendly()
def report_cmd(force: bool, check: bool, config_file: str | None, **options: Any) -> None:
    """Write the report of every head and fine-tune on a dataset and backbone: index.html (self-contained) and index.md."""
    from ..layout import report_files
    from ..report import build_report, check_render, find_chromium

    source = cache_source(config_file, pop_cache_args(options))
    settings = settings_from(ReportConfig, load_config(config_file), "report", options, source=config_file or CONFIG_FILE)
    result = build_report(source, settings, force=force, log=lambda line: click.echo(line, err=True))
    if result.status == "up-to-date":
        click.echo(f"{result.html} is up to date; nothing to do (--force to write it again)")
    else:
        click.echo(f"report written in {result.seconds:.1f} s: {result.html} (and {result.markdown.name}, {len(result.figures)} figures)")
    if result.best:
        ci = result.best.get("top1_ci")
        click.echo(f"  best model: {result.best['label']} (chosen on val), test top-1 {result.best['top1']:.4f}"
                   + (f" (95 % CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""))
    if check:
        if find_chromium() is None:
            click.echo("  render check skipped: no chromium on PATH (Debian: apt-get install chromium)")
            return
        files = report_files(result.html.parent)
        seen = check_render(files.html, screenshot=files.screenshot, record=files.render_check)
        if not seen.ok:
            raise click.ClickException(f"{result.html}: {len(seen.broken)} of {seen.images} images did not render in Chromium: {seen.broken}")
        again = " (checked before; the page has not changed since)" if seen.reused else ""
        click.echo(f"  rendered in headless Chromium{again}: {seen.images} images, all decoded, page {seen.height} px tall -> {seen.screenshot}")


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--head", type=click.Path(dir_okay=False), help="The fitted head's .json, or a fine-tuned model.json.")
@click.option("--model", "onnx_model", type=click.Path(dir_okay=False), help="Instead of --head: a model written by pipeline export, run by ONNX Runtime alone (no torch).")
@click.option("--output", "-o", default="predictions.csv", show_default=True, help="CSV, or JSON when it ends in .json.")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="fail", show_default=True, help="On an unreadable file: fail naming it, or skip it.")
@click.option("--weights", help="The backbone's weights file, when the head's cache came from one.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--top", type=click.IntRange(1), default=3, show_default=True, help="Classes shown per image in the terminal table.")
@click.option("--show", type=click.IntRange(0), default=50, show_default=True, help="Rows shown in the terminal table (all are written to --output).")
@friendly()
def predict_cmd(inputs: tuple[str, ...], head: str | None, onnx_model: str | None, output: str, on_error: str, weights: str | None,
                batch_size: int, device: str, top: int, show: int) -> None:
    """Predict new images (files or folders) end to end: backbone, tap and head, or an exported model.

    Each image gets the most probable class and every class's probability: predict_proba, or for heads without
    it (the SVMs) the softmax of their decision values over a temperature fitted on val, as the exported model
    computes them. A table of the first
    rows is printed; every row is written to --output.
    """
    from ..predict import predict, write_predictions

    if (head is None) == (onnx_model is None):
        raise click.UsageError("give either --head (a head's .json or a fine-tuned model.json) or --model (an exported .onnx)")
    rows, classes = predict(onnx_model or head, inputs, on_error=on_error, weights=weights, batch_size=batch_size, device=device)
    path = write_predictions(rows, classes, output)
    _print_predictions(rows, top, show)
    failed = sum("error" in r for r in rows)
    click.echo(f"{len(rows) - failed} images predicted, {failed} skipped -> {path}")


def _print_predictions(rows: list[dict], top: int, show: int) -> None:
    """A readable table: file, label, its score, and the next best classes; skipped files with their reason."""
    if not rows or not show:
        return
    width = min(60, max(len(r["path"]) for r in rows[:show]))
    kind = "probability" if any("probabilities" in r for r in rows) else "score"
    click.echo(f"{'file':<{width}}  {'label':<16} {kind:>11}  next")
    for r in rows[:show]:
        name = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if "error" in r:
            click.echo(f"{name:<{width}}  skipped: {r['error']}")
            continue
        values = r.get("probabilities") or r.get("scores") or {}
        ranked = sorted(values.items(), key=lambda kv: -kv[1])[1:top]
        rest = ", ".join(f"{c} {v:.3f}" for c, v in ranked)
        click.echo(f"{name:<{width}}  {r['label']:<16} {r['score']:>11.3f}  {rest}")
    if len(rows) > show:
        click.echo(f"... {len(rows) - show} more rows in the output file")


@cli.command("export")
@click.argument("head", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="The .onnx file to write.  [default: beside HEAD, with the suffix .onnx]")
@click.option("--weights", help="The backbone's weights file, when the head's cache came from one.")
@friendly("interrupted; nothing was written")
def export_cmd(head: str, output: str | None, weights: str | None) -> None:
    """Export HEAD (a head's .json, or a fine-tuned model.json) with its backbone as one ONNX graph.

    The graph takes uint8 images, already resized and centre-cropped as its metadata says, and gives the
    probabilities and label pipeline predict gives; ONNX Runtime alone runs it (pipeline predict --model).
    """
    from ..export import export

    path = export(head, output, weights=weights)
    click.echo(f"{head} -> {path} ({path.stat().st_size / 2**20:.1f} MiB); run it with: pipeline predict --model {path} IMAGES...")
