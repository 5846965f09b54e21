"""The command line's shared parts: option groups declared once, the error handler, and settings lookup."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from ..config import DECODES, ExtractConfig
from ..settings_file import CONFIG_FILE, load_config, settings_from

__all__ = ["dataset_options", "backbone_options", "runtime_options", "cache_options", "config_option", "friendly", "cli_rank",
           "cache_source", "pop_cache_args", "metrics_text", "print_metrics", "print_warnings"]


def cli_rank() -> int:
    """This process's rank under torchrun, else 0 (without importing torch in a plain run)."""
    if "RANK" not in os.environ:
        return 0
    from ..distributed import env_rank  # imports torch: only under torchrun, so that predict --model runs without it

    return env_rank()


def friendly(interrupted: str = "interrupted") -> Callable[[Callable], Callable]:
    """Turn the library's errors into one clear line and exit code 1, and Ctrl-C into ``interrupted``, exit 130."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            rank = cli_rank()
            try:
                return fn(*args, **kwargs)
            except (ValueError, TypeError, OSError) as e:
                dist = sys.modules.get("pipeline.distributed")
                if dist is not None and isinstance(e, dist.RankError):
                    if rank:  # rank 0 reports what every rank raised together; one message, not one per process
                        sys.exit(1)
                    raise click.ClickException(str(e)) from None
                raise click.ClickException(f"rank {rank}: {e}" if rank else str(e)) from None
            except KeyboardInterrupt:
                if not rank:
                    click.echo(f"\n{interrupted}", err=True)
                sys.exit(130)

        return wrapper

    return decorate


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None
    if len(out) != 3:
        raise click.BadParameter(f"expected three comma-separated numbers (R,G,B), got {value!r}")
    return out


def _options(*options: Callable) -> Callable[[Callable], Callable]:
    """A decorator that adds several click options in the order given."""

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def dataset_options(defaults: Any, with_data: bool = True) -> Callable[[Callable], Callable]:
    """The dataset options of every command that reads images (extract, finetune; init takes DATA as its argument)."""
    data = [click.option("--data", help=f"Dataset folder: DATA/<split>/<class>/<image>, or a CSV layout with --labels-csv.  [default: {defaults.data}]")]
    return _options(
        *(data if with_data else []),
        click.option("--labels-csv", help="CSV of labels under DATA (Kaggle dog-breed layout), e.g. labels.csv."),
        click.option("--id-column", help=f"CSV column with the image id.  [default: {defaults.id_column}]"),
        click.option("--label-column", help=f"CSV column with the class.  [default: {defaults.label_column}]"),
        click.option("--image-dir", help=f"Folder under DATA with the CSV's images.  [default: {defaults.image_dir}]"),
        click.option("--extension", help=f"Appended to CSV ids to make file names.  [default: {defaults.extension}]"),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=f"Fraction of train carved out as val when there is no val/.  [default: {defaults.val_fraction}]"),
        click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=f"Fraction carved out as test for CSV datasets.  [default: {defaults.test_fraction}]"),
        click.option("--split-seed", type=int, help=f"Seed of the stratified carving.  [default: {defaults.split_seed}]"),
    )


def backbone_options(model_default: str, weights_default: str) -> Callable[[Callable], Callable]:
    """The backbone and preprocessing options shared by extract and finetune."""
    return _options(
        click.option("--model", help=f"torchvision classification model, e.g. resnet50 (see `pipeline models`).  [default: {model_default}]"),
        click.option("--weights", help=f"DEFAULT, a torchvision weights name (IMAGENET1K_V1...), a state_dict file, or 'none' for random weights.  [default: {weights_default}]"),
        click.option("--resize", type=click.IntRange(1), help="Override the weights' resize of the short side."),
        click.option("--crop", type=click.IntRange(1), help="Override the weights' centre crop (the image size)."),
        click.option("--mean", callback=_floats, help="Override the normalisation mean, R,G,B."),
        click.option("--std", callback=_floats, help="Override the normalisation std, R,G,B."),
    )


def runtime_options(command: str) -> Callable[[Callable], Callable]:
    """Where the backbone runs: device, the fast-path switch and DataLoader workers (and, for extract, where JPEGs are decoded)."""
    decode = click.option(
        "--decode", type=click.Choice(DECODES), help="Where JPEG files are decoded: host (the DataLoader workers, PIL) or device (the workers only "
        "read them; torchvision's decode_jpeg decodes each batch at once on --device, nvJPEG on CUDA, then resizes, crops and normalises "
        "there). Other formats are decoded on the host either way. device's features are within a tolerance of host's, not equal, so it is "
        f"part of the cache's settings.  [default: {ExtractConfig.decode}]",
    )
    return _options(
        click.option("--workers", type=click.IntRange(0), help="DataLoader worker processes.  [default: from the CPU count]"),
        click.option("--device", help="auto, cpu, cuda, cuda:N or mps.  [default: auto: cuda > mps > cpu]"),
        click.option("--amp/--no-amp", default=None, help=f"The fast path: bf16 autocast, channels_last{', pinned memory, non-blocking copies' if command == 'extract' else ''}.  [default: on for CUDA]"),
        *([decode] if command == "extract" else []),
    )


config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Settings file.  [default: ./pipeline.toml if present]")

# The options that locate existing caches, for the commands that read them.
cache_options = _options(
    click.option("--data", help="Dataset folder whose caches to use.  [default: from pipeline.toml, else data/fashion-mnist]"),
    click.option("--model", help="Backbone of the caches."),
    click.option("--weights", help="Weights of the caches."),
    click.option("--layer", "layers", multiple=True, help="Tap(s) of the caches, as given to extract."),
    click.option("--flip/--no-flip", default=None, help="The caches of flip-averaged features (extract --flip)."),
    click.option("--cache-dir", help="Root of the cache convention."),
    config_option,
)


def cache_source(config_file: str | None, options: dict[str, Any]) -> ExtractConfig:
    """The extract settings that locate caches: pipeline.toml's [extract], then the cache-locating options."""
    return settings_from(ExtractConfig, load_config(config_file), "extract", options, source=config_file or CONFIG_FILE)


def pop_cache_args(options: dict[str, Any]) -> dict[str, Any]:
    """Take the cache-locating options out of a command's options."""
    return {k: options.pop(k) for k in ("data", "model", "weights", "layers", "flip", "cache_dir") if k in options}


def metrics_text(m: dict) -> str:
    """An evaluation's test metrics in one line: top-1 with its 95 % interval, top-5, balanced accuracy, calibration error."""
    top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
    lo, hi = m["top1_ci"]
    return (f"test top-1 {m['top1']:.4f} (95 % CI {lo:.4f}-{hi:.4f}){top5}, balanced accuracy {m['balanced_accuracy']:.4f}, "
            f"ECE {m['ece']:.4f} on {m['n']} images")


def print_warnings(lines: list[str]) -> None:
    """Each of a result's warnings, once, on stderr: where its numbers cannot mean much."""
    for line in lines:
        click.echo(f"warning: {line}", err=True)


def print_metrics(m: dict) -> None:
    """One line of an evaluation's test metrics, as fit-head --evaluate and finetune --evaluate print them."""
    done = " (up to date)" if m["status"] == "up-to-date" else ""
    click.echo(f"  {metrics_text(m)}{done} -> {m['json']}")
    print_warnings(m.get("warnings", []))

