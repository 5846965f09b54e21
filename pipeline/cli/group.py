"""The command group every command registers with."""

from __future__ import annotations

import click

__all__ = ["cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Transfer learning on image folders: extract backbone features once, then fit heads on them, or fine-tune."""
