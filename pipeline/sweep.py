"""The val sweep: a head fitted for each value of its hyper-parameter's grid, then CLIP-style halving refinements
around the best; the value with the best val accuracy is kept. In memory, or streamed for caches larger than it."""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from .config import HeadConfig
from .heads import HEADS, SpatialPool, build_head

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

    value, clf, sweep = search(clf_name, config, trial, lambda clf: float((clf.predict(Xv) == yv).mean()), usable, log)
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
            log: Callable[[str], None] | None = None) -> tuple[Any, Any, list[dict]]:
    """Grid, then CLIP-style halving refinement on log grids; keep the value with the best val accuracy.

    Args:
        clf_name: the head family.
        config: the grid and the rounds of refinement.
        trial: fits the head for one value.
        score: the val accuracy of a fitted head.
        usable: None for a value that can be tried, else why not (it is reported, not fitted).
        log: called with one line per value as it is done.
    """
    spec = HEADS[clf_name]
    grid = list(config.grid or spec.grid)
    if spec.log and any(float(v) <= 0 for v in grid):
        raise ValueError(f"{spec.param} is swept on a log scale: every --grid value must be positive, got {grid}")
    sweep: list[dict] = []
    best: tuple[float, Any, Any] = (-1.0, None, None)

    def run(value: Any) -> None:
        nonlocal best
        if any(math.isclose(float(s["value"]), float(value), rel_tol=1e-9) for s in sweep):
            return
        why = usable(value)
        if why:
            sweep.append({"value": value, "skipped": why})
            if log:
                log(f"  {clf_name} {spec.param}={value:<10g} skipped: {why}")
            return
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = trial(value)
        unconverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:  # the others as they were; a solver that stopped early is a note on its row instead
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        acc = score(clf)
        row = {"value": value, "val_accuracy": acc, "seconds": time.perf_counter() - t0}
        if hasattr(clf, "best_epoch_"):
            row["best_epoch"] = clf.best_epoch_
        if unconverged:
            row["converged"] = False
        sweep.append(row)
        if log:
            note = "; the solver stopped at its iteration limit" if unconverged else ""
            log(f"  {clf_name} {spec.param}={value:<10g} val acc {acc:.4f}  ({row['seconds']:.1f} s{note})")
        if acc > best[0]:
            best = (acc, value, clf)

    for value in grid:
        run(value)
    if best[2] is None:
        raise ValueError(f"no {spec.param} value could be tried: {'; '.join(s['skipped'] for s in sweep)}")
    if spec.log and len(grid) > 1:
        step = abs(math.log10(grid[1] / grid[0]))
        for _ in range(config.refine):
            step /= 2
            for value in (best[1] * 10**-step, best[1] * 10**step):
                run(float(f"{value:.3g}"))
    sweep.sort(key=lambda s: float(s["value"]))
    return best[1], best[2], sweep
