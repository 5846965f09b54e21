"""A head's payload formats: torch tensors (``weights_only``) and skops files of trusted types, written and read.

No pickle is read here: a torch head is plain tensors and strings, and a scikit-learn head a skops file whose
every type is on :data:`TRUSTED_TYPES` (or skops' defaults), checked before anything in it is built.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from .heads import SpatialPool, TorchLinearHead
from .validate import brief, first_line

__all__ = ["UntrustedArtifactError", "TRUSTED_TYPES", "torch_state", "load_torch_head", "load_skops_head", "torch_load"]


class UntrustedArtifactError(ValueError):
    """A head file that is not a skops file of the types heads are made of, or an old pickled (joblib) head."""


# The steps a scikit-learn head's Pipeline may have (heads.build_head, and fit's streaming heads), by the names
# skops records: ``module.qualname`` of the class.
_HEAD_STEPS = (
    "pipeline.heads.SpatialPool",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.Normalizer",
    "pipeline.heads._CappedPCA",
    "pipeline.heads.TorchLinearHead",  # with PCA, which its tensor form does not express
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.ensemble._forest.ExtraTreesClassifier",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",  # stream.fit_streaming's logreg and svm
)

# What the fitted steps hold, found by saving a fitted head of every family (each preprocessing, 2 and 3
# classes, integer and string labels, the streaming SGD heads) and listing every type in the files, with
# skops.io.get_untrusted_types for those skops does not trust by default. Builtins, numpy arrays, scalars and
# Generators are skops' own defaults. tests/test_heads.py round-trips every family through this list.
_HEAD_INTERNALS = (
    "sklearn.decomposition._pca.PCA",  # inside _CappedPCA
    # random forest and extra trees. skops does not trust Tree by default: predict follows its node indices
    # unchecked, so a crafted file can crash it (an out-of-bounds read, not code run at load). The same holds for
    # TreePredictor and KDTree below; the sha256 check only proves a file is the one written beside its JSON.
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._classes.ExtraTreeClassifier",
    "sklearn.tree._tree.Tree",
    # histogram gradient boosting: its trees (untrusted by default, as Tree), binning, label encoding and loss
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss._loss.CyHalfBinomialLoss",  # also the SGD log loss
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.link.Interval",
    # k nearest neighbours: the KD tree of the fitted points (untrusted by default) and its metric
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    # the SGD hinge loss (svm when streaming)
    "sklearn.linear_model._sgd_fast.Hinge",
)

TRUSTED_TYPES: tuple[str, ...] = ("sklearn.pipeline.Pipeline", *_HEAD_STEPS, *_HEAD_INTERNALS)
"""Every type, beyond skops' defaults, that a scikit-learn head's ``.skops`` file may hold; any other is refused."""


def torch_state(pipe: Pipeline) -> dict[str, Any] | None:
    """The tensors of pool/standardize/l2 + TorchLinearHead pipelines; None for other pipelines."""
    state: dict[str, Any] = {"steps": []}
    for name, step in pipe.steps:
        if isinstance(step, SpatialPool):
            state["steps"].append(f"pool:{step.mode}")
            state["pool_shape"] = list(step.input_shape_)
        elif isinstance(step, StandardScaler):
            state["steps"].append("standardize")
            state["mean"], state["scale"] = torch.from_numpy(step.mean_.copy()), torch.from_numpy(step.scale_.copy())
        elif isinstance(step, Normalizer):
            state["steps"].append("l2")
        elif isinstance(step, TorchLinearHead):
            state["steps"].append("linear")
            state["weight"], state["bias"] = torch.from_numpy(step.coef_.copy()), torch.from_numpy(step.intercept_.copy())
            state["classes"] = step.classes_.tolist()
            state["params"] = json.dumps(step.get_params())
            state["history"] = json.dumps(step.history_)
            state["best_epoch"] = int(step.best_epoch_)
        else:
            return None
    return state


# What each step of a torch head's state needs, with the type it must have.
_TORCH_KEYS: dict[str, tuple[tuple[str, type], ...]] = {
    "pool": (("pool_shape", list),),
    "standardize": (("mean", torch.Tensor), ("scale", torch.Tensor)),
    "l2": (("weight", torch.Tensor),),
    "linear": (("weight", torch.Tensor), ("bias", torch.Tensor), ("classes", list), ("params", str), ("history", str), ("best_epoch", int)),
}


def _check_torch_state(state: Any) -> None:
    """Raise ValueError naming the first missing or mistyped key of a torch head's state."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a dict of tensors")
    steps = state.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"its field 'steps' should be a list of step names, found {brief(steps)}")
    for step in steps:
        kind = step.split(":", 1)[0]
        for key, typ in _TORCH_KEYS.get(kind, ()):  # an unknown step is refused when the pipeline is built
            if key not in state:
                raise ValueError(f"it lacks the field {key!r} that its {kind!r} step needs")
            if not isinstance(state[key], typ) or (typ is int and isinstance(state[key], bool)):
                raise ValueError(f"its field {key!r} should be a {typ.__name__}, found a {type(state[key]).__name__}")


def _pipeline_from_torch(state: dict[str, Any]) -> Pipeline:
    steps = []
    for s in state["steps"]:
        if s.startswith("pool:"):
            pool = SpatialPool(s.split(":", 1)[1])
            pool.input_shape_ = tuple(state["pool_shape"])
            pool.n_features_in_ = int(np.prod(pool.input_shape_))
            steps.append(("pool", pool))
        elif s == "standardize":
            sc = StandardScaler()
            sc.mean_, sc.scale_ = state["mean"].numpy(), state["scale"].numpy()
            sc.var_ = sc.scale_**2
            sc.n_features_in_ = len(sc.mean_)
            sc.n_samples_seen_ = 0
            steps.append(("standardize", sc))
        elif s == "l2":
            steps.append(("l2", Normalizer().fit(np.zeros((1, state["weight"].shape[1])))))
        elif s == "linear":
            head = TorchLinearHead(**json.loads(state["params"]))
            head.coef_, head.intercept_ = state["weight"].numpy(), state["bias"].numpy()
            head.classes_ = np.asarray(state["classes"])
            head.n_features_in_ = head.coef_.shape[1]
            head.history_ = json.loads(state["history"])
            head.best_epoch_ = state["best_epoch"]
            steps.append(("clf", head))
        else:
            raise ValueError(f"unknown step {s!r}")
    if not steps or steps[-1][0] != "clf":
        raise ValueError("no linear layer")
    return Pipeline(steps)


def load_torch_head(artifact: Path, data: bytes) -> Pipeline:
    state = torch_load(artifact, "torch head", data)
    try:
        _check_torch_state(state)
    except ValueError as e:
        raise ValueError(f"{artifact} is not a whole torch head: {e}") from None
    try:
        return _pipeline_from_torch(state)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{artifact} is not a torch head's tensors ({type(e).__name__}: {first_line(e)})") from None


def torch_load(artifact: Path, kind: str, data: bytes | None = None) -> Any:
    """Tensors and plain values from a torch file (or its bytes, already read and verified), with ``weights_only=True``;
    anything else is refused, with why."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else artifact, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{artifact} is not a readable {kind} (UnpicklingError: {first_line(e)}); refusing to load it") from None
        # torch's own message goes on about loading the file with weights_only=False: the one thing not to do here.
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        why = f" (it names {culprit.group(1)})" if culprit else ""
        raise UntrustedArtifactError(f"{artifact} holds more than tensors and plain values{why}; refusing to load it") from None
    except Exception as e:  # a truncated or foreign file fails in torch's zip or pickle reader
        raise ValueError(f"{artifact} is not a readable {kind} ({type(e).__name__}: {first_line(e)}); refusing to load it") from None


def load_skops_head(artifact: Path, data: bytes) -> Pipeline:
    """A skops head (``data``, read from ``artifact``), after checking that it names only :data:`TRUSTED_TYPES`
    (and skops' defaults)."""
    import skops.io

    try:
        # Reads the file's schema only: nothing is imported or built yet.
        found = skops.io.get_untrusted_types(data=data)
    except Exception as e:  # a truncated or foreign file fails in the zip, JSON or schema reader
        raise ValueError(f"{artifact} is not a readable skops file ({type(e).__name__}: {first_line(e)}); refusing to load it") from None
    untrusted = sorted(set(found) - set(TRUSTED_TYPES))
    if untrusted:
        raise UntrustedArtifactError(f"{artifact} holds types that no head is made of: {', '.join(untrusted)}; refusing to load it")
    try:
        pipe = skops.io.loads(data, trusted=list(TRUSTED_TYPES))
    except Exception as e:
        raise ValueError(f"{artifact} is not a readable skops head ({type(e).__name__}: {first_line(e)})") from None
    # skops also trusts every scikit-learn estimator by default; a head is a Pipeline of our steps and nothing else.
    steps = pipe.steps if isinstance(pipe, Pipeline) else []
    names = [f"{type(s).__module__}.{type(s).__qualname__}" for _, s in steps]
    others = [n for n in names if n not in _HEAD_STEPS]
    if not steps or others:
        found_what = ", ".join(others) if steps else f"a {type(pipe).__module__}.{type(pipe).__qualname__}"
        raise UntrustedArtifactError(f"{artifact} is not a head's Pipeline (found {found_what}); refusing to use it")
    return pipe

