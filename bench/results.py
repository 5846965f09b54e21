"""What every benchmark records beside its figures: the machine it ran on, and the JSON file under bench/results/."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["machine", "save"]


def machine() -> dict[str, Any]:
    """The machine and library versions a figure was measured with."""
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def save(path: str | os.PathLike, meta: dict[str, Any], rows: list, **more: Any) -> Path:
    """Write ``{"meta": machine() and meta, "rows": rows, **more}`` as JSON to ``path`` (its folder made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**machine(), **meta}, "rows": rows, **more}, indent=1))
    return path
