"""The settings file, ``pipeline.toml``: reading it, and layering its sections under command-line options.

Defaults come first (the dataclasses of :mod:`pipeline.config`), then the file's section, then what the command
line (or a Python caller) gives.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from .config import BACKBONE_AND_DATASET, AuditConfig, ExtractConfig, FinetuneConfig, HeadConfig, ReportConfig
from .files import atomic_write
from .validate import conform

__all__ = ["CONFIG_FILE", "SECTIONS", "load_config", "settings_from", "write_config"]

CONFIG_FILE = "pipeline.toml"
T = TypeVar("T")

# Sections of pipeline.toml and the settings each one fills. [finetune] inherits [extract]'s dataset and backbone,
# so that a fine-tune and the heads it starts from (--init-head) see the same images through the same backbone.
SECTIONS: dict[str, type] = {"extract": ExtractConfig, "head": HeadConfig, "finetune": FinetuneConfig, "report": ReportConfig,
                             "audit": AuditConfig}
_INHERITS = {"finetune": ("extract", BACKBONE_AND_DATASET)}


def load_config(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read the project config: ``path``, or ``pipeline.toml`` in the working directory when it exists.

    Returns:
        The TOML tables by section name (``extract``, ...); empty when there is no file.

    Raises:
        ValueError: a missing or malformed file, or an unknown section.
    """
    if path is None:
        path = Path.cwd() / CONFIG_FILE
        if not path.is_file():
            return {}
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"{path}: settings must sit in sections such as [extract]; found top-level {bad}")
    for section in data:
        if section not in SECTIONS:
            near = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f" (did you mean [{near[0]}]?)" if near else ""
            raise ValueError(f"{path}: unknown section [{section}]{hint}; valid: {', '.join(f'[{s}]' for s in SECTIONS)}")
    return data


def settings_from(cls: type[T], config: dict[str, dict[str, Any]], section: str, overrides: dict[str, Any], source: str = CONFIG_FILE) -> T:
    """Build a settings dataclass: its defaults, then the config section, then non-None overrides.

    ``[finetune]`` starts from ``[extract]``'s dataset and backbone fields.

    Args:
        cls: the settings dataclass.
        config: what :func:`load_config` returned.
        section: the table to read, e.g. ``extract``.
        overrides: command-line values; None (or an empty tuple) means "not given".
        source: the config file's name, for messages.

    Raises:
        ValueError: a config key that is not a field of ``cls``, or a value not of the field's type.
    """
    table: dict[str, Any] = {}
    if section in _INHERITS:
        parent, keys = _INHERITS[section]
        table.update({k: v for k, v in config.get(parent, {}).items() if k in keys})
    own = dict(config.get(section, {}))
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(own) - valid)
    if unknown:
        near = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"[{section}] in {source}: unknown setting(s) {unknown}{hint}; valid: {', '.join(sorted(valid))}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in own.items():
        _check_type(value, types[key], f"[{section}] {key} in {source}")
    table.update(own)
    table.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    table = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**table)


def _check_type(value: Any, annotation: str, where: str) -> None:
    """Raise ValueError naming ``where`` when a TOML ``value`` does not fit ``annotation`` (e.g. ``int | None``)."""
    conform(value, annotation, where, sequences=(list,), paths=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these characters


def write_config(path: str | Path, sections: dict[str, dict[str, Any]], *, force: bool = False) -> Path:
    """Write a settings file with the given sections, after checking them as :func:`settings_from` would.

    Values equal to None are left out (they mean "the default").

    Raises:
        ValueError: an existing file without ``force``, or a setting that the section does not take.
    """
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to replace it")
    lines = ["# Settings for the pipeline command; options on the command line override them.", ""]
    for section, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None and v != ()}
        settings_from(SECTIONS[section], {section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}, section, {},
                      source=str(path))
        lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()] + [""]
    return atomic_write(path, lambda f: f.write("\n".join(lines).encode()))

