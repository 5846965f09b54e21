"""The finetune command."""

from __future__ import annotations

from typing import Any

import click

from ..config import AUGMENTS, HEAD_INITS, NORMS, ON_ERROR, OPTIMIZERS, SCHEDULES, ExtractConfig, FinetuneConfig
from ..recipes import DEFAULT_LR, LPFT_DEFAULTS, RECIPES
from ..settings_file import CONFIG_FILE, load_config, settings_from
from .options import backbone_options, dataset_options, friendly, print_metrics, print_warnings, runtime_options
from .group import cli

_F = FinetuneConfig()  # the library's defaults are the CLI's: help texts read them from here


@cli.command("finetune", epilog="\b\nRecipes:\n" + "\n".join(f"  {r.name:<18} {r.source}" for r in RECIPES.values()))
@click.option("--recipe", type=click.Choice(list(RECIPES)), help="A source tutorial's model, freezing, optimizer, learning rates, augmentation and epochs (listed below); explicit options override them.")
@dataset_options(_F)
@backbone_options("the recipe's, else mobilenet_v2", "the recipe's, else DEFAULT")
@click.option("--subset", type=click.IntRange(1), help="Train on at most this many images per class (stratified, seeded).  [default: all]")
@click.option("--eval-subset", type=click.IntRange(1), help="Evaluate val and targets on at most this many images per class.  [default: all]")
@click.option("--target", "targets", multiple=True, help="Also evaluate every epoch: test, or DIR[:SPLIT], a dataset folder with the same classes (a target domain); repeat for several.")
@click.option("--freeze", help=f"none, backbone (train the new classifier only), or K (the first K stages).  [default: {_F.freeze}]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help=f"SGD with momentum, or AdamW.  [default: {_F.optimizer}; {LPFT_DEFAULTS['optimizer']} with --init-head]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help=f"Base learning rate.  [default: the recipe's, else {DEFAULT_LR['adamw']:g} for AdamW and {DEFAULT_LR['sgd']:g} for SGD; "
              f"{LPFT_DEFAULTS['lr']:g} with --init-head]")
@click.option("--head-lr-mult", type=click.FloatRange(0), help=f"The new classifier's lr is lr x this.  [default: {_F.head_lr_mult}; {LPFT_DEFAULTS['head_lr_mult']:g} with --init-head]")
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
@click.option("--norm", type=click.Choice(NORMS), help=f"Normalisation layers: frozen (running statistics kept, as the probe saw them) or train (re-estimated on the new data).  [default: {_F.norm}]")
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
    from ..evaluate import evaluate
    from ..finetune import finetune

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
    print_warnings(result.warnings)
    if then_evaluate:
        print_metrics(evaluate(result.path))
