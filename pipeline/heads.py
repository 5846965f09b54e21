"""Heads: classifiers on cached features, each a scikit-learn estimator (the torch linear head included)."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from .config import POOLS, PREPROCESSING
from .resources import usable_cores
from .runtime import torch_threads

__all__ = [
    "HEADS",
    "HeadSpec",
    "SpatialPool",
    "TorchLinearHead",
    "build_head",
    "has_probabilities",
    "in_row_blocks",
    "decision_logits",
    "head_probabilities",
    "PREPROCESSING",
    "POOLS",
]



class SpatialPool(TransformerMixin, BaseEstimator):
    """N x C x H x W features become N x C (``avg``, ``max``) or N x CHW (``flatten``); N x D passes through."""

    def __init__(self, mode: str = "avg") -> None:
        self.mode = mode

    def fit(self, X: np.ndarray, y: Any = None) -> "SpatialPool":
        if self.mode not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.mode!r}")
        X = np.asarray(X)
        if X.ndim not in (2, 4):
            raise ValueError(f"features must be N x D or N x C x H x W, got shape {X.shape}")
        self.n_features_in_ = int(np.prod(X.shape[1:]))
        self.input_shape_ = tuple(X.shape[1:])
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = np.asarray(X)
        if X.ndim < 2:
            raise ValueError(f"features must be N x D or N x C x H x W, got a {X.ndim}-D array; reshape a single sample with X[None]")
        if tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(f"features of shape {X.shape[1:]} given to a head fitted on {self.input_shape_}")
        if X.ndim == 2:
            return X
        if self.mode == "avg":
            return X.mean(axis=(2, 3))
        if self.mode == "max":
            return X.max(axis=(2, 3))
        return X.reshape(len(X), -1)


class TorchLinearHead(ClassifierMixin, BaseEstimator):
    """A linear layer trained with AdamW and cross-entropy on the CPU, with the scikit-learn contract.

    With an evaluation set (``fit(X, y, eval_set=(X_val, y_val))``) the weights of the epoch with the best
    validation accuracy are kept. ``history_`` holds per-epoch loss and accuracy for train and val.

    Args:
        weight_decay: decoupled L2 strength.
        lr: AdamW learning rate.
        epochs: passes over the training data.
        batch_size: minibatch size.
        random_state: seed of initialisation and shuffling.
    """

    def __init__(self, weight_decay: float = 1e-4, lr: float = 1e-3, epochs: int = 30, batch_size: int = 256, random_state: int = 0) -> None:
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> "TorchLinearHead":
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_ = unique_labels(y)
        if len(self.classes_) < 2:
            raise ValueError(f"a classifier needs at least 2 classes; got {len(self.classes_)} class")
        y_idx = np.searchsorted(self.classes_, y)
        val = None
        if eval_set is not None:
            Xv = np.asarray(eval_set[0], dtype=np.float32)
            val = (torch.from_numpy(Xv), torch.from_numpy(np.searchsorted(self.classes_, eval_set[1])))

        def batches(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = rng.permutation(len(X))
            for i in range(0, len(X), self.batch_size):
                sel = np.sort(order[i : i + self.batch_size])
                yield torch.from_numpy(X[sel]), torch.from_numpy(y_idx[sel])

        return self._train(batches, X.shape[1], val)

    def fit_stream(self, batches: Callable[[np.random.Generator], Iterable[tuple[np.ndarray, np.ndarray]]], n_features: int,
                   classes: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> "TorchLinearHead":
        """Fit from minibatches produced anew each epoch, for data that does not fit in memory.

        Args:
            batches: called once per epoch with a random generator; yields (X, y) minibatches.
            n_features: feature dimension.
            classes: every class label that may occur.
            eval_set: (X_val, y_val) held in memory, for the best-epoch choice.
        """
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = n_features
        val = None
        if eval_set is not None:
            val = (torch.from_numpy(np.asarray(eval_set[0], np.float32)), torch.from_numpy(np.searchsorted(self.classes_, eval_set[1])))

        def tensors(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for xb, yb in batches(rng):
                yield torch.from_numpy(np.asarray(xb, np.float32)), torch.from_numpy(np.searchsorted(self.classes_, yb))

        return self._train(tensors, n_features, val)

    def _train(self, batches: Callable, n_features: int, val: tuple[torch.Tensor, torch.Tensor] | None) -> "TorchLinearHead":
        # Minibatch GEMMs this small gain nothing from threads, and on a busy 2-core machine torch's threads
        # stall each other: one thread measured 25x faster (0.23 s against 5.7 s an epoch of 10k x 2048).
        with torch_threads(1):
            return self._train_loop(batches, n_features, val)

    def _train_loop(self, batches: Callable, n_features: int, val: tuple[torch.Tensor, torch.Tensor] | None) -> "TorchLinearHead":
        gen = torch.Generator().manual_seed(self.random_state)
        rng = np.random.default_rng(self.random_state)
        layer = torch.nn.Linear(n_features, len(self.classes_))
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
            layer.bias.zero_()
        opt = torch.optim.AdamW(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        self.history_ = []
        best = (-1.0, None, 0)
        for epoch in range(1, self.epochs + 1):
            total, correct, loss_sum = 0, 0, 0.0
            for xb, yb in batches(rng):
                logits = layer(xb)
                loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                total += len(yb)
            row = {"epoch": epoch, "train_loss": loss_sum / total, "train_acc": correct / total}
            if val is not None:
                with torch.no_grad():
                    logits = layer(val[0])
                    row["val_loss"] = float(loss_fn(logits, val[1]))
                    row["val_acc"] = float((logits.argmax(1) == val[1]).float().mean())
            self.history_.append(row)
            score = row.get("val_acc", row["train_acc"])
            if score > best[0]:
                best = (score, {k: v.detach().clone() for k, v in layer.state_dict().items()}, epoch)
        self.best_epoch_ = best[2]
        self.coef_ = best[1]["weight"].numpy()
        self.intercept_ = best[1]["bias"].numpy()
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits, N x classes; for two classes the scikit-learn convention: one score, positive for classes_[1]."""
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if len(self.classes_) == 2 else z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self._logits(X)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self._logits(X)
        return self.classes_[np.argmax(z, axis=1)]


@dataclass(frozen=True)
class HeadSpec:
    """A head family: its estimator, default preprocessing and the hyper-parameter swept on val.

    Attributes:
        name: the ``--clf`` name.
        make: builds the final estimator from the swept value.
        param: the swept hyper-parameter's name, as reported.
        grid: the coarse sweep values.
        log: whether the sweep is on a log scale and is refined around its best value (CLIP-style).
        preprocessing: the default feature preprocessing.
        description: one line for help texts.
        one_core: its solver runs on one core with the GIL released and draws no random numbers (libsvm without
            probabilities): sweep values and prediction rows are spread over threads, one per usable core.
            liblinear (LinearSVC) also runs on one core, but its shuffling shares one random generator between
            threads, so two fits side by side are not reproducible.
    """

    name: str
    make: Callable[[Any, int], BaseEstimator]
    param: str
    grid: tuple
    log: bool
    preprocessing: str
    description: str
    one_core: bool = False


def _logreg(C: float, seed: int) -> BaseEstimator:
    return LogisticRegression(C=C, max_iter=300, tol=1e-3, random_state=seed)


# The linear SVM's grid stops at C=0.01: larger C never won a sweep (best 3e-4 on the 120-class bench, 1e-3 on
# full Fashion-MNIST) and liblinear needs minutes to converge there on 54k rows (C=0.1 ran for more than 10).
def _linear_svm(C: float, seed: int) -> BaseEstimator:
    # One joint multi-class problem (Crammer-Singer) instead of one-vs-rest: with 120 classes one-vs-rest makes
    # 120 passes over the data per epoch and took 5-30 s per C on 10k x 256 (bench/heads_bench.py), this 1-5 s.
    return LinearSVC(C=C, multi_class="crammer_singer", max_iter=1000, tol=1e-3, random_state=seed)


def _rbf_svm(C: float, seed: int) -> BaseEstimator:
    return SVC(C=C, kernel="rbf", gamma="scale", random_state=seed)


# Fully grown trees keep a row of class fractions per node: with 120 classes and 10k rows, 200 of them took
# 1.8 GiB (random forest) and 3.1 GiB (extra trees) on disk. Leaves of at least 5 rows cut that to 412 and
# 605 MiB, and were more accurate in bench/heads_bench.py (val 28.3 -> 31.6 %, 21.8 -> 36.6 %).
_MIN_LEAF = 5


def _forest(n: int, seed: int) -> BaseEstimator:
    return RandomForestClassifier(n_estimators=n, min_samples_leaf=_MIN_LEAF, n_jobs=-1, random_state=seed)


def _extra(n: int, seed: int) -> BaseEstimator:
    return ExtraTreesClassifier(n_estimators=n, min_samples_leaf=_MIN_LEAF, n_jobs=-1, random_state=seed)


def _hgb(n: int, seed: int) -> BaseEstimator:
    # Every iteration grows one tree per class (120 for the dog breeds); 15 leaves instead of 31 made the sweep
    # a sixth faster (62 s against 75 s) and more accurate (val 36.4 % against 34.3 %) in bench/heads_bench.py.
    return HistGradientBoostingClassifier(max_iter=n, learning_rate=0.1, max_leaf_nodes=15, early_stopping=False, random_state=seed)


def _knn(k: int, seed: int) -> BaseEstimator:
    return KNeighborsClassifier(n_neighbors=k, weights="distance", n_jobs=-1)


# The linear head sweeps its learning rate, not its weight decay: at AdamW's lr 1e-3 the decay (lr x weight_decay per
# step) barely acts before the best epoch, and weight decays of 1e-6 to 1 gave the same val accuracy to 0.03 points on
# three real caches. Learning rates of 1e-4 to 1e-1 span 4-5 points there (Fashion-MNIST, MobileNetV2 features).
def _torch_linear(lr: float, seed: int) -> BaseEstimator:
    return TorchLinearHead(lr=lr, random_state=seed)


HEADS: dict[str, HeadSpec] = {
    h.name: h
    for h in (
        HeadSpec("linear", _torch_linear, "lr", (1e-4, 1e-3, 1e-2, 1e-1), True, "standardize",
                 "torch linear layer (AdamW), learning rate and best epoch on val"),
        HeadSpec("logreg", _logreg, "C", (1e-4, 1e-3, 1e-2, 1e-1, 1.0), True, "standardize+pca", "scikit-learn LogisticRegression (lbfgs)"),
        HeadSpec("svm", _linear_svm, "C", (1e-4, 1e-3, 1e-2), True, "standardize+pca", "linear SVM (LinearSVC, Crammer-Singer multi-class)"),
        HeadSpec("svm-rbf", _rbf_svm, "C", (1.0, 10.0), True, "standardize+pca", "RBF-kernel SVM (SVC)", one_core=True),
        HeadSpec("tree", _forest, "n_estimators", (100, 200), False, "pca", "random forest"),
        HeadSpec("extra-trees", _extra, "n_estimators", (100, 200), False, "pca", "extremely randomised trees"),
        HeadSpec("hgb", _hgb, "max_iter", (50, 100), False, "pca", "histogram gradient boosting"),
        HeadSpec("knn", _knn, "n_neighbors", (1, 5, 10, 20), False, "l2+pca", "k nearest neighbours (cosine, distance-weighted)"),
    )
}


def build_head(name: str, value: Any, *, preprocessing: str | None = None, pca: int = 256, pool: str = "avg", seed: int = 0) -> Pipeline:
    """A scikit-learn Pipeline: spatial pooling, feature preprocessing, then the head's estimator.

    Args:
        name: a key of ``HEADS``.
        value: the head's swept hyper-parameter value.
        preprocessing: one of ``PREPROCESSING``; None takes the head's default.
        pca: PCA components, where PCA is used (capped by the data at fit time).
        pool: pooling of spatial (N x C x H x W) features.
        seed: random state.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {', '.join(HEADS)}")
    spec = HEADS[name]
    preprocessing = preprocessing or spec.preprocessing
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; expected one of {', '.join(PREPROCESSING)}")
    steps: list[tuple[str, Any]] = [("pool", SpatialPool(pool))]
    for step in preprocessing.split("+"):
        if step == "standardize":
            steps.append(("standardize", StandardScaler()))
        elif step == "l2":
            steps.append(("l2", Normalizer()))
        elif step == "pca":
            steps.append(("pca", _CappedPCA(pca, seed)))
    steps.append(("clf", spec.make(value, seed)))
    return Pipeline(steps)


def in_row_blocks(pipe: Pipeline | BaseEstimator, method: str, X: np.ndarray) -> np.ndarray:
    """``getattr(pipe, method)(X)`` of a head's Pipeline or estimator; for one whose solver runs on one core (an SVM),
    in row blocks on threads, one per usable core. Every row is computed alone either way, so the result is the same."""
    fn = getattr(pipe, method)
    workers = min(usable_cores(), len(X) // 256) if type(_estimator(pipe)) in _one_core_types() else 1
    if workers < 2:
        return fn(X)
    bounds = np.linspace(0, len(X), workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(lambda i: fn(X[bounds[i]:bounds[i + 1]]), range(workers))))


def _estimator(pipe: Pipeline | BaseEstimator) -> BaseEstimator:
    """A head's final estimator: the last step of its Pipeline, or the estimator itself."""
    return pipe.steps[-1][1] if isinstance(pipe, Pipeline) else pipe


@functools.cache
def _one_core_types() -> tuple[type, ...]:
    return tuple(type(h.make(h.grid[0], 0)) for h in HEADS.values() if h.one_core)


def has_probabilities(pipe: Pipeline | BaseEstimator) -> bool:
    """Whether the head's estimator has ``predict_proba`` (LinearSVC, SVC and the hinge-loss SGD do not)."""
    return hasattr(_estimator(pipe), "predict_proba")


def decision_logits(pipe: Pipeline | BaseEstimator, X: np.ndarray) -> np.ndarray:
    """The decision values of a head without ``predict_proba``, N x classes: what its probabilities are the softmax of.

    With two classes the one decision value d (positive for the second class) becomes [0, d], the logistic rule.
    """
    d = np.asarray(in_row_blocks(pipe, "decision_function", X), dtype=np.float64)
    return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d.reshape(len(d), -1)


def head_probabilities(pipe: Pipeline | BaseEstimator, X: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of a head, N x classes: the one definition that predict, evaluate and the exported ONNX model share.

    ``predict_proba`` where the estimator has it. Otherwise ``softmax(decision_logits / temperature)``, with the
    temperature fit-head chose on val (:func:`pipeline.stats.fit_temperature`) so that an SVM's probabilities mean
    what a logistic regression's do; 1, for heads saved before temperatures were kept, makes them scores that merely
    sum to one. Their argmax is the head's prediction either way.
    """
    if has_probabilities(pipe):
        return np.asarray(pipe.predict_proba(X), dtype=np.float64)
    from .stats import softmax

    return softmax(decision_logits(pipe, X), temperature)


class _CappedPCA(TransformerMixin, BaseEstimator):
    """PCA to ``n_components``, capped at what the data allows; whitening off, randomized solver."""

    def __init__(self, n_components: int = 256, random_state: int = 0) -> None:
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> "_CappedPCA":
        k = max(1, min(self.n_components, X.shape[0], X.shape[1]))
        self.pca_ = PCA(k, svd_solver="randomized" if k < min(X.shape) * 0.8 else "full", random_state=self.random_state).fit(X)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return self.pca_.transform(X).astype(np.float32)


def refine(grid: tuple, best: float, step: float) -> list[float]:
    """Two log-scale neighbours of ``best`` at ``step`` decades, for the CLIP-style halving search."""
    return [best * 10 ** (-step), best * 10 ** step]


def log_step(grid: tuple) -> float:
    """Decades between neighbouring values of a log grid."""
    return abs(math.log10(grid[1] / grid[0])) if len(grid) > 1 else 1.0
