"""pipeline: cache a frozen backbone's features once, then fit heads on them in seconds.

The names below are imported on first use, so ``import pipeline`` (and the ``pipeline`` command) start at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .provenance import PIPELINE_VERSION as __version__

# name -> module that defines it
_EXPORTS = {
    "audit": "audit",
    "Backbone": "backbones", "load_backbone": "backbones",
    "FeatureCache": "cache", "read_cache": "cache", "write_features": "cache",
    "AuditConfig": "config", "DatasetSpec": "config", "ExtractConfig": "config", "FinetuneConfig": "config", "HeadConfig": "config", "ReportConfig": "config",
    "load_split": "data",
    "compare": "evaluate", "evaluate": "evaluate",
    "ExtractResult": "extract", "extract": "extract", "extract_splits": "extract",
    "export": "export",
    "finetune": "finetune",
    "fit_head": "fit",
    "predict": "predict",
    "build_report": "report",
    "FeatureHooks": "taps", "Tap": "taps", "list_taps": "taps",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``pipeline.extract`` (and evaluate, finetune, predict) is the function, as ``from pipeline import extract``
    promises, even after the import system has set the attribute to the submodule of the same name."""

    def __getattribute__(self, name: str) -> Any:
        if name in _SAME_NAME:
            return getattr(importlib.import_module(f".{name}", __name__), name)
        return super().__getattribute__(name)


_SAME_NAME = frozenset(name for name, module in _EXPORTS.items() if name == module)
sys.modules[__name__].__class__ = _Package
