"""Values checked against the type a setting declares, with messages that name the setting, the value and what was expected."""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

__all__ = ["SettingTypeError", "conform", "check_types", "expect_instance", "check_choice", "check_at_least", "brief", "first_line"]


class SettingTypeError(TypeError, ValueError):
    """A setting whose value is not of the setting's type; a ValueError too, as every other bad setting is."""


# Values by the annotation of the field they fill. A string is never taken for a bool or a number (`amp = "no"`
# would otherwise be truthy), and a bool, although a Python int, fits only a bool field.
_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,)}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
_PLURAL = {"str": "strings", "int": "integers", "float": "numbers", "bool": "true/false values"}


def _expected(kind: str) -> str:
    if kind.startswith("tuple["):
        return f"a list of {_PLURAL.get(kind[len('tuple['):].split(',')[0].strip(), 'values')}"
    return _EXPECTED.get(kind, kind)


def _scalar(value: Any, kind: str, paths: bool) -> tuple[bool, Any]:
    """(fits, value as stored) for one scalar kind; paths (``os.PathLike``) fit ``str`` when ``paths``."""
    if kind == "None":
        return value is None, value
    if kind == "str" and paths and isinstance(value, os.PathLike):
        return True, os.fspath(value)
    if kind not in _SCALARS or not isinstance(value, _SCALARS[kind]) or (kind != "bool" and isinstance(value, bool)):
        return False, value
    if kind == "int":
        return True, int(value)  # numpy integers become plain ints: they are written into JSON metadata
    if kind == "float" and not isinstance(value, (int, float)):
        return True, float(value)
    return True, value


def conform(value: Any, annotation: str, where: str, *, sequences: tuple[type, ...] = (list, tuple), paths: bool = True) -> Any:
    """``value`` checked against a field's annotation (``int | None``, ``tuple[str, ...]``...), as the field stores it.

    Sequences become tuples and paths strings; a bare string never counts as a sequence of strings.

    Args:
        value: what was given.
        annotation: the field's type, as written in the dataclass.
        where: how the message names the setting.
        sequences: the types accepted for a ``tuple[...]`` field (TOML gives lists).
        paths: whether ``os.PathLike`` values fit ``str`` fields.

    Raises:
        SettingTypeError: the value fits none of the annotation's types; the message names the setting, the value
            and what was expected.
    """
    kinds = [k.strip() for k in str(annotation).split("|")]
    for kind in kinds:
        if kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0].strip()
            if isinstance(value, sequences) and not isinstance(value, (str, bytes)):
                items = [_scalar(v, item, paths) for v in value]
                if all(ok for ok, _ in items):
                    return tuple(v for _, v in items)
        else:
            ok, fixed = _scalar(value, kind, paths)
            if ok:
                return fixed
    expected = " or ".join(_expected(k) for k in kinds if k != "None")
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
    raise SettingTypeError(f"{where}: expected {expected}, got {shown}")


def check_types(settings: Any) -> None:
    """Check every field of a settings dataclass against its annotation, storing tuples for sequences and str for paths."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        fixed = conform(value, f.type, f"{type(settings).__name__}.{f.name}")
        if fixed is not value:
            object.__setattr__(settings, f.name, fixed)


def expect_instance(name: str, value: Any, cls: type) -> None:
    """Refuse an argument that is not a ``cls`` (e.g. a dict where settings are expected), naming it.

    Raises:
        SettingTypeError: ``value`` is of another type.
    """
    if not isinstance(value, cls):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise SettingTypeError(f"{name} must be {cls.__name__}(...), got a {type(value).__name__}: {shown}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_at_least(name: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def brief(value: Any, limit: int = 80, *, plain_strings: bool = False) -> str:
    """A value for one line of a message: a huge or hostile recorded value must not flood it.

    numpy scalars show as Python values and arrays as ``an array [...]``; with ``plain_strings`` a string shows as
    it is rather than as its repr. Newlines are escaped and the text is cut to ``limit`` characters.
    """
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # without importing numpy here
        if getattr(value, "ndim", 0):
            value = _ArrayText(f"an array {value.tolist()!r}")
        else:
            value = value.item()
    text = value if isinstance(value, _ArrayText) or (plain_strings and isinstance(value, str)) else repr(value)
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _ArrayText(str):
    """The text of an array, shown as it is."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message."""
    return (str(e).strip().splitlines() or [""])[0]

