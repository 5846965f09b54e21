"""Project settings: sections of ``pipeline.toml`` layered under command-line options."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["CONFIG_FILE", "load_config", "settings_from"]

CONFIG_FILE = "pipeline.toml"
T = TypeVar("T")


def load_config(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read the project config: ``path``, or ``pipeline.toml`` in the working directory when it exists.

    Returns:
        The TOML tables by section name (``extract``, ...); empty when there is no file.
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
    return data


def settings_from(cls: type[T], config: dict[str, dict[str, Any]], section: str, overrides: dict[str, Any], source: str = CONFIG_FILE) -> T:
    """Build a settings dataclass: its defaults, then the config section, then non-None overrides.

    Args:
        cls: the settings dataclass.
        config: what :func:`load_config` returned.
        section: the table to read, e.g. ``extract``.
        overrides: command-line values; None means "not given".
        source: the config file's name, for messages.

    Raises:
        ValueError: a config key that is not a field of ``cls``.
    """
    table = dict(config.get(section, {}))
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ValueError(f"[{section}] in {source}: unknown setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
    table.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    table = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**table)
