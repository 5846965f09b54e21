"""Commands about the data and stage one: init, check, extract, layers, info, models, assets."""

from __future__ import annotations

from typing import Any

import click

from ..config import COMPRESSIONS, DTYPES, ENGINES, ON_ERROR, PARALLEL, SPLITS, ExtractConfig
from ..settings_file import CONFIG_FILE, load_config, settings_from, write_config
from .options import backbone_options, cli_rank, config_option, dataset_options, friendly, runtime_options
from .group import cli

_D = ExtractConfig()  # the library's defaults are the CLI's: help texts read them from here


@cli.command("init")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@dataset_options(_D, with_data=False)
@backbone_options(_D.model, _D.weights)
@click.option("--cache-dir", help=f"Root of the cache convention.  [default: {_D.cache_dir}]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=CONFIG_FILE, show_default=True, help="The settings file to write.")
@click.option("--force", is_flag=True, help="Replace an existing settings file.")
@friendly()
def init_cmd(data: str, config_file: str, force: bool, **options: Any) -> None:
    """Write a settings file for the dataset DATA, so that every other command finds its caches without options.

    Give the dataset, model and weights once here; extract, fit-head, evaluate, compare, predict, report and
    finetune then read them from the file (their own options still override it).
    """
    settings = ExtractConfig(data=data, **{k: v for k, v in options.items() if v is not None})  # refuse bad values now
    path = write_config(config_file, {"extract": {"data": data, **options}}, force=force)
    click.echo(f"wrote {path}: dataset {settings.data} ({settings.dataset.name}), model {settings.model}, weights {settings.weights}")
    click.echo("next: pipeline extract --split train --split val --split test; pipeline fit-head --clf logreg --evaluate; "
               "pipeline compare; pipeline report; pipeline predict IMAGES --head <the head's .json>")


@cli.command("check")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@dataset_options(_D, with_data=False)
@click.option("--show", type=click.IntRange(0), default=10, show_default=True, help="Files listed per kind of problem.")
@friendly()
def check_cmd(data: str, show: int, **options: Any) -> None:
    """Check the dataset DATA without a model: per split the images, classes, sizes and modes, the unreadable files,
    byte-identical duplicates (across splits: a leak) and classes too small to measure. Exit code 1 on unreadable
    files or leaks."""
    from ..check import TINY_CLASS, check_dataset

    spec = ExtractConfig(data=data, **{k: v for k, v in options.items() if v is not None}).dataset
    report = check_dataset(spec)
    click.echo(f"{report.root}: {len(report.classes)} classes ({', '.join(report.classes[:8])}{' ...' if len(report.classes) > 8 else ''})")
    top = lambda counter: ", ".join(f"{k if isinstance(k, str) else 'x'.join(map(str, k))} ({n})" for k, n in counter.most_common(3))  # noqa: E731
    for s in report.splits.values():
        carved = f", carved from {s.carved['from']} ({s.carved.get('val_fraction')}, seed {s.carved['seed']})" if s.carved and s.name != s.carved['from'] else ""
        smallest = min(s.per_class.items(), key=lambda kv: kv[1]) if s.per_class else ("-", 0)
        click.echo(f"  {s.name:<5} {s.images:>7} images{carved}; smallest class {smallest[0]} ({smallest[1]}); "
                   f"sizes {top(s.sizes) or '-'}; modes {top(s.modes) or '-'}")
        if s.tiny_classes:
            click.echo(f"        classes with fewer than {TINY_CLASS} images: {', '.join(s.tiny_classes[:show])} (their accuracy means little)")
        if s.ignored:
            click.echo(f"        ignored {len(s.ignored)} file(s) that are not images: {', '.join(p for p, _ in s.ignored[:show])}")
        for rel, why in s.unreadable[:show]:
            click.echo(f"        unreadable {rel}: {why}")
        if len(s.unreadable) > show:
            click.echo(f"        ... and {len(s.unreadable) - show} more unreadable")
    for group in report.leaks[:show]:
        click.echo("  leak: the same bytes in " + " = ".join(f"{split}:{rel}" for split, rel in group))
    within = len(report.duplicates) - len(report.leaks)
    if within:
        click.echo(f"  {within} group(s) of byte-identical files within a split, e.g. " + " = ".join(rel for _, rel in report.duplicates[len(report.leaks)]))
    unreadable = sum(len(s.unreadable) for s in report.splits.values())
    if not report.ok:
        raise click.ClickException(f"{unreadable} unreadable file(s), {len(report.leaks)} duplicate group(s) across splits")
    click.echo("ok: every image is readable and no file is in two splits")


@cli.command("extract")
@click.option("--split", "splits", multiple=True, type=click.Choice(SPLITS), help=f"Split(s) to extract; repeat for several.  [default: {_D.split}]")
@dataset_options(_D)
@backbone_options(_D.model, _D.weights)
@click.option("--layer", "layers", multiple=True, help="Module to tap, NAME or NAME:input|output; repeat for several taps in one pass. Default: avgpool output, or the classifier's input.")
@click.option("--capture", type=click.Choice(["input", "output"]), help=f"Capture the input or output of --layer modules given without one.  [default: {_D.capture}]")
@click.option("--flip/--no-flip", default=None, help="Average each image's features with those of its horizontal mirror: test-time augmentation, twice the "
              "forward work and the memory of a batch (halve --batch-size where a GPU's memory is tight). Its caches sit beside the plain ones (<taps>.flip), and predict and export flip too.  [default: no]")
@click.option("--dtype", type=click.Choice(DTYPES), help=f"Storage dtype of the features.  [default: {_D.dtype}]")
@click.option("--compression", type=click.Choice(COMPRESSIONS), help=f"HDF5 compression.  [default: {_D.compression}]")
@click.option("--batch-size", type=click.IntRange(1), help=f"Images per forward pass.  [default: {_D.batch_size}]")
@runtime_options("extract")
@click.option("--engine", type=click.Choice(ENGINES), help=f"auto: ONNX Runtime for fp32 on the CPU when installed and equal to eager, else eager torch.  [default: {_D.engine}]")
@click.option("--parallel", type=click.Choice(PARALLEL), help="How ONNX Runtime uses the cores: operators (each operator split over all of them) or "
              f"batches (one single-threaded run per core, each on its own batch: no wait at every operator for a thread whose core a neighbour took).  [default: {_D.parallel}]")
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
    from ..extract import extract_splits

    config = load_config(config_file)
    chosen = splits or (config.get("extract", {}).get("split"),)
    if (options.get("output") or config.get("extract", {}).get("output")) and len(chosen) > 1:
        raise click.BadParameter("--output takes one --split", param_hint="--output")
    settings = [settings_from(ExtractConfig, config, "extract", {**options, "split": split}, source=config_file or CONFIG_FILE) for split in chosen]

    def say(result: Any) -> None:
        if cli_rank():  # under torchrun, rank 0 speaks for all ranks
            return
        if result.status == "up-to-date":
            click.echo(f"{result.split}: {result.path} is up to date ({result.n_images} images); nothing to do")
        else:
            resumed = f", resumed: {result.n_computed} computed" if result.status == "resumed" else ""
            click.echo(
                f"{result.split}: {result.path}  {result.n_images} images, {result.n_skipped} skipped, "
                f"{result.images_per_s:.1f} img/s ({result.engine}{resumed})"
            )
        if result.ignored:
            names = ", ".join(p for p, _ in result.ignored[:5]) + (" ..." if len(result.ignored) > 5 else "")
            click.echo(f"  ignored {len(result.ignored)} file(s) that are not images (hidden, system or other extensions): {names}")
        for path, why in result.skipped[:20]:
            click.echo(f"  skipped {path}: {why}")
        if len(result.skipped) > 20:
            click.echo(f"  ... {len(result.skipped) - 20} more skipped files are listed in the cache (pipeline info)")

    # One backbone, one engine and one scan of the dataset for all the splits.
    extract_splits(settings[0], [s.split for s in settings], force=force, progress=progress, done=say)


@cli.command("layers")
@click.argument("model")
@click.option("--image-size", type=click.IntRange(8), default=224, show_default=True, help="Input size for the shapes.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not only the top two levels.")
@friendly()
def layers_cmd(model: str, image_size: int, show_all: bool) -> None:
    """List the tap points of MODEL with their input and output shapes for one image."""
    from ..backbones import load_backbone
    from ..taps import default_tap, list_taps

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
    from ..cache import describe

    click.echo(describe(file))


@cli.command("models")
@click.option("--offline", is_flag=True, help="Only the models whose weights are in the torch hub cache, with those weights.")
def models_cmd(offline: bool) -> None:
    """List torchvision's classification models, with the weights usable without a download."""
    from ..backbones import list_backbones, offline_weights

    here = offline_weights()
    for name in sorted(here) if offline else list_backbones():
        click.echo(f"{name:<28} weights here: {', '.join(here[name])}" if name in here else name)


@cli.command("assets")
@click.option("--weights/--no-weights", default=True, help="Fetch MobileNetV2 ImageNet weights into the torch hub cache.")
@click.option("--fashion-mnist", "fmnist", type=click.Path(file_okay=False), default=None, help="Materialise Fashion-MNIST as an image folder here, e.g. data/fashion-mnist.")
@click.option("--source", type=click.Path(file_okay=False, exists=True), default=None, help="Folder with the four Fashion-MNIST IDX .gz files.  [default: Debian's, else download]")
@friendly()
def assets_cmd(weights: bool, fmnist: str | None, source: str | None) -> None:
    """Obtain the embedded default: MobileNetV2 ImageNet weights and Fashion-MNIST, offline where possible."""
    import os
    from pathlib import Path

    from .. import assets

    if weights:
        path = assets.fetch_mobilenet_v2_weights(Path(".assets"))
        click.echo(f"weights: {path} (sha256 ok)")
    if fmnist:
        root = assets.materialize_fashion_mnist(Path(fmnist), Path(source) if source else None)
        counts = {s: sum(len(files) for _, _, files in os.walk(root / s)) for s in ("train", "test")}
        click.echo(f"fashion-mnist: {root} ({counts['train']} train, {counts['test']} test images)")
