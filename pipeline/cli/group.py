"""The command group every command registers with."""

from __future__ import annotations

import shlex
import sys
from typing import Any, Sequence

import click

__all__ = ["cli"]


class _Group(click.Group):
    """The command group; it records the command line being run, which the artifacts it writes keep (provenance)."""

    def main(self, args: Sequence[str] | None = None, *pos: Any, **kwargs: Any) -> Any:
        from ..provenance import COMMAND

        args = list(sys.argv[1:] if args is None else args)
        token = COMMAND.set(shlex.join(["pipeline", *args]))
        try:
            return super().main(args, *pos, **kwargs)
        finally:
            COMMAND.reset(token)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Transfer learning on image folders: extract backbone features once, then fit heads on them, or fine-tune."""
