"""The audit command: wrong labels, duplicates and leaks, and outliers, found on the cached features."""

from __future__ import annotations

from typing import Any

import click

from ..config import HEAD_NAMES, POOLS, PREPROCESSING, AuditConfig
from ..settings_file import CONFIG_FILE, load_config, settings_from
from .group import cli
from .options import cache_options, cache_source, friendly, pop_cache_args

_A = AuditConfig()  # the library's defaults are the CLI's: help texts read them from here


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
    from ..audit import audit

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
