"""The audit: label issues (out-of-fold probabilities ranked by cleanlab), duplicates and leakage across splits, outliers.

Everything works on the cached features, so a dataset of tens of thousands of images is audited in minutes on a CPU.
The results are CSV files that other tools read (``layout.AuditFiles`` names them), and ``summary.json``, written
last, which also makes a re-run with the same settings and caches free.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import layout, provenance
from .config import SPLITS, AuditConfig, ExtractConfig, HeadConfig
from .files import atomic_write

__all__ = ["AuditConfig", "AuditResult", "audit", "out_of_fold_probabilities", "rank_label_issues", "suspects", "leaked_test_paths",
           "LABEL_COLUMNS", "DUPLICATE_COLUMNS", "OUTLIER_COLUMNS"]

LABEL_COLUMNS = ("path", "split", "given", "suggested", "score")
DUPLICATE_COLUMNS = ("path_a", "split_a", "path_b", "split_b", "similarity", "kind")
OUTLIER_COLUMNS = ("path", "split", "score")
_FORMAT = "pipeline-audit"


@dataclass
class AuditResult:
    """A finished audit: its folder and files, and ``summary`` (what ``summary.json`` holds).

    ``status`` is ``audited``, or ``up-to-date`` when an audit of the same caches with the same settings was reused.
    """

    files: layout.AuditFiles
    summary: dict
    status: str = "audited"

    @property
    def dir(self) -> Path:
        return self.files.dir


# ---------------------------------------------------------------- label issues


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, config: AuditConfig, value: Any,
                              log: Callable[[str], None] | None = None) -> np.ndarray:
    """Each row's class probabilities from a head fitted on the other folds (stratified K-fold).

    The preprocessing (pooling, standardisation, PCA) is fitted once on every row: it never sees a label, so the
    probabilities stay out of sample for the labels, and the folds cost only the classifier's fits.

    Args:
        X: features (N x D or N x C x H x W).
        y: class indices.
        n_classes: the number of classes (columns of the result).
        config: the head, its preprocessing, the folds and the seed.
        value: the head's hyper-parameter.
        log: called with one line per fold.
    """
    from sklearn.model_selection import StratifiedKFold

    from .heads import build_head, head_probabilities

    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    head = build_head(config.clf, value, preprocessing=config.preprocessing, pca=config.pca, pool=config.pool, seed=config.seed)
    if config.clf == "linear":
        head.set_params(clf__epochs=HeadConfig().epochs)
    t0 = time.perf_counter()
    Z = Pipeline(head.steps[:-1]).fit_transform(X).astype(np.float32, copy=False)
    if log:
        log(f"  preprocessing ({' + '.join(name for name, _ in head.steps[:-1])}): {Z.shape[1]} features ({time.perf_counter() - t0:.1f} s)")
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    P = np.zeros((len(y), n_classes), dtype=np.float64)
    for k, (fit_rows, held_out) in enumerate(folds.split(np.zeros(len(y)), y), 1):
        t0 = time.perf_counter()
        clf = clone(head.steps[-1][1]).fit(Z[fit_rows], y[fit_rows])
        P[np.ix_(held_out, np.asarray(clf.classes_, dtype=np.int64))] = head_probabilities(clf, Z[held_out])
        if log:
            acc = float((P[held_out].argmax(1) == y[held_out]).mean())
            log(f"  fold {k}/{config.folds}: {config.clf} on {len(fit_rows):,} images, accuracy {acc:.4f} on the other {len(held_out):,} "
                f"({time.perf_counter() - t0:.1f} s)")
    return P


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Rank images by how likely their given label is wrong, with cleanlab (confident learning).

    Returns:
        ``order`` (the flagged images first, then the rest, each by ascending score), ``score`` (cleanlab's
        self-confidence label quality: near 0 for a label the head finds unlikely, near 1 for a sure one), ``flagged``
        (cleanlab's ``find_label_issues``, pruned by the estimated noise rate) and the estimated noise rate (one minus
        the trace of the calibrated confident joint).
    """
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.clip(pred_probs, 0.0, 1.0)
    pred_probs = pred_probs / np.maximum(pred_probs.sum(axis=1, keepdims=True), 1e-12)
    flagged = np.asarray(find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1), dtype=bool)
    score = np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), dtype=np.float64)
    noise = float(1.0 - np.trace(estimate_joint(labels, pred_probs)))
    return np.lexsort((score, ~flagged)), score, flagged, noise


def _head_value(config: AuditConfig, train: Any, val: Any, files: layout.AuditFiles, log: Callable[[str], None] | None) -> tuple[Any, str]:
    """The head's hyper-parameter: given, or the one fit-head chose on val (its saved head, else one fitted into the audit folder)."""
    from .fit import fit_head

    if config.value is not None:
        return config.value, "given"
    saved = _saved_head(config, train, val)
    if saved is not None:
        return saved["value"], f"chosen on val by {layout.head_base(train.path, config.clf)}.json"
    if log:
        log(f"  choosing the {config.clf} hyper-parameter on val (no up-to-date {config.clf} head beside the caches)")
    head = HeadConfig(clf=config.clf, tap=config.tap, preprocessing=config.preprocessing, pca=config.pca, pool=config.pool,
                      seed=config.seed, train_cache=str(train.path), val_cache=str(val.path))
    fit = fit_head(head, out=files.dir / "head" / config.clf, log=log)
    return fit.value, f"chosen on val by {fit.path}"


def _saved_head(config: AuditConfig, train: Any, val: Any | None) -> dict | None:
    """The metadata of ``heads/<clf>.json`` when it was fitted on these caches with this audit's preprocessing, else None."""
    if val is None:
        return None
    meta = provenance.read_record(layout.head_files(layout.head_base(train.path, config.clf)).meta)
    if meta is None or not isinstance(meta.get("inputs"), dict) or not isinstance(meta.get("config"), dict):
        return None
    c, inputs = meta["config"], meta["inputs"]
    ours = {"tap": config.tap, "preprocessing": config.preprocessing, "pca": config.pca, "pool": config.pool, "seed": config.seed,
            "subset": None, "exclude": None, "exclude_top": None}
    if any(c.get(k) != v for k, v in ours.items()) or meta.get("clf") != config.clf:
        return None
    if not provenance.same(inputs.get("train"), train.identity) or not provenance.same(inputs.get("val"), val.identity):
        return None
    return meta if "value" in meta else None


# ---------------------------------------------------------------- the audit


def _locate(config: AuditConfig, source: ExtractConfig) -> dict[str, Path]:
    """The caches to audit, by split: train, and val and test where they exist."""
    from .extract import locate_cache

    given = {"train": config.train_cache, "val": config.val_cache, "test": config.test_cache}
    out = {}
    for split in SPLITS:
        path = Path(given[split]) if given[split] else locate_cache(replace(source, split=split))
        if split == "train" or given[split] or path.is_file():
            out[split] = path
    return out


def _csv(rows: list[tuple], header: tuple[str, ...]) -> bytes:
    text = io.StringIO(newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return text.getvalue().encode()


def audit(config: AuditConfig | None = None, source: ExtractConfig | None = None, *, force: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None) -> AuditResult:
    """Audit a dataset on its cached features; write ``label_issues.csv``, ``duplicates.csv``, ``outliers.csv`` and
    ``summary.json`` into ``audit/`` beside the caches (or ``config.output``).

    An audit of the same caches with the same settings is reused (status ``up-to-date``) unless ``force``.

    Args:
        config: the audit settings; defaults to ``AuditConfig()``.
        source: the extract settings that locate the caches; defaults to ``ExtractConfig()``.
        force: audit even when an up-to-date audit exists.
        progress: show progress bars for the hashing and the duplicate search.
        log: called with a line per step (progress), e.g. ``print``.

    Raises:
        ValueError: missing, incomplete or mismatched caches, or too few images of a class for the folds.
    """
    from .cache import read_cache
    from .duplicates import outlier_scores
    from .fit import check_compatible

    config = config or AuditConfig()
    source = source or ExtractConfig()
    say = log or (lambda line: None)
    located = _locate(config, source)
    files = layout.audit_files(Path(config.output) if config.output else layout.audit_dir(located["train"]))
    t_start = time.perf_counter()
    with ExitStack() as stack:
        caches = {split: stack.enter_context(read_cache(path)) for split, path in located.items()}
        train, val = caches["train"], caches.get("val")
        tap = config.tap or train.taps[0]
        if tap not in train.taps:
            raise ValueError(f"{train.path} has no tap {tap!r}; it holds {', '.join(train.taps)} (the audit takes one of them, not joined taps)")
        for other in caches.values():
            if other is not train:
                check_compatible(train, other, tap)
        if val is None and config.value is None:
            raise ValueError(f"no val cache beside {train.path} to choose the {config.clf} hyper-parameter on; give --value")
        saved = _saved_head(config, train, val) if config.value is None else None
        inputs = {"config": asdict(config), "caches": {s: c.identity for s, c in caches.items()},
                  "head": None if saved is None else {"created": saved.get("created"), "value": saved.get("value")},
                  "pipeline": provenance.PIPELINE_VERSION}
        if not force:
            record = provenance.current_record(files.summary, inputs, files.label_issues, files.duplicates, files.outliers)
            if record is not None and record.get("format") == _FORMAT:
                return AuditResult(files, record, "up-to-date")
        files.dir.mkdir(parents=True, exist_ok=True)
        classes = train.classes
        order = [s for s in SPLITS if s in caches]
        labelled = [s for s in ("train", "val") if s in caches]
        paths = {s: caches[s].paths for s in order}
        seconds: dict[str, float] = {}

        y, P, (ranked, score, flagged, noise), head, seconds["labels"] = _label_issues(config, caches, labelled, tap, files, say)
        suggested = P.argmax(axis=1)
        say(f"  cleanlab flags {int(flagged.sum()):,} of {len(y):,} labels; estimated noise rate {noise:.2%} ({seconds['labels']:.1f} s)")
        split_of = np.concatenate([np.full(len(paths[s]), i) for i, s in enumerate(order)])
        all_paths = [p for s in order for p in paths[s]]
        hashes, found, exact, exact_sim = _neighbours(config, caches, order, tap, files, seconds, progress, say)

    # The CSVs: every row ranked, the most suspect first.
    n_labelled = len(y)
    row_path = [p for s in labelled for p in paths[s]]
    row_split = [s for s in labelled for _ in paths[s]]
    label_rows = [(row_path[i], row_split[i], classes[y[i]], classes[suggested[i]], f"{score[i]:.6f}") for i in ranked]
    pairs = [(a, b, s, "exact") for (a, b), s in zip(exact, exact_sim)]
    same_file = {(a, b) for a, b in exact}
    pairs += [(int(a), int(b), float(s), "near") for a, b, s in zip(found.a, found.b, found.similarity) if (int(a), int(b)) not in same_file]
    pairs.sort(key=lambda p: (split_of[p[0]] == split_of[p[1]], p[3] != "exact", -p[2]))
    dup_rows = [(all_paths[a], order[split_of[a]], all_paths[b], order[split_of[b]], f"{s:.6f}", kind) for a, b, s, kind in pairs]
    outlier = outlier_scores(found.knn)
    out_order = np.argsort(-outlier, kind="stable")
    out_rows = [(all_paths[i], order[split_of[i]], f"{outlier[i]:.6f}") for i in out_order]
    for path, rows, header in ((files.label_issues, label_rows, LABEL_COLUMNS), (files.duplicates, dup_rows, DUPLICATE_COLUMNS),
                               (files.outliers, out_rows, OUTLIER_COLUMNS)):
        atomic_write(path, lambda f, rows=rows, header=header: f.write(_csv(rows, header)))

    summary = _summary(config, order, paths, pairs, split_of, all_paths, hashes, outlier, found.truncated, n_labelled, flagged, noise,
                       head, seconds, time.perf_counter() - t_start)
    summary.update(provenance.stamp(inputs))
    # Last: its presence with matching inputs marks the audit complete.
    atomic_write(files.summary, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    say(f"audit: {summary['label_issues']:,} label issues, {summary['duplicates']['exact']:,} exact and {summary['duplicates']['near']:,} "
        f"near duplicate pairs ({summary['duplicates']['cross_split']:,} across splits), {summary['outliers']:,} outliers, "
        f"{summary['seconds']['total']:.1f} s -> {files.dir}")
    return AuditResult(files, summary)


# One BLAS thread for the labels and the projection: on the busy 2-core machine the default two stalled each other,
# 13x slower for a fold's logistic regression (2.4 s against 0.18 s on 9,600 x 256) and 3.5x for a PCA of 20,000 x 1,280.
_BLAS_THREADS = 1


def _label_issues(config: AuditConfig, caches: dict, labelled: list[str], tap: str, files: layout.AuditFiles,
                  say: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, tuple, dict, float]:
    """Out-of-fold probabilities over the labelled splits together, ranked by cleanlab: labels, probabilities, the
    ranking (see :func:`rank_label_issues`), the head used and the seconds taken."""
    from threadpoolctl import threadpool_limits

    from .fit import load_split_features
    from .heads import HEADS

    t0 = time.perf_counter()
    with threadpool_limits(_BLAS_THREADS):
        value, source = _head_value(config, caches["train"], caches.get("val"), files, say)
        spec = HEADS[config.clf]
        value = value if spec.log else int(value)
        X = np.concatenate([load_split_features(caches[s], tap, s)[0] for s in labelled])
        y = np.concatenate([caches[s].labels for s in labelled])
        say(f"label issues: {config.folds}-fold out-of-fold probabilities of {config.clf} ({spec.param}={value:g}, {source}) "
            f"on {len(y):,} {' and '.join(labelled)} images")
        P = out_of_fold_probabilities(X, y, len(caches["train"].classes), config, value, say)
        del X
        ranking = rank_label_issues(y, P)
    return y, P, ranking, {"clf": config.clf, "param": spec.param, "value": value, "source": source}, time.perf_counter() - t0


def _neighbours(config: AuditConfig, caches: dict, order: list[str], tap: str, files: layout.AuditFiles, seconds: dict,
                progress: bool, say: Callable[[str], None]) -> tuple[list, Any, list, list]:
    """Over every split: the files' content hashes, the blocked search (near pairs and k nearest neighbours), and
    the exact pairs with their similarity. Adds ``hashes`` and ``search`` to ``seconds``."""
    from threadpoolctl import threadpool_limits

    from .duplicates import content_hashes, exact_pairs, project, search

    t0 = time.perf_counter()
    say(f"duplicates: hashing {sum(len(caches[s]) for s in order):,} image files")
    hashes = [h for s in order for h in content_hashes(caches[s].attrs.get("data_root"), caches[s].paths, progress)]
    seconds["hashes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shutil.rmtree(files.work, ignore_errors=True)
    files.work.mkdir(parents=True)
    try:
        with threadpool_limits(_BLAS_THREADS):
            Z = project([caches[s].dataset(tap) for s in order], files.work / "projected.npy", pool=config.pool, dims=config.dims,
                        seed=config.seed, block_rows=config.block_rows)
        found = search(Z, config.threshold, config.neighbours, block_rows=config.block_rows, log=say, progress=progress)
        exact = exact_pairs(hashes)
        exact_sim = [float(np.dot(Z[a], Z[b])) for a, b in exact]
        del Z
    finally:
        shutil.rmtree(files.work, ignore_errors=True)
    seconds["search"] = time.perf_counter() - t0
    return hashes, found, exact, exact_sim


def _summary(config: AuditConfig, order: list[str], paths: dict, pairs: list[tuple], split_of: np.ndarray, all_paths: list[str],
             hashes: list, outlier: np.ndarray, truncated: bool, n_labelled: int, flagged: np.ndarray, noise: float, head: dict,
             seconds: dict, total: float) -> dict:
    """Counts, rates and settings of an audit, for ``summary.json``."""
    by_splits: dict[str, dict[str, int]] = {}
    leaked: set[int] = set()
    for a, b, _, kind in pairs:
        key = f"{order[split_of[a]]}-{order[split_of[b]]}"
        by_splits.setdefault(key, {"exact": 0, "near": 0})[kind] += 1
        if split_of[a] != split_of[b] and order[split_of[b]] == "test":
            leaked.add(b)
    q1, q3 = np.percentile(outlier, [25, 75]) if len(outlier) else (0.0, 0.0)
    fence = float(q3 + 3 * (q3 - q1))  # Tukey's "far out"
    cross = sum(1 for a, b, _, _ in pairs if split_of[a] != split_of[b])
    return {
        "format": _FORMAT, "images": {s: len(paths[s]) for s in order}, "labelled_images": n_labelled,
        "label_issues": int(flagged.sum()), "noise_rate": noise,
        "duplicates": {"exact": sum(p[3] == "exact" for p in pairs), "near": sum(p[3] == "near" for p in pairs), "cross_split": cross,
                       "by_splits": by_splits, "truncated": truncated},
        "leaked_test_images": len(leaked), "unhashed_images": sum(h is None for h in hashes),
        "outliers": int((outlier > fence).sum()), "outlier_fence": fence, "head": head,
        "threshold": config.threshold, "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(total, 2)},
        "config": asdict(config),
    }


# ---------------------------------------------------------------- acting on it


def _read_csv(path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != columns:
                raise ValueError(f"{path} has columns {reader.fieldnames}; an audit's file has {','.join(columns)}")
            return list(reader)
    except FileNotFoundError:
        raise ValueError(f"no audit file {path}; run pipeline audit first") from None


def suspects(label_issues: str | Path, top: int | None = None) -> list[tuple[str, str]]:
    """The (split, path) of the ``top`` most suspect images of an audit's ``label_issues.csv``; all it flagged for None.

    Raises:
        ValueError: a missing or foreign file, or ``top`` None without the audit's ``summary.json`` beside it.
    """
    rows = _read_csv(label_issues, LABEL_COLUMNS)
    if top is None:
        summary = provenance.read_record(layout.audit_files(Path(label_issues).parent).summary)
        if summary is None or not isinstance(summary.get("label_issues"), int):
            raise ValueError(f"no audit summary.json beside {label_issues} to say how many images it flagged; give the number (--top N)")
        top = summary["label_issues"]
    return [(r["split"], r["path"]) for r in rows[:top]]


def leaked_test_paths(duplicates: str | Path) -> set[str]:
    """The test images an audit found in train or val too (exact or near copies): leakage, to leave out of evaluation."""
    return {r["path_b"] for r in _read_csv(duplicates, DUPLICATE_COLUMNS)
            if r["split_b"] == "test" and r["split_a"] in ("train", "val")}

