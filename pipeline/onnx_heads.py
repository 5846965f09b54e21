"""ONNX graphs of fitted heads: skl2onnx, with converters for the project's own steps and fixes for two of its own.

A head's graph takes the tapped features (``features``, N x D or N x C x H x W, float32) and gives
``probabilities`` (N x classes, float32) and ``label`` (N, int64, the index of the most probable class), with the
definition of :func:`pipeline.heads.head_probabilities`: ``predict_proba`` where the estimator has it, else the
softmax of its decision values over the head's temperature. skl2onnx converts the scikit-learn steps; :class:`~pipeline.heads.SpatialPool`,
``_CappedPCA`` and :class:`~pipeline.heads.TorchLinearHead` get converters registered here, and
HistGradientBoostingClassifier and KNeighborsClassifier get fixed ones for each conversion (skl2onnx 1.20's fail
on protobuf 7, and ignore kNN's distance weights).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper
from skl2onnx import convert_sklearn, update_registered_converter
from skl2onnx.algebra.onnx_ops import (
    OnnxAdd, OnnxArgMax, OnnxCast, OnnxDiv, OnnxEqual, OnnxFlatten, OnnxGather, OnnxGemm, OnnxIdentity, OnnxMatMul, OnnxMax,
    OnnxMul, OnnxReciprocal, OnnxReduceMax, OnnxReduceMean, OnnxReduceSum, OnnxReduceSumSquare, OnnxSoftmax, OnnxSqrt, OnnxSub,
    OnnxTopK, OnnxUnsqueeze,
)
from skl2onnx._supported_operators import sklearn_operator_name_map
from skl2onnx.algebra.onnx_operator import OnnxSubEstimator
from skl2onnx.common._registration import get_converter
from skl2onnx.common.data_types import FloatTensorType
from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
from skl2onnx.operator_converters.random_forest import convert_sklearn_random_forest_classifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from .heads import SpatialPool, TorchLinearHead, _CappedPCA, has_probabilities

__all__ = ["head_model", "FEATURES", "OPSET", "ML_OPSET", "IR_VERSION"]

# Opset 17 is what the backbone's exporter writes (engines.OnnxEngine); ai.onnx.ml 3 is its companion (and the
# first with double-valued tree attributes). IR version 8 is the first to carry opset 17.
OPSET = 17
ML_OPSET = 3
IR_VERSION = 8
_FEATURES = "features"
_PREFIX = "head_"
FEATURES = _PREFIX + _FEATURES
"""The name of the head graph's input."""


# ---------------------------------------------------------------- the project's own steps


def _pool_shape(operator: Any) -> None:
    pool: SpatialPool = operator.raw_operator
    n = operator.inputs[0].get_first_dimension()
    shape = pool.input_shape_
    width = shape[0] if len(shape) == 3 and pool.mode != "flatten" else int(np.prod(shape))
    operator.outputs[0].type = FloatTensorType([n, width])


def _pool_convert(scope: Any, operator: Any, container: Any) -> None:
    pool: SpatialPool = operator.raw_operator
    x, out = operator.inputs[0], operator.outputs[0].full_name
    if len(pool.input_shape_) == 1:
        node = OnnxIdentity(x, op_version=OPSET, output_names=[out])
    elif pool.mode == "flatten":
        node = OnnxFlatten(x, axis=1, op_version=OPSET, output_names=[out])
    else:  # opset 17 takes the axes of ReduceMean/ReduceMax as an attribute
        reduce = OnnxReduceMean if pool.mode == "avg" else OnnxReduceMax
        node = reduce(x, axes=[2, 3], keepdims=0, op_version=OPSET, output_names=[out])
    node.add_to(scope, container)


def _pca_shape(operator: Any) -> None:
    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, int(operator.raw_operator.pca_.n_components_)])


def _pca_convert(scope: Any, operator: Any, container: Any) -> None:
    # skl2onnx's own PCA converter, on the fitted PCA inside; _CappedPCA only chose its size.
    node = OnnxSubEstimator(operator.raw_operator.pca_, operator.inputs[0], op_version=OPSET,
                            output_names=[operator.outputs[0].full_name])
    node.add_to(scope, container)


def _linear_convert(scope: Any, operator: Any, container: Any) -> None:
    head: TorchLinearHead = operator.raw_operator
    logits = OnnxGemm(operator.inputs[0], head.coef_.astype(np.float32), head.intercept_.astype(np.float32),
                      transB=1, op_version=OPSET)
    index = OnnxArgMax(logits, axis=1, keepdims=0, op_version=OPSET)
    OnnxGather(np.asarray(head.classes_, dtype=np.int64), index, op_version=OPSET,
               output_names=[operator.outputs[0].full_name]).add_to(scope, container)
    OnnxSoftmax(logits, axis=1, op_version=OPSET, output_names=[operator.outputs[1].full_name]).add_to(scope, container)


def _register() -> None:
    update_registered_converter(SpatialPool, "PipelineSpatialPool", _pool_shape, _pool_convert)
    update_registered_converter(_CappedPCA, "PipelineCappedPCA", _pca_shape, _pca_convert)
    # Declaring the zipmap option makes skl2onnx's default parser give it a classifier's two outputs.
    update_registered_converter(TorchLinearHead, "PipelineTorchLinearHead", calculate_linear_classifier_output_shapes,
                                _linear_convert, options={"zipmap": [False, True], "nocl": [False, True]})


_register()


# ---------------------------------------------------------------- HistGradientBoostingClassifier


class _IntFlags:
    """A conversion container that writes boolean list attributes as integers.

    skl2onnx 1.20 passes HGB's per-node ``missing_go_to_left`` flags (``nodes_missing_value_tracks_true``) to
    ``onnx.helper.make_node`` as Python booleans, which protobuf 7's upb backend refuses for an ``ints`` field
    (``AttributeProto.ints: Expected an int, got a boolean``). ONNX wants 0/1 there, so this is the whole fix.
    """

    def __init__(self, container: Any) -> None:
        self._container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, *args: Any, **attrs: Any) -> Any:
        fixed = {k: [int(v) if isinstance(v, (bool, np.bool_)) else v for v in a] if isinstance(a, list) else a
                 for k, a in attrs.items()}
        return self._container.add_node(*args, **fixed)


def _hgb_convert(scope: Any, operator: Any, container: Any) -> None:
    convert_sklearn_random_forest_classifier(scope, operator, _IntFlags(container))


# ---------------------------------------------------------------- KNeighborsClassifier


def _knn_convert(scope: Any, operator: Any, container: Any) -> None:
    """Distance-weighted (or uniform) votes of the k nearest training rows, Euclidean, computed in float64.

    skl2onnx 1.20's own converter weighs every neighbour alike whatever ``weights`` says: from opset 11 on it takes
    the k smallest distances with ``TopK(largest=0)`` and still negates them, as it must for the older negated
    ``TopK``, so ``1 / max(d, 1e-6)`` sees negative distances and gives each neighbour the weight 1e6.
    """
    knn: KNeighborsClassifier = operator.raw_operator
    if knn.effective_metric_ != "euclidean" or knn.weights not in ("uniform", "distance"):
        raise ValueError(f"only Euclidean kNN with uniform or distance weights is exported, not {knn.effective_metric_}/{knn.weights}")
    train = np.asarray(knn._fit_X)
    n_classes, k, v = len(knn.classes_), knn.n_neighbors, OPSET
    x = OnnxCast(operator.inputs[0], to=TensorProto.DOUBLE, op_version=v)
    # |x - t|^2 = |x|^2 - 2 x.t + |t|^2; the training rows stay in their own dtype in the file, cast once at load.
    cross = OnnxMatMul(x, OnnxCast(train.T.copy(), to=TensorProto.DOUBLE, op_version=v), op_version=v)
    d2 = OnnxAdd(OnnxSub(OnnxReduceSumSquare(x, axes=[1], keepdims=1, op_version=v), OnnxMul(cross, np.array([2.0]), op_version=v), op_version=v),
                 (train.astype(np.float64) ** 2).sum(axis=1), op_version=v)
    dist = OnnxSqrt(OnnxMax(d2, np.array([0.0]), op_version=v), op_version=v)
    top = OnnxTopK(dist, np.array([k], dtype=np.int64), largest=0, sorted=1, op_version=v)
    labels = OnnxGather(np.asarray(knn._y, dtype=np.int64), top[1], op_version=v)
    onehot = OnnxCast(OnnxEqual(OnnxUnsqueeze(labels, np.array([2], dtype=np.int64), op_version=v),
                                np.arange(n_classes, dtype=np.int64).reshape(1, 1, -1), op_version=v), to=TensorProto.DOUBLE, op_version=v)
    if knn.weights == "distance":
        # scikit-learn counts only the neighbours at distance 0 when there are some: a tiny floor does the same.
        weight = OnnxReciprocal(OnnxMax(top[0], np.array([1e-12]), op_version=v), op_version=v)
        onehot = OnnxMul(onehot, OnnxUnsqueeze(weight, np.array([2], dtype=np.int64), op_version=v), op_version=v)
    votes = OnnxReduceSum(onehot, np.array([1], dtype=np.int64), keepdims=0, op_version=v)
    proba = OnnxDiv(votes, OnnxReduceSum(votes, np.array([1], dtype=np.int64), keepdims=1, op_version=v), op_version=v)
    index = OnnxArgMax(proba, axis=1, keepdims=0, op_version=v)
    OnnxGather(np.asarray(knn.classes_, dtype=np.int64), index, op_version=v,
               output_names=[operator.outputs[0].full_name]).add_to(scope, container)
    OnnxCast(proba, to=TensorProto.FLOAT, op_version=v, output_names=[operator.outputs[1].full_name]).add_to(scope, container)


# ---------------------------------------------------------------- the head's graph

# Given for each conversion rather than registered, so that skl2onnx's own converters stay as they were for others.
_FIXED_CONVERTERS = {HistGradientBoostingClassifier: _hgb_convert, KNeighborsClassifier: _knn_convert}


def head_model(pipe: Pipeline, feature_shape: Sequence[int], n_classes: int, temperature: float = 1.0) -> onnx.ModelProto:
    """The ONNX graph of a fitted head: ``features`` in, ``probabilities`` and ``label`` out.

    Args:
        pipe: the head's Pipeline, as :func:`pipeline.artifacts.load_head` returns it.
        feature_shape: the shape of one row of features (``(D,)`` or ``(C, H, W)``).
        n_classes: the number of classes; the estimator's ``classes_`` must be ``0 .. n_classes - 1``.
        temperature: what the decision values of a head without ``predict_proba`` are divided by before their
            softmax (:attr:`pipeline.artifacts.HeadArtifact.temperature`).

    Raises:
        ValueError: a head whose classes are not the class indices, or that skl2onnx cannot convert.
    """
    clf = pipe.steps[-1][1]
    if not np.array_equal(np.asarray(clf.classes_), np.arange(n_classes)):
        raise ValueError(f"the head's classes are {list(clf.classes_)[:5]}..., expected the class indices 0..{n_classes - 1}")
    # Probabilities as a tensor rather than a list of maps, for the converters that offer the choice. Naming the
    # estimator with no options keeps skl2onnx's Pipeline parser from giving zipmap to those that refuse it (LinearSVC).
    options = {id(clf): {"zipmap": False} if "zipmap" in _allowed_options(clf) else {}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # SVC's converter reads probA_, deprecated in scikit-learn 1.9
            model = convert_sklearn(
                pipe, initial_types=[(_FEATURES, FloatTensorType([None, *feature_shape]))], options=options,
                target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET}, custom_conversion_functions=_FIXED_CONVERTERS,
            )
    except Exception as e:  # skl2onnx raises many types for what it cannot convert
        raise ValueError(f"skl2onnx cannot convert the head's {type(clf).__name__} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    # skl2onnx's outputs are its label and its scores; every name it chose gets a prefix, so that none meets the
    # contract's names (its own outputs are called label and probabilities too) or the backbone's.
    scores = _PREFIX + model.graph.output[1].name
    model.ir_version = IR_VERSION
    model = compose.add_prefix(model, _PREFIX)
    post = _scores_to_outputs(has_probabilities(pipe), n_classes, 1 if isinstance(clf, SGDClassifier) else 0, temperature)
    return compose.merge_models(model, post, io_map=[(scores, "out_scores")], outputs=["probabilities", "label"])


def _allowed_options(estimator: Any) -> set[str]:
    alias = sklearn_operator_name_map.get(type(estimator))
    return set(get_converter(alias).get_allowed_options() or ()) if alias else set()


def _scores_to_outputs(probabilities: bool, n_classes: int, column: int, temperature: float) -> onnx.ModelProto:
    """``out_scores`` (the estimator's probabilities, or its decision values) to the contract's two outputs.

    Args:
        probabilities: whether the scores are probabilities already; else the softmax of the scores over
            ``temperature`` is taken.
        n_classes: the number of classes.
        column: with two classes and decision values, the column of ``out_scores`` holding d.
        temperature: what decision values are divided by before the softmax.
    """
    nodes, constants = [], []
    if probabilities:
        nodes.append(helper.make_node("Cast", ["out_scores"], ["probabilities"], to=TensorProto.FLOAT))
    else:
        constants.append(numpy_helper.from_array(np.float32(temperature), "out_temperature"))
        if n_classes == 2:
            # One decision value d, for the second class: p = softmax([0, d]), logistic regression's rule. skl2onnx 1.20
            # writes d as [d] (LinearSVC), [d, -d] (SVC) or [-d, d] (SGDClassifier); tests/test_export.py checks each.
            constants += [numpy_helper.from_array(np.array([column], np.int64), "out_column"), numpy_helper.from_array(np.float32(0), "out_zero")]
            nodes += [
                helper.make_node("Gather", ["out_scores", "out_column"], ["out_d"], axis=1),
                helper.make_node("Mul", ["out_d", "out_zero"], ["out_z"]),
                helper.make_node("Concat", ["out_z", "out_d"], ["out_logits"], axis=1),
            ]
        else:
            nodes.append(helper.make_node("Identity", ["out_scores"], ["out_logits"]))
        nodes += [helper.make_node("Div", ["out_logits", "out_temperature"], ["out_tempered"]),
                  helper.make_node("Softmax", ["out_tempered"], ["probabilities"], axis=1)]
    nodes.append(helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes, "outputs",
        [helper.make_tensor_value_info("out_scores", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [None])],
        initializer=constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
