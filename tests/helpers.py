"""Plain helpers of several test modules: the command line in-process and in a child, one-value head grids."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner, Result

import pipeline
from pipeline.cli import cli

__all__ = ["SMALL", "child_env", "error", "invoke", "ok", "small_value", "usage_error"]

# Small values of each head's swept hyper-parameter: fast and deterministic, independent of the default grids.
SMALL = {"linear": 1e-3, "logreg": 1.0, "svm": 0.1, "svm-rbf": 1.0, "tree": 10, "extra-trees": 10, "hgb": 20, "knn": 3}


def small_value(name: str) -> float:
    """SMALL's value for the head family ``name``, else the first of its default grid."""
    from pipeline.heads import HEADS

    return SMALL.get(name, HEADS[name].grid[0])


def invoke(*args: object) -> Result:
    """``pipeline ARGS`` through click's test runner; paths and numbers may be passed as they are."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(result: Result) -> str:
    """The command succeeded: exit 0 and no exception; returns its output."""
    assert result.exit_code == 0, result.output
    assert result.exception is None, repr(result.exception)
    return result.output


def error(result: Result) -> str:
    """The CLI failed the friendly way: exit 1, one line starting 'Error:', no traceback; returns the message."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an unhandled exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0][len("Error: "):]


def usage_error(result: Result) -> str:
    """Click refused the options: exit 2, the usage line first, no traceback; returns the last line ('Error: ...')."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Usage: ")
    return result.output.strip().splitlines()[-1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, with the package under test first on PYTHONPATH (not another
    install of it) and ``extra`` set."""
    root = str(Path(pipeline.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
