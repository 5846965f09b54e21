"""The val sweep: a head fitted for each value of its hyper-parameter's grid, then CLIP-style halving refinements
around the best; the value with the best val accuracy is kept. In memory, or streamed for caches larger than it."""

from __future__ import annotations

import copy
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from .config import HeadConfig
from .heads import HEADS, SpatialPool, build_head
from .resources import usable_cores

__all__ = ["run_sweep", "run_sweep_streaming", "search"]


def run_sweep(clf_name: str, config: HeadConfig, Xt: np.ndarray, yt: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
           log: Callable[[str], None] | None = None) -> tuple[Any, Any, list[dict]]:
    """Fit the head for each value of its grid on preprocessed train features; keep the best on val.

    Ensembles swept on their size (trees, boosting iterations) grow: a larger value continues a copy of the
    previous fit with ``warm_start`` instead of starting over, so the sweep costs one fit of the largest value.
    """
    spec = HEADS[clf_name]
    grows = not spec.log and "warm_start" in spec.make(spec.grid[0], config.seed).get_params()
    last: list[Any] = []

    def trial(value: Any) -> Any:
        if grows and last and value > last[0].get_params()[spec.param]:
            # A copy, so that the smaller ensemble stays intact should it be the best.
            clf = copy.deepcopy(last[0]).set_params(warm_start=True, **{spec.param: value})
        else:
            clf = build_head(clf_name, value, seed=config.seed).steps[-1][1]
        if clf_name == "linear":
            clf.set_params(epochs=config.epochs)
            return clf.fit(Xt, yt, eval_set=(Xv, yv))
        clf.fit(Xt, yt)
        last[:] = [clf]
        return clf

    def usable(value: Any) -> str | None:
        if clf_name == "knn" and value > len(yt):
            return f"more neighbours than the {len(yt)} train rows"
        return None

    workers = usable_cores() if spec.one_core else 1
    value, clf, sweep = search(clf_name, config, trial, lambda clf: float((clf.predict(Xv) == yv).mean()), usable, log, workers)
    if grows:
        clf.set_params(warm_start=False)  # a refit of the saved head starts afresh
    return value, clf, sweep


def run_sweep_streaming(config: HeadConfig, features: Any, yt: np.ndarray, Xv: np.ndarray, yv: np.ndarray, where: str,
                   log: Callable[[str], None] | None = None) -> tuple[Any, Pipeline, list[dict]]:
    """The sweep of a streaming head: train features are read block by block, never whole."""
    from .stream import STREAMING_HEADS, block_rows_for, fit_streaming, streaming_scaler

    if config.clf not in STREAMING_HEADS:
        raise ValueError(f"{config.clf} cannot stream a cache this large; use one of {', '.join(STREAMING_HEADS)} or raise --memory-budget-mb")
    preprocessing = config.preprocessing or "standardize"
    if preprocessing not in ("standardize", "none"):
        raise ValueError(f"streaming supports --preprocessing standardize or none, not {preprocessing}")
    pool = SpatialPool(config.pool).fit(features[:1])
    block_rows = block_rows_for(features, config.block_mb * 2**20)
    steps: list[tuple[str, Any]] = [("pool", pool)]
    if preprocessing == "standardize":
        steps.append(("standardize", streaming_scaler(features, block_rows, pool, where)))
    pre = Pipeline(steps)
    Zv = pre.transform(Xv).astype(np.float32)
    classes = np.arange(int(max(yt.max(), yv.max())) + 1)

    def trial(value: Any) -> Any:
        return fit_streaming(config.clf, value, features, yt, classes, (Zv, yv), lambda X: pre.transform(X).astype(np.float32),
                             seed=config.seed, block_rows=block_rows, epochs=config.epochs)

    value, clf, sweep = search(config.clf, config, trial, lambda clf: float((clf.predict(Zv) == yv).mean()), log=log)
    return value, Pipeline([*pre.steps, ("clf", clf)]), sweep


def search(clf_name: str, config: HeadConfig, trial: Any, score: Any, usable: Any = lambda value: None,
           log: Callable[[str], None] | None = None, workers: int = 1) -> tuple[Any, Any, list[dict]]:
    """Grid, then CLIP-style halving refinement on log grids; keep the value with the best val accuracy.

    Args:
        clf_name: the head family.
        config: the grid and the rounds of refinement.
        trial: fits the head for one value.
        score: the val accuracy of a fitted head.
        usable: None for a value that can be tried, else why not (it is reported, not fitted).
        log: called with one line per value as it is done.
        workers: threads that fit the values of one round (the grid, then each refinement's pair) side by side,
            for heads whose solver uses one core and releases the GIL. The result is the same for any number.
    """
    spec = HEADS[clf_name]
    grid = list(config.grid or spec.grid)
    if spec.log and any(float(v) <= 0 for v in grid):
        raise ValueError(f"{spec.param} is swept on a log scale: every --grid value must be positive, got {grid}")
    sweep: list[dict] = []
    best: tuple[float, Any, Any] = (-1.0, None, None)

    def tried(value: Any) -> bool:
        return any(math.isclose(float(s["value"]), float(value), rel_tol=1e-9) for s in sweep)

    def fit_one(value: Any) -> tuple[Any, float, float]:
        t0 = time.perf_counter()
        clf = trial(value)
        return clf, score(clf), time.perf_counter() - t0

    def run_round(values: list) -> None:
        todo = []
        for value in values:
            if tried(value) or any(math.isclose(float(v), float(value), rel_tol=1e-9) for v in todo):
                continue
            why = usable(value)
            if why:
                sweep.append({"value": value, "skipped": why})
                if log:
                    log(f"  {clf_name} {spec.param}={value:<10g} skipped: {why}")
                continue
            todo.append(value)
        if not todo:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if workers > 1 and len(todo) > 1:
                with ThreadPoolExecutor(min(workers, len(todo))) as pool:
                    done = list(pool.map(fit_one, todo))
                # One record for the threads together: which value stopped early is read off its solver.
                for value, result in zip(todo, done):
                    record(value, *result, _stopped_early(result[0]))
            else:
                for value in todo:
                    first = len(caught)
                    result = fit_one(value)
                    record(value, *result, any(issubclass(w.category, ConvergenceWarning) for w in caught[first:]))
        for w in caught:  # the others as they were; a solver that stopped early is a note on its row instead
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def record(value: Any, clf: Any, acc: float, seconds: float, stopped: bool) -> None:
        nonlocal best
        row = {"value": value, "val_accuracy": acc, "seconds": seconds}
        if hasattr(clf, "best_epoch_"):
            row["best_epoch"] = clf.best_epoch_
        if stopped:
            row["converged"] = False
        sweep.append(row)
        if log:
            note = "; the solver stopped at its iteration limit" if stopped else ""
            log(f"  {clf_name} {spec.param}={value:<10g} val acc {acc:.4f}  ({seconds:.1f} s{note})")
        if acc > best[0]:
            best = (acc, value, clf)

    run_round(grid)
    if best[2] is None:
        raise ValueError(f"no {spec.param} value could be tried: {'; '.join(s['skipped'] for s in sweep)}")
    if spec.log and len(grid) > 1:
        step = abs(math.log10(grid[1] / grid[0]))
        for _ in range(config.refine):
            step /= 2
            run_round([float(f"{best[1] * 10**-step:.3g}"), float(f"{best[1] * 10**step:.3g}")])
    sweep.sort(key=lambda s: float(s["value"]))
    return best[1], best[2], sweep


def _stopped_early(clf: Any) -> bool:
    """Whether a solver ran to its iteration limit (liblinear's and libsvm's own test before they warn)."""
    limit, done = getattr(clf, "max_iter", None), getattr(clf, "n_iter_", None)
    return isinstance(limit, int) and limit > 0 and done is not None and int(np.max(done)) >= limit
