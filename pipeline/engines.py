"""Engines: run a TapExtractor on batches, eagerly in torch or exported to ONNX Runtime on the CPU."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections import deque
from contextlib import ExitStack
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from .config import ENGINES, PARALLEL
from .runtime import BatchInputs, Runtime, torch_threads
from .taps import TapExtractor
from .validate import check_choice

__all__ = ["Engine", "EagerEngine", "OnnxEngine", "BatchRunner", "make_engine", "ENGINES", "ONNX_TOLERANCE"]

# ONNX Runtime's features must match eager fp32 within this (absolute, and relative to the largest feature).
ONNX_TOLERANCE = 1e-4


class Engine(Protocol):
    name: str
    concurrency: int  # batches it may run at once, each from its own thread (BatchRunner keeps that many in flight)
    owns_cores: bool  # it runs the model on threads of its own, so torch's work around it takes one thread

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        """Features of one preprocessed batch, one float32 array per tap."""


class EagerEngine:
    """The reference: the torch module itself, on the runtime's device, fp32 or bf16 autocast per the switch."""

    name = "eager"
    concurrency = 1
    owns_cores = False  # torch runs the model: its threads are the model's

    def __init__(self, extractor: TapExtractor, runtime: Runtime, inputs: BatchInputs | None = None) -> None:
        self.extractor = runtime.prepare(extractor)
        self.runtime = runtime
        self.inputs = inputs

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
            x = self.runtime.to_device(x, self.inputs)  # a uint8 batch is normalised in fp32, outside autocast
            with self.runtime.autocast():
                outs = self.extractor(x)
        return [o.float().cpu().numpy() for o in outs]


class OnnxEngine:
    """The extractor exported to ONNX with its hooks in place, run by ONNX Runtime's CPU provider.

    Args:
        extractor: the tapped model.
        example: a preprocessed batch (uint8 ones are finished by ``inputs``) to trace the export with.
        threads: the cores to use; None takes torch's thread count.
        parallel: ``operators``: one run at a time, every operator split over ``threads`` intra-op threads, which meet
            at a barrier after each operator; ``batches``: one session with a single intra-op thread, run from
            ``threads`` threads at once on different batches (ONNX Runtime's ``run`` may be called concurrently and
            releases the GIL), so a thread whose core a busy neighbour takes delays its own batch and no other.
        inputs: what finishes uint8 batches on the host.
    """

    def __init__(self, extractor: TapExtractor, example: torch.Tensor, threads: int | None = None, parallel: str = "operators",
                 inputs: BatchInputs | None = None) -> None:
        import onnxruntime as ort

        check_choice("parallel", parallel, PARALLEL)
        cores = threads or max(1, torch.get_num_threads())
        self.concurrency = cores if parallel == "batches" else 1
        self.name = "onnx" if parallel == "operators" else "onnx-batches"
        # ONNX Runtime has its own threads for the model; torch only decodes and stacks batches around it, where a
        # second OpenMP thread gains little and, on a busy machine, stalls at every barrier: see BatchRunner.
        self.owns_cores = True
        self.inputs = inputs
        example = self._finished(example)
        n_out = extractor.n_outputs
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
            options.intra_op_num_threads = cores if self.concurrency == 1 else 1
            options.inter_op_num_threads = 1
            # Idle threads sleep instead of spinning, leaving the cores to DataLoader workers between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def _finished(self, x: torch.Tensor) -> torch.Tensor:
        return self.inputs.finish(x) if self.inputs is not None else x

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        outs = self.session.run(None, {"images": np.ascontiguousarray(self._finished(x).numpy(), dtype=np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outs]


def _max_rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(y)))) for x, y in zip(a, b))


def make_engine(kind: str, extractor: TapExtractor, runtime: Runtime, example: torch.Tensor, *, parallel: str = "operators",
                inputs: BatchInputs | None = None) -> Engine:
    """Build the engine: ``eager``, ``onnx``, or ``auto`` (ONNX Runtime on a plain-fp32 CPU run when installed
    and when its features on ``example`` match eager within ``ONNX_TOLERANCE``; eager otherwise).

    Args:
        parallel: how ONNX Runtime uses the cores (:class:`OnnxEngine`); the eager engine ignores it.
        inputs: what made the batches, needed for uint8 ones.

    Raises:
        ValueError: ``onnx`` asked for where it cannot run, or an unknown engine or parallel mode.
    """
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
    check_choice("parallel", parallel, PARALLEL)
    eager = EagerEngine(extractor, runtime, inputs)
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
        fast = OnnxEngine(extractor, example, parallel=parallel, inputs=inputs)
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

    Iterating yields ``(positions, features, bad)`` per batch, in the loader's order, with ``features`` one array per
    tap (None when no image of the batch could be read) and ``bad`` the ``(position, reason)`` of unreadable images.
    The engine is built on the first readable batch, which it is checked against; ``engine`` names it afterwards. An
    engine that runs several batches at once (``parallel="batches"``) gets that many from a thread pool while the
    loader makes the next; the results still come out in order.

    Args:
        loader: yields what :func:`pipeline.data.collate_batch` (or ``inputs.collate``) makes; a batch whose JPEGs
            are still encoded is decoded on the runtime's device by ``inputs`` first, and the files it cannot decode
            join the unreadable ones.
        extractor: the tapped model.
        kind: ``auto``, ``eager`` or ``onnx``.
        runtime: where and how the model runs.
        on_error: ``fail`` raises on the first batch with an unreadable image, naming it with ``name``; ``skip``
            passes them on in ``bad``.
        name: the path of an image by position, for messages.
        parallel: how ONNX Runtime uses the cores: ``operators`` or ``batches`` (:class:`OnnxEngine`).
        inputs: what made the batches (:meth:`Runtime.inputs`); needed when they are uint8.
        engine: an engine built by an earlier runner over the same ``extractor`` and settings, used as it is.
    """

    def __init__(self, loader: Iterable, extractor: TapExtractor, kind: str, runtime: Runtime, *, on_error: str = "fail",
                 name: Callable[[int], str] = str, parallel: str = "operators", inputs: BatchInputs | None = None,
                 engine: Engine | None = None) -> None:
        self.loader, self.extractor, self.kind, self.runtime = loader, extractor, kind, runtime
        self.on_error, self.name, self.parallel, self.inputs = on_error, name, parallel, inputs
        self.engine: Engine | None = engine

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[np.ndarray] | None, list[tuple[int, str]]]]:
        pending: deque[tuple[np.ndarray, Future | list[np.ndarray] | None, list[tuple[int, str]]]] = deque()
        pool: ThreadPoolExecutor | None = None
        held, narrowed = ExitStack(), False
        try:
            for batch in self.loader:
                index, x, bad = self.inputs.decode(batch, self.runtime.device) if self.inputs is not None else batch
                if bad and self.on_error == "fail":
                    i, why = bad[0]
                    raise ValueError(f"{self.name(i)}: {why}; fix or remove the file, or pass --on-error skip")
                features: Future | list[np.ndarray] | None = None
                if x is not None:
                    if self.engine is None:
                        self.engine = make_engine(self.kind, self.extractor, self.runtime, x[:2], parallel=self.parallel, inputs=self.inputs)
                    if self.engine.owns_cores and not narrowed:
                        # The engine has the cores; torch's work in this process (decoding, transforms, stacking
                        # batches) runs on one thread. Measured with two busy neighbours on 2 cores
                        # (bench/busy_bench.py): 0.26x of quiet throughput with torch on 2 threads, above 0.4x on one.
                        held.enter_context(torch_threads(1))
                        narrowed = True
                    if pool is None and self.engine.concurrency > 1:
                        pool = ThreadPoolExecutor(self.engine.concurrency, thread_name_prefix="pipeline-engine")
                    features = pool.submit(self.engine, x) if pool else self.engine(x)
                pending.append((index, features, bad))
                # One batch more than the threads, so that a thread that finishes finds the next batch waiting.
                while len(pending) > (self.engine.concurrency if pool else 0):
                    yield _done(pending.popleft())
            while pending:
                yield _done(pending.popleft())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            held.close()


def _done(item: tuple[np.ndarray, Future | list[np.ndarray] | None, list[tuple[int, str]]]) -> tuple[np.ndarray, list[np.ndarray] | None, list[tuple[int, str]]]:
    """A pending batch with its features computed (waiting for them when a thread runs it)."""
    index, features, bad = item
    return index, features.result() if isinstance(features, Future) else features, bad
