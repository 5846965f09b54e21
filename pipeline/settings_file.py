"""The settings file, ``pipeline.toml``: reading it, and layering its sections under command-line options.

Defaults come first (the dataclasses of :mod:`pipeline.config`), then the file's section, then what the command
line (or a Python caller) gives.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from .config import BACKBONE_AND_DATASET, AuditConfig, ExtractConfig, FinetuneConfig, HeadConfig, ReportConfig

__all__ = ["CONFIG_FILE", "SECTIONS", "load_config", "settings_from"]

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


# TOML values by the annotation of the field they fill. A string is never taken for a bool or a number:
# `amp = "no"` would otherwise be truthy and switch the fast path on.
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(value: Any, annotation: str, where: str) -> None:
    """Raise ValueError naming ``where`` when ``value`` does not fit ``annotation`` (e.g. ``int | None``)."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    for kind in kinds:
        if kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0].strip()
            if isinstance(value, list) and all(_fits(v, item) for v in value):
                return
        elif _fits(value, kind):
            return
    expected = " or ".join("a list" if k.startswith("tuple[") else {"None": "nothing", "str": "a string", "int": "an integer",
                           "float": "a number", "bool": "true or false"}.get(k, k) for k in kinds if k != "None")
    raise ValueError(f"{where}: expected {expected}, got {value!r}")


def _fits(value: Any, kind: str) -> bool:
    if kind not in _SCALARS:
        return False
    # bool is an int in Python; it fits only a bool field.
    return isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))

