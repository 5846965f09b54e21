"""Engines: run a TapExtractor on batches, eagerly in torch or exported to ONNX Runtime on the CPU."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from .config import ENGINES
from .runtime import Runtime
from .taps import TapExtractor

__all__ = ["Engine", "EagerEngine", "OnnxEngine", "BatchRunner", "make_engine", "ENGINES", "ONNX_TOLERANCE"]

# ONNX Runtime's features must match eager fp32 within this (absolute, and relative to the largest feature).
ONNX_TOLERANCE = 1e-4


class Engine(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        """Features of one preprocessed batch, one float32 array per tap."""


class EagerEngine:
    """The reference: the torch module itself, on the runtime's device, fp32 or bf16 autocast per the switch."""

    name = "eager"

    def __init__(self, extractor: TapExtractor, runtime: Runtime) -> None:
        self.extractor = runtime.prepare(extractor)
        self.runtime = runtime

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode(), self.runtime.autocast():
            outs = self.extractor(self.runtime.to_device(x))
        return [o.float().cpu().numpy() for o in outs]


class OnnxEngine:
    """The extractor exported to ONNX with its hooks in place, run by ONNX Runtime's CPU provider."""

    name = "onnx"

    def __init__(self, extractor: TapExtractor, example: torch.Tensor, threads: int | None = None) -> None:
        import onnxruntime as ort

        n_out = len(extractor.taps)
        with tempfile.TemporaryDirectory(prefix="pipeline-onnx-") as tmp:
            path = os.path.join(tmp, "extractor.onnx")
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                # The TorchScript exporter traces through forward hooks and needs no extra packages.
                torch.onnx.export(
                    extractor.cpu().eval(), (example.cpu(),), path, dynamo=False, opset_version=17,
                    input_names=["images"], output_names=[f"tap{i}" for i in range(n_out)],
                    dynamic_axes={"images": {0: "batch"}, **{f"tap{i}": {0: "batch"} for i in range(n_out)}},
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or max(1, torch.get_num_threads())
            options.inter_op_num_threads = 1
            # Idle threads sleep instead of spinning, leaving the cores to DataLoader workers between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        outs = self.session.run(None, {"images": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outs]


def _max_rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(y)))) for x, y in zip(a, b))


def make_engine(kind: str, extractor: TapExtractor, runtime: Runtime, example: torch.Tensor) -> Engine:
    """Build the engine: ``eager``, ``onnx``, or ``auto`` (ONNX Runtime on a plain-fp32 CPU run when installed
    and when its features on ``example`` match eager within ``ONNX_TOLERANCE``; eager otherwise).

    Raises:
        ValueError: ``onnx`` asked for where it cannot run, or an unknown engine.
    """
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
    eager = EagerEngine(extractor, runtime)
    onnx_possible = runtime.device.type == "cpu" and not runtime.amp
    if kind == "eager" or (kind == "auto" and not onnx_possible):
        return eager
    if not onnx_possible:
        raise ValueError("--engine onnx runs on the CPU in fp32 only; use --device cpu --no-amp, or --engine eager")
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        if kind == "onnx":
            raise ValueError("--engine onnx needs onnx and onnxruntime: pip install 'pipeline[fast]'")
        return eager
    try:
        fast = OnnxEngine(extractor, example)
        error = _max_rel_error(fast(example), eager(example))
    except Exception as e:
        if kind == "onnx":
            raise ValueError(f"ONNX export of the backbone failed: {type(e).__name__}: {e}") from e
        warnings.warn(f"ONNX export failed ({type(e).__name__}: {e}); using the eager engine")
        return eager
    if error > ONNX_TOLERANCE:
        if kind == "onnx":
            raise ValueError(f"ONNX Runtime features differ from eager by {error:.2e} (> {ONNX_TOLERANCE}); use --engine eager")
        warnings.warn(f"ONNX Runtime features differ from eager by {error:.2e}; using the eager engine")
        return eager
    return fast


class BatchRunner:
    """Run an engine over a loader of ``(positions, batch, bad)``: the one loop of extract, predict and evaluate.

    Iterating yields ``(positions, features, bad)`` per batch, with ``features`` one array per tap (None when no
    image of the batch could be read) and ``bad`` the ``(position, reason)`` of unreadable images. The engine is
    built on the first readable batch, which it is checked against; ``engine`` names it afterwards.

    Args:
        loader: yields what :func:`pipeline.data.collate_batch` makes.
        extractor: the tapped model.
        kind: ``auto``, ``eager`` or ``onnx``.
        runtime: where and how the model runs.
        on_error: ``fail`` raises on the first batch with an unreadable image, naming it with ``name``; ``skip``
            passes them on in ``bad``.
        name: the path of an image by position, for messages.
    """

    def __init__(self, loader: Iterable, extractor: TapExtractor, kind: str, runtime: Runtime, *, on_error: str = "fail",
                 name: Callable[[int], str] = str) -> None:
        self.loader, self.extractor, self.kind, self.runtime = loader, extractor, kind, runtime
        self.on_error, self.name = on_error, name
        self.engine: Engine | None = None

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[np.ndarray] | None, list[tuple[int, str]]]]:
        for index, x, bad in self.loader:
            if bad and self.on_error == "fail":
                i, why = bad[0]
                raise ValueError(f"{self.name(i)}: {why}; fix or remove the file, or pass --on-error skip")
            features = None
            if x is not None:
                if self.engine is None:
                    self.engine = make_engine(self.kind, self.extractor, self.runtime, x[:2])
                features = self.engine(x)
            yield index, features, bad
