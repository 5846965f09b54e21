"""Stage two: fit a head on cached train features, choosing its hyper-parameter on the val split."""

from __future__ import annotations

import hashlib
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from sklearn.pipeline import Pipeline

from . import caveats, layout, provenance
from .artifacts import feature_identity, save_head
from .files import file_sha256
from .cache import FeatureCache, read_cache
from .config import AUTO_TAP, JOIN, ExtractConfig, HeadConfig, tap_parts
from .resources import available_memory, human_size
from .validate import expect_instance
from .data import stratified_subset
from .extract import locate_cache
from .files import file_lock, remove_stale_temps
from .heads import HEADS, build_head, decision_logits, has_probabilities, in_row_blocks
from .stats import fit_temperature
from .sweep import run_sweep, run_sweep_streaming

__all__ = ["HeadConfig", "FitResult", "fit_head", "locate_head", "load_split_features", "check_compatible", "check_disjoint", "paths_digest"]


# Raised when a head's metadata gains what older heads lack (2: the temperature of its probabilities, its warnings), so that those
# are fitted again rather than reused without it. They still load and predict, with a temperature of 1.
_RECORD = 2


@dataclass
class FitResult:
    """A fitted head: where it was saved, what was chosen, and the whole sweep.

    ``status`` is ``fitted``, or ``up-to-date`` when a head fitted with the same settings on the same caches
    was found and reused. ``warnings`` say where its numbers cannot mean much (:mod:`pipeline.caveats`).
    """

    path: Path
    clf: str
    param: str
    value: Any
    val_accuracy: float
    fit_seconds: float
    sweep: list[dict] = field(default_factory=list)
    status: str = "fitted"
    warnings: list[str] = field(default_factory=list)
    tap: str | None = None
    taps: list[dict] = field(default_factory=list)


def locate_head(clf: str, subset: int | None = None, source: ExtractConfig | None = None) -> Path:
    """The metadata file of the head ``fit_head`` saves by default for these extract settings: ``--clf`` lookup.

    ``clf`` may also name a head within the heads folder, e.g. ``subset-100/linear``.
    """
    train = locate_cache(replace(source or ExtractConfig(), split="train"))
    return layout.head_files(layout.head_base(train, clf, subset)).meta


def check_compatible(train: FeatureCache, val: FeatureCache, tap: str) -> None:
    """Refuse a train/val pair that disagrees on backbone, weights, tap, preprocessing or classes."""
    a, b = feature_identity(train.attrs), feature_identity(val.attrs)
    diff = [f"{k}: train {a.get(k)!r}, val {b.get(k)!r}" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
    if train.classes != val.classes:
        diff.append(f"classes: train {train.classes}, val {val.classes}")
    diff += [f"tap {t!r}: not in val ({', '.join(val.taps)})" for t in tap_parts(tap) if t not in val.taps]
    if diff:
        raise ValueError(f"{train.path} and {val.path} do not match: {'; '.join(diff)}")


def check_disjoint(caches: dict[str, FeatureCache], *, allow: bool = False, hint: str = "", against: str | None = None) -> list[str]:
    """Refuse splits that share images: a head chosen or scored on images it was fitted on reports a flattering,
    wrong accuracy.

    Images are compared by path under the dataset folder each cache records (:meth:`FeatureCache.members`);
    two caches of the same file always overlap.

    Args:
        caches: the caches by the role they play, e.g. ``{"train": ..., "val": ...}``.
        allow: warn instead of refusing.
        hint: what to do about it, appended to the message.
        against: compare only the pairs that include this role (e.g. ``test``); None compares every pair.

    Returns:
        One line per pair of caches that share images (empty when all are disjoint); each is also a warning.

    Raises:
        ValueError: shared images, naming how many and one of them, unless ``allow``.
    """
    members = {role: cache.members() for role, cache in caches.items()}
    roles = list(caches)
    found = []
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            if against is not None and against not in (a, b):
                continue
            ca, cb = caches[a], caches[b]
            if ca.path.resolve() == cb.path.resolve():
                found.append(f"the {a} and {b} caches are the same file, {ca.path} ({len(ca)} images)")
                continue
            if members[a] is None or members[b] is None:
                continue
            shared = set(members[a]).intersection(members[b])
            if shared:
                found.append(f"{ca.path} ({a}) and {cb.path} ({b}) share {len(shared)} images "
                             f"({len(shared) / max(1, min(len(ca), len(cb))):.0%} of the smaller), e.g. {min(shared)}")
    if found and not allow:
        raise ValueError("; ".join(found) + (f"; {hint}" if hint else ""))
    for line in found:
        warnings.warn(f"{line} (allowed)", stacklevel=2)
    return found


def tap_candidates(taps: list[str]) -> list[str]:
    """What ``--tap auto`` lets val choose among: each tap of the cache, then all of them joined."""
    return [*taps, JOIN.join(taps)] if len(taps) > 1 else list(taps)


def load_split_features(cache: FeatureCache, tap: str, what: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a cache (of its sorted ``rows`` only, when given), checked: not empty, finite.

    Raises:
        ValueError: an empty split, or NaN/inf features.
    """
    if len(cache) == 0:
        raise ValueError(f"the {what} split in {cache.path} is empty")
    if rows is None:
        X, y, where = cache.features(tap).astype(np.float32, copy=False), cache.labels, np.arange(len(cache))
    else:
        # HDF5 reads a long list of rows one selection at a time: most of a split is faster read whole.
        data = cache.features(tap) if 4 * len(rows) > len(cache) else cache.dataset(tap)
        X, y, where = data[np.asarray(rows)].astype(np.float32, copy=False), cache.labels[rows], np.asarray(rows)
    bad = ~np.isfinite(X.reshape(len(X), -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"{cache.path} has NaN or inf features in {int(bad.sum())} of {len(X)} rows (first: {cache.paths[int(where[np.argmax(bad)])]})")
    return X, y


def _reusable(base: Path, inputs: dict) -> FitResult | None:
    """The head saved at ``base`` when it was fitted from exactly ``inputs`` and its artifact is intact, else None."""
    files = layout.head_files(base)
    meta = provenance.current_record(files.meta, inputs)
    try:
        # A head in a format no longer loaded (a joblib pickle) is fitted again rather than reused.
        if meta is None or Path(meta["artifact"]).suffix not in (".pt", ".skops"):
            return None
        if file_sha256(files.meta.with_name(meta["artifact"]), remember=True) != meta["artifact_sha256"]:
            return None
        return FitResult(files.meta, meta["clf"], meta["param"], meta["value"], meta["val_accuracy"], meta["fit_seconds"], meta["sweep"],
                         "up-to-date", list(meta.get("warnings", [])), meta.get("tap"), list(meta.get("taps_tried", [])))
    except (OSError, KeyError, TypeError):
        return None


def fit_head(config: HeadConfig | None = None, source: ExtractConfig | None = None, *, out: str | Path | None = None,
             refit: bool = False, log: Callable[[str], None] | None = None, allow_overlap: bool = False) -> FitResult:
    """Fit one head on the train cache, sweeping its hyper-parameter on the val cache, and save it.

    A head already saved at the destination, fitted with the same settings on the same caches, is reused
    (status ``up-to-date``) unless ``refit``.

    Args:
        config: the head settings; defaults to ``HeadConfig()``.
        source: the extract settings that locate the caches; defaults to ``ExtractConfig()``.
        out: where to save (without suffix); defaults to ``<cache folder>/heads/<clf>``, or
            ``<cache folder>/heads/subset-<N>/<clf>`` for a head fitted on N images per class.
        refit: fit even when an up-to-date head exists.
        log: called with a line per fitted value of the sweep, as it finishes (progress).
        allow_overlap: fit even when train and val share images, with a warning (recorded in the metadata).

    The head is locked before the fit (:func:`~pipeline.files.file_lock`): a second process fitting the same head
    stops at once with :class:`~pipeline.files.BusyError` instead of sweeping for nothing.

    Returns:
        The fit: saved path, chosen value, val accuracy, time, and the sweep.

    Raises:
        ValueError: missing, incomplete or mismatched caches, train and val that share images, a single class,
            NaN/inf features, an empty split, or val classes that train lacks.
        BusyError: another process is writing this head.
    """
    config = HeadConfig() if config is None else config
    source = ExtractConfig() if source is None else source
    expect_instance("fit_head's config", config, HeadConfig)
    expect_instance("fit_head's source", source, ExtractConfig)
    train_path = Path(config.train_cache) if config.train_cache else locate_cache(replace(source, split="train"))
    val_path = Path(config.val_cache) if config.val_cache else locate_cache(replace(source, split="val"))
    excluded = _excluded(config, train_path)
    base = Path(out) if out else layout.head_base(train_path, config.clf, config.subset, None if excluded is None else len(excluded))
    t0 = time.perf_counter()
    with ExitStack() as held:
        with read_cache(train_path) as train, read_cache(val_path) as val:
            overlap = check_disjoint({"train": train, "val": val}, allow=allow_overlap, hint=(
                "a hyper-parameter chosen on images the head was fitted on is not chosen at all; extract both splits with the same "
                "--split-seed and --val-fraction, or pass --allow-overlap to fit anyway"))
            inputs = {"config": asdict(config), "train": train.identity, "val": val.identity, "pipeline": provenance.PIPELINE_VERSION,
                      "record": _RECORD}
            if excluded is not None:  # which images were left out, not only how they were named
                inputs["excluded"] = paths_digest([f"{split}\t{path}" for split, path in excluded])
            if not refit:
                reused = _reusable(base, inputs)
                if reused is not None:
                    return reused
            candidates = tap_candidates(train.taps) if config.tap == AUTO_TAP else [config.tap or train.taps[0]]
            datasets = {tap: train.dataset(tap) for tap in candidates}  # a tap (or a part of a joined one) that train lacks is refused here
            for tap in candidates:
                check_compatible(train, val, tap)
            val_rows = train_rows = None
            if excluded is not None:
                val_rows, train_rows = (_kept(c.paths, {p for s, p in excluded if s == split}) for c, split in ((val, "val"), (train, "train")))
                if len(val_rows) == 0:
                    raise ValueError(f"leaving out the {len(excluded)} most suspect images leaves no val image in {val.path}")
            val_features = _load_candidates(val, candidates, "val", val_rows)
            yv = val.labels if val_rows is None else val.labels[val_rows]
            yt = train.labels if train_rows is None else train.labels[train_rows]
            if len(yt) == 0:
                raise ValueError(f"the train split in {train.path} is empty")
            present = np.unique(yt)
            if len(present) < 2:
                raise ValueError(f"the train split in {train.path} has a single class ({train.classes[int(present[0])]}); a classifier needs two or more")
            missing = sorted(set(np.unique(yv).tolist()) - set(present.tolist()))
            if missing:
                raise ValueError(f"the val split has classes the train split lacks: {[train.classes[i] for i in missing]}")
            absent = [c for i, c in enumerate(train.classes) if i not in set(present.tolist())]
            if absent:
                raise ValueError(f"the train split has no images of class(es) {absent}; a head cannot learn a class it never sees")
            classes, train_attrs, val_fingerprint = train.classes, train.attrs, val.attrs.get("dataset_fingerprint")
            features = datasets[candidates[0]]  # streamed, when it is the only candidate and larger than the budget
            rows = train_rows if config.subset is None else (train_rows if train_rows is not None else np.arange(len(yt)))[stratified_subset(yt, config.subset, config.seed)]
            subset = None
            if config.subset is not None:
                paths = train.paths  # read once: each .paths reads every path from the file
                subset = {"per_class": config.subset, "seed": config.seed, "rows": len(rows), "paths_sha256": paths_digest([paths[i] for i in rows])}
            if len(candidates) > 1 and config.stream:
                raise ValueError("--tap auto compares the taps in memory; drop --stream, or name one tap with --tap")
            if any(JOIN in tap for tap in candidates) and config.pool != "avg":
                raise ValueError(f"joined taps are averaged over space; --pool {config.pool} applies to one tap: name it with --tap")
            if len(candidates) > 1:  # every tap's train features are loaded before the first fit (the joined one is made from them)
                need, free = sum(d.nbytes for tap, d in datasets.items() if JOIN not in tap), available_memory()
                if free is not None and need > free:
                    raise ValueError(f"--tap auto loads {human_size(need)} of train features for its {len(candidates)} candidates, more than the "
                                     f"{human_size(free)} of memory available; name one tap with --tap")
            stream = rows is None and len(candidates) == 1 and (config.stream if config.stream is not None else features.nbytes > config.memory_budget_mb * 2**20)
            if not stream:
                train_features = _load_candidates(train, candidates, "train", rows)
                yt = train.labels if rows is None else train.labels[rows]
            held.enter_context(_writing(base))  # once the inputs are known to be good: a refused fit leaves nothing behind
            if stream:
                tap = candidates[0]
                value, pipe, sweep = run_sweep_streaming(config, features, yt, val_features[tap], yv, str(train.path), log)
                train_acc, tried = None, []
        if not stream:
            tried, best = [], None
            for tap in candidates:
                fitted = _fit_in_memory(config, train_features.pop(tap), yt, val_features[tap], yv, log)
                accuracy = max(s["val_accuracy"] for s in fitted[2] if "val_accuracy" in s)
                tried.append({"tap": tap, "val_accuracy": accuracy, "value": fitted[0]})
                if len(candidates) > 1 and log is not None:
                    log(f"  tap {tap}: val accuracy {accuracy:.4f} ({HEADS[config.clf].param}={fitted[0]:g})")
                if best is None or accuracy > best[0]:  # a tie keeps the earlier tap: the cache's first is the default
                    best = (accuracy, tap, fitted)
            _, tap, (value, pipe, sweep, train_acc) = best
            tried = tried if len(candidates) > 1 else []
        Xv = val_features[tap]
        clf = pipe.steps[-1][1]
        # Probabilities that mean the same for every head: those made from decision values get a temperature, chosen on val.
        temperature = None if has_probabilities(pipe) else fit_temperature(decision_logits(pipe, Xv), np.searchsorted(clf.classes_, yv))
        seconds = time.perf_counter() - t0
        spec = HEADS[config.clf]
        val_acc = max(s["val_accuracy"] for s in sweep if "val_accuracy" in s)
        notes = [*caveats.few_images(yv, classes, "val"), *caveats.at_chance(train_acc, len(classes)),
                 *caveats.tied_sweep(sweep, spec.param, value)]
        meta = {
            "clf": config.clf, "description": spec.description, "param": spec.param, "value": value, "val_accuracy": val_acc,
            "train_accuracy": train_acc, "temperature": temperature, "fit_seconds": seconds, "sweep": sweep, "streamed": stream,
            "config": asdict(config), "preprocessing": config.preprocessing or spec.preprocessing, "tap": tap, "classes": classes,
            "features": feature_identity(train_attrs), "extract_settings": train_attrs.get("settings", {}),
            "train_cache": {"path": str(train_path.resolve()), "dataset_fingerprint": train_attrs.get("dataset_fingerprint"), "rows": len(yt)},
            "val_cache": {"path": str(val_path.resolve()), "dataset_fingerprint": val_fingerprint, "rows": len(yv)}, "subset": subset,
            "overlap": overlap, "warnings": notes, "taps_tried": tried,
            "excluded": None if excluded is None else {"images": len(excluded), "train": sum(s == "train" for s, _ in excluded),
                                                       "val": sum(s == "val" for s, _ in excluded), "list": config.exclude or "audit/label_issues.csv"},
            **provenance.stamp(inputs),
        }
        path = save_head(pipe, meta, base)
        if config.clf == "linear":
            provenance.write_history(clf.history_, layout.head_files(base).history)
    return FitResult(path, config.clf, spec.param, value, val_acc, seconds, sweep, warnings=notes, tap=tap, taps=tried)


def _load_candidates(cache: FeatureCache, candidates: list[str], what: str, rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each candidate tap's features (of ``rows``): read from the cache, or, for taps joined from candidates read
    before them (``--tap auto``'s last), joined from those arrays rather than read again."""
    from .taps import joined

    out: dict[str, np.ndarray] = {}
    for tap in candidates:
        parts = tap_parts(tap)
        known = len(parts) > 1 and all(p in out for p in parts)
        out[tap] = joined([out[p] for p in parts]) if known else load_split_features(cache, tap, what, rows)[0]
    return out


def _fit_in_memory(config: HeadConfig, Xt: np.ndarray, yt: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
                   log: Callable[[str], None] | None) -> tuple[Any, Pipeline, list[dict], float]:
    """The sweep on arrays in memory: the chosen value, the fitted pipeline, the sweep and the train accuracy."""
    pre = Pipeline(build_head(config.clf, HEADS[config.clf].grid[0], preprocessing=config.preprocessing, pca=config.pca, pool=config.pool, seed=config.seed).steps[:-1])
    # Preprocessing does not depend on the swept value: fit it once, sweep on the transformed arrays.
    Zt = pre.fit_transform(Xt, yt).astype(np.float32, copy=False)
    Zv = pre.transform(Xv).astype(np.float32, copy=False)
    value, clf, sweep = run_sweep(config.clf, config, Zt, yt, Zv, yv, log)
    return value, Pipeline([*pre.steps, ("clf", clf)]), sweep, _train_accuracy(clf, Zt, yt, config.seed)


# Train rows scored for the at-chance check: enough to tell chance from learning within a point or two, and a
# prediction of the whole train split costs an RBF SVM or k-NN on 54,000 rows a minute or more.
_TRAIN_SCORED = 2000


def _train_accuracy(clf: Any, Z: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Accuracy on the train rows (on a seeded sample of :data:`_TRAIN_SCORED` of them when there are more)."""
    if len(y) > _TRAIN_SCORED:
        rows = np.sort(np.random.default_rng(seed).choice(len(y), _TRAIN_SCORED, replace=False))
        Z, y = Z[rows], y[rows]
    return float((in_row_blocks(clf, "predict", Z) == y).mean())


@contextmanager
def _writing(base: Path) -> Iterator[None]:
    """Hold the lock of the head at ``base`` (its folder made first) and clear what killed writers left of it."""
    files = layout.head_files(base)
    files.base.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(files.meta):
        remove_stale_temps(files.history)
        yield


def _excluded(config: HeadConfig, train_path: Path) -> list[tuple[str, str]] | None:
    """The (split, path) of the images an audit's ``label_issues.csv`` says to leave out, or None when none are."""
    if config.exclude is None and config.exclude_top is None:
        return None
    from .audit import suspects

    listing = Path(config.exclude) if config.exclude else layout.audit_files(layout.audit_dir(train_path)).label_issues
    return suspects(listing, config.exclude_top)


def _kept(paths: list[str], drop: set[str]) -> np.ndarray:
    """Sorted positions of the paths not in ``drop``."""
    return np.asarray([i for i, p in enumerate(paths) if p not in drop], dtype=np.int64)


def paths_digest(paths: list[str]) -> str:
    """sha256 of a list of image paths, in order: equal digests mean the same images."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()
