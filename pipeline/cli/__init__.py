"""The ``pipeline`` command: a thin layer that parses options, calls one library function and prints the result.

One module per family of commands: ``data`` (init, check, extract, layers, info, models, assets), ``heads``
(fit-head, evaluate, compare, report, predict, export), ``audit``, ``finetune`` and ``run`` (several in one process);
``options`` holds the option groups they share and the one-line error handler. Heavy libraries (torch, scikit-learn,
h5py) are imported inside each command, so ``pipeline --help`` answers at once.
"""

from . import audit, data, finetune, heads, run  # noqa: F401  (importing them registers the commands)
from .group import cli

__all__ = ["cli"]
