"""Provenance and reuse: what made an artifact, and whether it is up to date with given settings and inputs.

One contract for every stage. An artifact records ``inputs`` (everything its content depends on: settings,
and the identity of the files it was made from), ``versions`` and ``created``. It is reused when its recorded
inputs equal the new ones after a JSON round trip (:func:`canonical`), and redone otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from contextvars import ContextVar
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import atomic_write
from .validate import brief

__all__ = ["PIPELINE_VERSION", "COMMAND", "made_by", "versions", "now", "canonical", "same", "diff", "stamp", "read_record", "current_record", "write_history"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


PIPELINE_VERSION = _version("pipeline") or "0+unknown"
# Versions read from installed metadata, so that stamping an artifact imports nothing heavy.
_LIBRARIES = ("torch", "torchvision", "numpy", "h5py", "pillow", "scikit-learn", "joblib", "onnxruntime", "onnx", "skops", "skl2onnx", "cleanlab")


# The command line being run, set by the CLI for the length of one command ("pipeline fit-head --clf svm"); None
# when a stage is called from Python. Artifacts record it beside their inputs, and the report's "how to rerun" lists
# the commands that made what it shows. It is not an input: the same work done from Python or the CLI is reused.
COMMAND: ContextVar[str | None] = ContextVar("pipeline_command", default=None)


def versions() -> dict[str, str]:
    """The versions of Python, pipeline and the libraries that shape results (those installed)."""
    out = {"pipeline": PIPELINE_VERSION, "python": platform.python_version()}
    for name in _LIBRARIES:
        v = _version(name)
        if v is not None:
            out[name] = v
    return out


def now() -> str:
    """The creation time stamped on artifacts: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def same(recorded: Any, inputs: Any) -> bool:
    """Whether recorded inputs equal new ones, compared as JSON."""
    return recorded is not None and canonical(recorded) == canonical(inputs)


def diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two settings dicts, e.g. ``preprocess.crop: 224 -> 160``."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in diff(a, b)]
        elif a != b:
            out.append(f"{k}: {brief(a)} -> {brief(b)}")
    return out




def made_by(*records: dict) -> list[tuple[str | None, str]]:
    """The (created, command) of each record that names the command line that made it (see :data:`COMMAND`)."""
    return [(r.get("created"), r["command"]) for r in records if r.get("command")]


def stamp(inputs: Any) -> dict[str, Any]:
    """The provenance fields every artifact's metadata carries: ``inputs``, ``versions``, ``created`` and ``command``."""
    return {"inputs": canonical(inputs), "versions": versions(), "created": now(), "command": COMMAND.get()}


def read_record(path: str | os.PathLike) -> dict | None:
    """An artifact's JSON metadata, or None when it is missing or unreadable (so: not reusable)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def current_record(path: str | os.PathLike, inputs: Any, *needed: str | os.PathLike) -> dict | None:
    """The JSON record at ``path`` when it was made from exactly ``inputs`` and every ``needed`` file exists, else None."""
    record = read_record(path)
    if record is None or not same(record.get("inputs"), inputs):
        return None
    if not all(Path(p).is_file() for p in needed):
        return None
    return record


def write_history(rows: list[dict], path: str | os.PathLike, *, hint: str = "") -> Path:
    """Write per-epoch history rows as CSV, atomically (columns from the first row); ``hint`` as for atomic_write."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return atomic_write(path, lambda f: f.write(text.getvalue().encode()), hint=hint)
