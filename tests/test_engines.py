"""ONNX Runtime's two ways to use the cores: features equal to the one-session path, batches out in the loader's order."""

from __future__ import annotations

import threading
from typing import Iterator
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import ExtractConfig, extract, load_backbone
from pipeline.engines import BatchRunner, OnnxEngine
from pipeline.runtime import resolve_runtime, torch_threads
from pipeline.taps import TapExtractor, resolve_taps

from bench.faults import cache_rows
from .conftest import tiny


class _SlowEngine:
    """A stand-in engine that runs three batches at once and finishes later batches first, counting the overlap."""

    name = "slow"
    concurrency = 3
    owns_cores = True

    def __init__(self) -> None:
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> list[np.ndarray]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05 / (1 + float(x[0, 0])))  # batch k sleeps 0.05 / (1 + k): the later, the sooner done
        with self.lock:
            self.running -= 1
        return [x.numpy()[:, :1].copy()]


def test_around_an_engine_with_threads_of_its_own_torch_works_on_one_thread_then_gets_its_threads_back() -> None:
    seen = []

    def loader() -> Iterator:
        for k in range(4):
            seen.append(torch.get_num_threads())  # the loader decodes and stacks in this process (no workers)
            yield np.array([k]), torch.full((1, 3), float(k)), []

    with torch_threads(2):
        runner = BatchRunner(loader(), extractor=None, kind="eager", runtime=resolve_runtime("cpu"), engine=_SlowEngine())  # type: ignore[arg-type]
        assert len(list(runner)) == 4
        assert seen == [2, 1, 1, 1] and torch.get_num_threads() == 2
        eager = BatchRunner(loader(), extractor=None, kind="eager", runtime=resolve_runtime("cpu"), engine=_SlowEngine())  # type: ignore[arg-type]
        eager.engine.owns_cores = False
        seen.clear()
        assert len(list(eager)) == 4 and seen == [2, 2, 2, 2]


def test_batch_runner_keeps_the_loaders_order_while_batches_overlap() -> None:
    loader = [(np.array([2 * k, 2 * k + 1]), torch.full((2, 3), float(k)), []) for k in range(7)]
    loader.insert(3, (np.zeros(0, dtype=np.int64), None, [(99, "cannot decode image")]))  # a batch of unreadable images only
    runner = BatchRunner(loader, extractor=None, kind="eager", runtime=resolve_runtime("cpu"), on_error="skip")  # type: ignore[arg-type]
    runner.engine = engine = _SlowEngine()
    out = list(runner)
    assert [index.tolist() for index, _, _ in out] == [index.tolist() for index, _, _ in loader]
    assert [f[0][:, 0].tolist() if f is not None else None for _, f, _ in out] == [[k, k] for k in range(3)] + [None] + [[k, k] for k in range(3, 7)]
    assert out[3][2] == [(99, "cannot decode image")]
    assert engine.most > 1, "batches never overlapped: the engine's concurrency went unused"


def test_batch_runner_stops_at_an_unreadable_image_under_fail_with_batches_in_flight() -> None:
    loader = [(np.array([k]), torch.full((1, 3), float(k)), []) for k in range(4)] + [(np.zeros(0, dtype=np.int64), None, [(4, "empty file")])]
    runner = BatchRunner(loader, extractor=None, kind="eager", runtime=resolve_runtime("cpu"), name=lambda i: f"img{i}.png")  # type: ignore[arg-type]
    runner.engine = _SlowEngine()
    seen = []
    with pytest.raises(ValueError, match=r"img4.png: empty file; fix or remove the file, or pass --on-error skip"):
        for index, _, _ in runner:
            seen.append(int(index[0]))
    assert seen == [0]  # the batches still in flight are dropped, the pool shut down, the error raised


def test_batches_mode_gives_the_one_session_features_batch_for_batch() -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    bb = load_backbone("mobilenet_v2", "none", resize=36, crop=32)
    taps = resolve_taps(bb.model, ("classifier:input", "features.18"), "output")
    batches = [torch.randn(n, 3, 32, 32) for n in (4, 4, 3, 4, 1, 4)]
    loader = [(np.arange(4 * k, 4 * k + len(x)), x, []) for k, x in enumerate(batches)]
    with TapExtractor(bb.model, taps) as extractor, torch_threads(3):
        one_session = OnnxEngine(extractor, batches[0][:2], threads=2)  # operators: 2 intra-op threads
        runner = BatchRunner(loader, extractor, "onnx", resolve_runtime("cpu"), parallel="batches")
        out = list(runner)
    assert runner.engine.name == "onnx-batches" and runner.engine.concurrency == 3  # one lane per torch thread
    assert [index.tolist() for index, _, _ in out] == [index.tolist() for index, _, _ in loader]
    for (_, features, _), x in zip(out, batches):
        for got, want in zip(features, one_session(x)):
            np.testing.assert_array_equal(got, want)  # bit for bit: single-threaded kernels, the same batches


def test_extract_parallel_batches_makes_the_same_cache(image_folder: Path) -> None:
    pytest.importorskip("onnxruntime")
    with torch_threads(2):
        ops = extract(ExtractConfig(data=str(image_folder), split="test", parallel="operators", **tiny(engine="onnx", cache_dir="ops")), progress=False)
        par = extract(ExtractConfig(data=str(image_folder), split="test", **tiny(engine="onnx", cache_dir="par")), progress=False)
    assert (ops.engine, par.engine) == ("onnx", "onnx-batches")
    a, b = cache_rows(ops.path), cache_rows(par.path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # How the cores are used is not part of what a cache is: the other mode finds it up to date.
    again = extract(ExtractConfig(data=str(image_folder), split="test", parallel="batches", **tiny(engine="onnx", cache_dir="ops")), progress=False)
    assert again.status == "up-to-date"


def test_unknown_parallel_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parallel must be one of operators, batches, got 'threads'"):
        ExtractConfig(parallel="threads")
