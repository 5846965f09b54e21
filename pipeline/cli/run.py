"""``pipeline run``: several commands in one process, each timed."""

from __future__ import annotations

import shlex
import sys
import time

import click

from .group import cli


@cli.command("run")
@click.argument("commands", nargs=-1, required=True)
def run_cmd(commands: tuple[str, ...]) -> None:
    """Run several pipeline COMMANDS, each one quoted, in one process, in order, stopping at the first that fails.

    torch, torchvision and scikit-learn are imported once rather than once per command, which is most of what an
    up-to-date stage costs, and each command's time is printed at the end. `make all` runs its stages this way:

        pipeline run "extract --split train --split test" "fit-head --clf svm --evaluate" "report"
    """
    parsed = []
    for text in commands:
        args = shlex.split(text)
        if not args or args[0] not in cli.commands or args[0] == "run":
            raise click.BadParameter(f"{text!r} is not a pipeline command (one of: {', '.join(c for c in sorted(cli.commands) if c != 'run')})")
        parsed.append(args)
    times: list[tuple[str, float]] = []
    code: int | None = 0
    for args in parsed:
        click.echo(f"$ {shlex.join(['pipeline', *args])}")
        t0 = time.perf_counter()
        try:
            cli.main(args, prog_name="pipeline", standalone_mode=False)
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except click.exceptions.Exit as e:
            code = e.exit_code
        except SystemExit as e:  # friendly() exits 130 on Ctrl-C
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        times.append((args[0], time.perf_counter() - t0))
        if code:
            break
    width = max(len(name) for name, _ in times)
    click.echo("time per command:")
    for (name, seconds), args in zip(times, parsed):
        click.echo(f"  {name:<{width}} {seconds:8.1f} s  {shlex.join(args[1:])[:80]}")
    click.echo(f"  {'total':<{width}} {sum(s for _, s in times):8.1f} s" + (f"; stopped: {shlex.join(parsed[len(times) - 1])!r} failed" if code else ""))
    if code:
        sys.exit(code)
