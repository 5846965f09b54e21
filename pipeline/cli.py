"""The ``pipeline`` command: a thin layer that parses options, calls one library function and prints the result."""

from __future__ import annotations

from typing import Any

import click

from .cli_options import (
    pop_cache_args, friendly, cli_rank, cache_source, backbone_options, cache_options, config_option, dataset_options, runtime_options,
)
from .config import (
    AUGMENTS, COMPRESSIONS, DTYPES, ENGINES, HEAD_INITS, HEAD_NAMES, ON_ERROR, OPTIMIZERS, POOLS, PREPROCESSING, PROJECTIONS,
    SCHEDULES, SPLITS, AuditConfig, ExtractConfig, FinetuneConfig, HeadConfig, ReportConfig,
)
from .recipes import RECIPES
from .settings_file import CONFIG_FILE, load_config, settings_from

# Heavy libraries (torch, scikit-learn, h5py) are imported inside each command, so `pipeline --help` answers at once.
__all__ = ["cli"]

_D = ExtractConfig()  # the library's defaults are the CLI's: help texts read them from here
_H = HeadConfig()
_F = FinetuneConfig()
_R = ReportConfig()
_A = AuditConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Transfer learning on image folders: extract backbone features once, then fit heads on them, or fine-tune."""


@cli.command("extract")
@click.option("--split", "splits", multiple=True, type=click.Choice(SPLITS), help=f"Split(s) to extract; repeat for several.  [default: {_D.split}]")
@dataset_options(_D)
@backbone_options(_D.model, _D.weights)
@click.option("--layer", "layers", multiple=True, help="Module to tap, NAME or NAME:input|output; repeat for several taps in one pass. Default: avgpool output, or the classifier's input.")
@click.option("--capture", type=click.Choice(["input", "output"]), help=f"Capture the input or output of --layer modules given without one.  [default: {_D.capture}]")
@click.option("--dtype", type=click.Choice(DTYPES), help=f"Storage dtype of the features.  [default: {_D.dtype}]")
@click.option("--compression", type=click.Choice(COMPRESSIONS), help=f"HDF5 compression.  [default: {_D.compression}]")
@click.option("--batch-size", type=click.IntRange(1), help=f"Images per forward pass.  [default: {_D.batch_size}]")
@runtime_options("extract")
@click.option("--engine", type=click.Choice(ENGINES), help=f"auto: ONNX Runtime for fp32 on the CPU when installed and equal to eager, else eager torch.  [default: {_D.engine}]")
@click.option("--on-error", type=click.Choice(ON_ERROR), help=f"On an unreadable file: fail naming it, or skip it and record it.  [default: {_D.on_error}]")
@click.option("--cache-dir", help=f"Root of the cache convention CACHE_DIR/<dataset>/<model>-<weights>/<taps>/<split>.h5.  [default: {_D.cache_dir}]")
@click.option("--output", "-o", help="Write to this file instead of the convention (one split only).")
@config_option
@click.option("--force", is_flag=True, help="Overwrite a cache made with other settings (an up-to-date cache is kept).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@friendly("interrupted; finished batches are kept: re-run the same command to resume")
def extract_cmd(splits: tuple[str, ...], config_file: str | None, force: bool, progress: bool, **options: Any) -> None:
    """Run a frozen backbone once over a split and cache the tapped features in HDF5.

    An interrupted run resumes where it stopped; a finished cache with the same settings is left alone.
    Under `torchrun --nproc-per-node N -m pipeline extract ...` the ranks share the work (NCCL on GPUs, gloo
    on CPUs) and rank 0 writes the one cache.
    """
    from .extract import extract

    config = load_config(config_file)
    chosen = splits or (config.get("extract", {}).get("split"),)
    if (options.get("output") or config.get("extract", {}).get("output")) and len(chosen) > 1:
        raise click.BadParameter("--output takes one --split", param_hint="--output")
    for split in chosen:
        settings = settings_from(ExtractConfig, config, "extract", {**options, "split": split}, source=config_file or CONFIG_FILE)
        result = extract(settings, force=force, progress=progress)
        if cli_rank():  # under torchrun, rank 0 speaks for all ranks
            continue
        if result.status == "up-to-date":
            click.echo(f"{settings.split}: {result.path} is up to date ({result.n_images} images); nothing to do")
        else:
            resumed = f", resumed: {result.n_computed} computed" if result.status == "resumed" else ""
            click.echo(
                f"{settings.split}: {result.path}  {result.n_images} images, {result.n_skipped} skipped, "
                f"{result.images_per_s:.1f} img/s ({result.engine}{resumed})"
            )
        for path, why in result.skipped[:20]:
            click.echo(f"  skipped {path}: {why}")
        if len(result.skipped) > 20:
            click.echo(f"  ... {len(result.skipped) - 20} more skipped files are listed in the cache (pipeline info)")


@cli.command("layers")
@click.argument("model")
@click.option("--image-size", type=click.IntRange(8), default=224, show_default=True, help="Input size for the shapes.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not only the top two levels.")
@friendly()
def layers_cmd(model: str, image_size: int, show_all: bool) -> None:
    """List the tap points of MODEL with their input and output shapes for one image."""
    from .backbones import load_backbone
    from .taps import default_tap, list_taps

    net = load_backbone(model, "none").model
    tap = default_tap(net)
    click.echo(f"{'module':<28} {'type':<22} {'input':<18} output")
    for info in list_taps(net, image_size):
        if not show_all and info.name.count(".") > 1:
            continue
        mark = f"   <- default tap ({tap.capture})" if info.name == tap.layer else ""
        shape = lambda s: "x".join(map(str, s)) if s else "-"  # noqa: E731
        click.echo(f"{info.name:<28} {info.kind:<22} {shape(info.input_shape):<18} {shape(info.output_shape)}{mark}")


@cli.command("info")
@click.argument("file", type=click.Path())
@friendly()
def info_cmd(file: str) -> None:
    """Print what a feature cache holds and how it was made."""
    from .cache import describe

    click.echo(describe(file))


@cli.command("models")
def models_cmd() -> None:
    """List torchvision's classification models."""
    from .backbones import list_backbones

    click.echo("\n".join(list_backbones()))


@cli.command("assets")
@click.option("--weights/--no-weights", default=True, help="Fetch MobileNetV2 ImageNet weights into the torch hub cache.")
@click.option("--fashion-mnist", "fmnist", type=click.Path(file_okay=False), default=None, help="Materialise Fashion-MNIST as an image folder here, e.g. data/fashion-mnist.")
@click.option("--source", type=click.Path(file_okay=False, exists=True), default=None, help="Folder with the four Fashion-MNIST IDX .gz files.  [default: Debian's, else download]")
@friendly()
def assets_cmd(weights: bool, fmnist: str | None, source: str | None) -> None:
    """Obtain the embedded default: MobileNetV2 ImageNet weights and Fashion-MNIST, offline where possible."""
    from pathlib import Path

    from . import assets

    if weights:
        path = assets.fetch_mobilenet_v2_weights(Path(".assets"))
        click.echo(f"weights: {path} (sha256 ok)")
    if fmnist:
        root = assets.materialize_fashion_mnist(Path(fmnist), Path(source) if source else None)
        counts = {s: sum(1 for _ in (root / s).rglob("*.png")) for s in ("train", "test")}
        click.echo(f"fashion-mnist: {root} ({counts['train']} train, {counts['test']} test images)")


@cli.command("fit-head")
@click.option("--clf", "clfs", multiple=True, type=click.Choice(HEAD_NAMES), help=f"Head family; repeat for several, fitted one after the other.  [default: {_H.clf}]")
@click.option("--tap", help="Tap of the cache to use.  [default: the first]")
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
@cache_options
@friendly("interrupted; a head is saved only when its fit is complete, so nothing of this fit was kept")
def fit_head_cmd(config_file: str | None, output: str | None, grid: str | None, refit: bool, then_evaluate: bool, clfs: tuple[str, ...],
                 **options: Any) -> None:
    """Fit a head on cached train features, choosing its hyper-parameter on val.

    A head already fitted with the same settings on the same caches is reused: re-running is free.
    """
    from .evaluate import evaluate
    from .fit import fit_head

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
        result = fit_head(head, source, out=output, refit=refit, log=lambda line: click.echo(line, err=True))
        if result.status == "up-to-date":
            click.echo(f"{result.clf}: up to date ({result.param}={result.value:g}, val accuracy {result.val_accuracy:.4f}); "
                       f"nothing to do, --refit to fit again -> {result.path}")
        else:
            click.echo(f"{result.clf}: {result.param}={result.value:g}, val accuracy {result.val_accuracy:.4f}, fit {result.fit_seconds:.1f} s -> {result.path}")
        if then_evaluate:
            _print_metrics(evaluate(result.path))


def _print_metrics(m: dict) -> None:
    top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
    done = " (up to date)" if m["status"] == "up-to-date" else ""
    click.echo(f"  test top-1 {m['top1']:.4f}{top5}, balanced accuracy {m['balanced_accuracy']:.4f} on {m['n']} images{done} -> {m['json']}")


@cli.command("audit")
@click.option("--clf", type=click.Choice(HEAD_NAMES), help=f"Head whose out-of-fold probabilities rank the label issues.  [default: {_A.clf}]")
@click.option("--value", type=click.FloatRange(0, min_open=True), help="Its hyper-parameter.  [default: the value fit-head chose on val]")
@click.option("--folds", type=click.IntRange(2), help=f"K of the K-fold cross-validation over train and val.  [default: {_A.folds}]")
@click.option("--tap", help="Tap of the cache to use.  [default: the first]")
@click.option("--preprocessing", type=click.Choice(PREPROCESSING), help="Feature preprocessing of the head.  [default: per head]")
@click.option("--pca", type=click.IntRange(1), help=f"PCA components where the head uses PCA.  [default: {_A.pca}]")
@click.option("--pool", type=click.Choice(POOLS), help=f"Pooling of spatial features.  [default: {_A.pool}]")
@click.option("--seed", type=int, help=f"Seed of the folds, PCA and samples.  [default: {_A.seed}]")
@click.option("--threshold", type=click.FloatRange(-1, 1), help=f"Cosine similarity of near-duplicates.  [default: {_A.threshold}]")
@click.option("--dims", type=click.IntRange(0), help=f"PCA components the duplicate search compares; 0 for all.  [default: {_A.dims}]")
@click.option("--neighbours", type=click.IntRange(1), help=f"k of the kNN outlier score.  [default: {_A.neighbours}]")
@click.option("--block-rows", type=click.IntRange(1), help=f"Rows compared at once by the duplicate search.  [default: {_A.block_rows}]")
@click.option("--train-cache", type=click.Path(dir_okay=False), help="Train cache file.  [default: located from the extract settings]")
@click.option("--val-cache", type=click.Path(dir_okay=False), help="Val cache file.  [default: located, when it exists]")
@click.option("--test-cache", type=click.Path(dir_okay=False), help="Test cache file.  [default: located, when it exists]")
@click.option("--output", "-o", help="The audit folder.  [default: <cache folder>/audit]")
@click.option("--force", is_flag=True, help="Audit even when an audit of the same caches with the same settings is there.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@cache_options
@friendly("interrupted; an audit is complete only when its summary.json is written, so nothing of this one was kept")
def audit_cmd(config_file: str | None, force: bool, progress: bool, **options: Any) -> None:
    """Find wrong labels, duplicates (and test images leaked into train or val) and outliers, on the cached features.

    Writes label_issues.csv, duplicates.csv, outliers.csv and summary.json; `fit-head --exclude .../label_issues.csv
    --top N` then fits without the N most suspect images. Re-running with the same settings is free.
    """
    from .audit import audit

    source = cache_source(config_file, pop_cache_args(options))
    settings = settings_from(AuditConfig, load_config(config_file), "audit", options, source=config_file or CONFIG_FILE)
    result = audit(settings, source, force=force, progress=progress, log=lambda line: click.echo(line, err=True))
    s = result.summary
    d = s["duplicates"]
    done = "up to date; nothing to do (--force to audit again)" if result.status == "up-to-date" else f"done in {s['seconds']['total']:.1f} s"
    click.echo(f"audit {done} -> {result.dir}")
    click.echo(f"  label issues: {s['label_issues']:,} of {s['labelled_images']:,} train and val images (estimated noise rate "
               f"{s['noise_rate']:.2%}) -> {result.files.label_issues.name}")
    click.echo(f"  duplicates: {d['exact']:,} exact and {d['near']:,} near pairs (similarity >= {s['threshold']:g}), {d['cross_split']:,} across "
               f"splits; {s['leaked_test_images']:,} test images also in train or val -> {result.files.duplicates.name}")
    click.echo(f"  outliers: {s['outliers']:,} beyond the far-out fence ({s['outlier_fence']:.3f}) -> {result.files.outliers.name}")


@cli.command("evaluate")
@click.argument("head", required=False, type=click.Path(dir_okay=False))
@click.option("--clf", type=click.Choice(HEAD_NAMES), help="Evaluate this head of the cache located from the extract settings, instead of HEAD.")
@click.option("--test-cache", type=click.Path(dir_okay=False), help="Test cache file.  [default: test.h5 beside the head's train cache]")
@click.option("--subset", type=click.IntRange(1), help="With --clf: the head fitted on this many train images per class (fit-head --subset).")
@click.option("--force", is_flag=True, help="Evaluate even when this head was already evaluated on this test split.")
@cache_options
@friendly()
def evaluate_cmd(head: str | None, clf: str | None, test_cache: str | None, subset: int | None, force: bool, config_file: str | None, **options: Any) -> None:
    """Evaluate a fitted HEAD (its .json) on the test split: metrics JSON and a confusion-matrix PNG.

    HEAD may also be a fine-tuned model.json (pipeline finetune), evaluated on the test split's images.
    """
    from .evaluate import evaluate
    from .fit import locate_head

    if (head is None) == (clf is None):
        raise click.UsageError("give either HEAD (a head's .json) or --clf NAME")
    if head is None:
        head = str(locate_head(clf, subset, cache_source(config_file, options)))
    m = evaluate(head, test_cache, force=force)
    top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
    click.echo(f"{m['clf']}: test top-1 {m['top1']:.4f}{top5}, balanced accuracy {m['balanced_accuracy']:.4f} on {m['n']} images")
    click.echo(f"  metrics {m['json']}\n  confusion matrix {m['confusion_png']}")
    if m["status"] == "up-to-date":
        click.echo("  up to date: evaluated before on this test split; --force to evaluate again")


@cli.command("compare")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@cache_options
@friendly()
def compare_cmd(folder: str | None, config_file: str | None, **options: Any) -> None:
    """One table of every head fitted on a cache (FOLDER, or located from the extract settings), best on val first."""
    from .evaluate import compare

    rows = compare(folder, None if folder else cache_source(config_file, options))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"{'head':<12} {'test top-1':>10} {'top-5':>7} {'bal. acc':>8} {'val acc':>8} {'fit s':>7}  chosen")
    for r in rows:
        click.echo(f"{r['clf']:<12} {fmt(r['top1']):>10} {fmt(r['top5']):>7} {fmt(r['balanced_accuracy']):>8} {fmt(r['val_accuracy']):>8} "
                   f"{r['fit_seconds']:>7.1f}  {r['param']}={r['value']:g} ({r['preprocessing']})")


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
    from .report import build_report, check_render, find_chromium

    source = cache_source(config_file, pop_cache_args(options))
    settings = settings_from(ReportConfig, load_config(config_file), "report", options, source=config_file or CONFIG_FILE)
    result = build_report(source, settings, force=force, log=lambda line: click.echo(line, err=True))
    if result.status == "up-to-date":
        click.echo(f"{result.html} is up to date; nothing to do (--force to write it again)")
    else:
        click.echo(f"report written in {result.seconds:.1f} s: {result.html} (and {result.markdown.name}, {len(result.figures)} figures)")
    if result.best:
        click.echo(f"  best model: {result.best['label']} (chosen on val), test top-1 {result.best['top1']:.4f}")
    if check:
        if find_chromium() is None:
            click.echo("  render check skipped: no chromium on PATH (Debian: apt-get install chromium)")
            return
        seen = check_render(result.html, screenshot=result.html.with_name("screenshot.png"))
        if not seen.ok:
            raise click.ClickException(f"{result.html}: {len(seen.broken)} of {seen.images} images did not render in Chromium: {seen.broken}")
        click.echo(f"  rendered in headless Chromium: {seen.images} images, all decoded, page {seen.height} px tall -> {seen.screenshot}")


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--head", required=True, type=click.Path(dir_okay=False), help="The fitted head's .json, or a fine-tuned model.json.")
@click.option("--output", "-o", default="predictions.csv", show_default=True, help="CSV, or JSON when it ends in .json.")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="fail", show_default=True, help="On an unreadable file: fail naming it, or skip it.")
@click.option("--weights", help="The backbone's weights file, when the head's cache came from one.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@friendly()
def predict_cmd(inputs: tuple[str, ...], head: str, output: str, on_error: str, weights: str | None, batch_size: int, device: str) -> None:
    """Predict new images (files or folders) end to end: backbone, tap and head."""
    from .predict import predict, write_predictions

    rows, classes = predict(head, inputs, on_error=on_error, weights=weights, batch_size=batch_size, device=device)
    path = write_predictions(rows, classes, output)
    failed = sum("error" in r for r in rows)
    click.echo(f"{len(rows) - failed} images predicted, {failed} skipped -> {path}")


@cli.command("finetune", epilog="\b\nRecipes:\n" + "\n".join(f"  {r.name:<18} {r.source}" for r in RECIPES.values()))
@click.option("--recipe", type=click.Choice(list(RECIPES)), help="A source tutorial's model, freezing, optimizer, learning rates, augmentation and epochs (listed below); explicit options override them.")
@dataset_options(_F)
@backbone_options("the recipe's, else mobilenet_v2", "the recipe's, else DEFAULT")
@click.option("--subset", type=click.IntRange(1), help="Train on at most this many images per class (stratified, seeded).  [default: all]")
@click.option("--eval-subset", type=click.IntRange(1), help="Evaluate val and targets on at most this many images per class.  [default: all]")
@click.option("--target", "targets", multiple=True, help="Also evaluate every epoch: test, or DIR[:SPLIT], a dataset folder with the same classes (a target domain); repeat for several.")
@click.option("--freeze", help=f"none, backbone (train the new classifier only), or K (the first K stages).  [default: {_F.freeze}]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help=f"SGD with momentum, or AdamW.  [default: {_F.optimizer}]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help=f"Base learning rate.  [default: {_F.lr}]")
@click.option("--head-lr-mult", type=click.FloatRange(0), help=f"The new classifier's lr is lr x this.  [default: {_F.head_lr_mult}]")
@click.option("--backbone-lr-mult", type=click.FloatRange(0), help=f"The backbone's lr is lr x this.  [default: {_F.backbone_lr_mult}]")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), help=f"SGD momentum.  [default: {_F.momentum}]")
@click.option("--weight-decay", type=click.FloatRange(0), help=f"Weight decay.  [default: {_F.weight_decay}]")
@click.option("--schedule", type=click.Choice(SCHEDULES), help=f"Learning-rate schedule, per step.  [default: {_F.schedule}]")
@click.option("--warmup-epochs", type=click.FloatRange(0), help=f"Linear warm-up, in epochs.  [default: {_F.warmup_epochs}]")
@click.option("--step-epochs", type=click.IntRange(1), help=f"The step schedule multiplies the lr by --gamma every this many epochs.  [default: {_F.step_epochs}]")
@click.option("--gamma", type=click.FloatRange(0), help=f"The step schedule's factor.  [default: {_F.gamma}]")
@click.option("--epochs", type=click.IntRange(1), help=f"Passes over the train split.  [default: {_F.epochs}]")
@click.option("--batch-size", type=click.IntRange(1), help=f"Images per step.  [default: {_F.batch_size}]")
@click.option("--augment", type=click.Choice(AUGMENTS), help=f"Training augmentation.  [default: {_F.augment}]")
@click.option("--head-init", type=click.Choice(HEAD_INITS), help=f"Init of the new classifier.  [default: {_F.head_init}]")
@click.option("--init-head", help="Start from a head fitted by fit-head on this backbone's cached features (LP-FT): its .json, or its name in the heads folder, e.g. linear or subset-100/linear.")
@click.option("--seed", type=int, help=f"Seed of the classifier init, shuffling and augmentation.  [default: {_F.seed}]")
@runtime_options("finetune")
@click.option("--on-error", type=click.Choice(ON_ERROR), help=f"On an unreadable image: fail naming it, or skip it.  [default: {_F.on_error}]")
@click.option("--log-every", type=click.IntRange(0), help="A log line every N batches; 0 for none.  [default: per recipe, else 0]")
@click.option("--output-dir", help=f"Root of OUTPUT_DIR/<dataset>/<model>-<weights>/<name>/.  [default: {_F.output_dir}]")
@click.option("--name", help="The run's folder name.  [default: the recipe's name, else finetune]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Settings file: [finetune], over [extract]'s dataset and backbone.  [default: ./pipeline.toml if present]")
@click.option("--force", is_flag=True, help="Overwrite a run made with other settings (a finished run of the same settings is kept).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar within each epoch.")
@click.option("--evaluate", "then_evaluate", is_flag=True, help="Then evaluate the kept model on the test split (as pipeline evaluate does; reused when up to date).")
@friendly("interrupted; finished epochs are kept in last.pt: re-run the same command to resume")
def finetune_cmd(config_file: str | None, force: bool, progress: bool, then_evaluate: bool, **options: Any) -> None:
    """Fine-tune a backbone with a new classifier, keeping the epoch with the best val accuracy.

    Writes history.csv, last.pt (resume) and model.pt + model.json, which evaluate and predict accept like a head.
    An interrupted run resumes from its last finished epoch when re-run with the same settings.
    """
    from .evaluate import evaluate
    from .finetune import finetune

    config = load_config(config_file)
    settings = settings_from(FinetuneConfig, config, "finetune", options, source=config_file or CONFIG_FILE)
    # The [extract] settings of this dataset and backbone locate the heads that --init-head names.
    source = settings_from(ExtractConfig, config, "extract", {"data": settings.data, "model": settings.model, "weights": settings.weights})
    result = finetune(settings, source=source, force=force, progress=progress, log=click.echo)
    if result.status == "up-to-date":
        click.echo(f"{result.path} is up to date (best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.4f}); nothing to do")
    else:
        click.echo(f"finetune: best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.4f}, {result.seconds:.1f} s"
                   f"{' (resumed)' if result.status == 'resumed' else ''} -> {result.path}")
    if then_evaluate:
        _print_metrics(evaluate(result.path))
