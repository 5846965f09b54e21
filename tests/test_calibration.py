"""Calibrated probabilities: the temperature fit-head fits on val for heads without predict_proba, kept with the head
and used by evaluate; heads saved before it still load, at a temperature of 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.artifacts import load_head
from pipeline.evaluate import evaluate
from pipeline.fit import HeadConfig, fit_head
from pipeline.heads import decision_logits, head_probabilities
from pipeline.stats import expected_calibration_error, fit_temperature, softmax

from .helpers import error, invoke
from .test_fit import SOURCE, make_caches

pytestmark = pytest.mark.usefixtures("one_thread")


def _nll(probabilities: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(probabilities[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize("clf", ["svm", "svm-rbf"])
def test_a_head_without_predict_proba_keeps_the_temperature_fitted_on_val(clf: str) -> None:
    c = make_caches(k=3, sep=0.6, n=(40, 60, 60))  # overlapping classes: val is not all right, so T is not at its bound
    art = load_head(fit_head(HeadConfig(clf=clf, grid=(1.0,), refine=0), SOURCE).path)
    t = art.meta["temperature"]
    assert art.temperature == t == pytest.approx(fit_temperature(decision_logits(art.pipeline, c.X_val), c.y_val), rel=1e-6)
    assert abs(np.log(t)) > 0.1, "the decision values should need rescaling, or this test shows nothing"
    # It is the temperature that best explains val, and the probabilities evaluate scores are taken at it.
    calibrated, raw = head_probabilities(art.pipeline, c.X_val, t), head_probabilities(art.pipeline, c.X_val)
    assert _nll(calibrated, c.y_val) < _nll(raw, c.y_val)
    np.testing.assert_allclose(calibrated, softmax(decision_logits(art.pipeline, c.X_val) / t))
    m = evaluate(art.path)
    assert m["ece"] == pytest.approx(expected_calibration_error(head_probabilities(art.pipeline, c.X_test, t), c.y_test))
    assert m["ece"] != pytest.approx(expected_calibration_error(head_probabilities(art.pipeline, c.X_test), c.y_test))


def test_a_head_with_predict_proba_has_no_temperature() -> None:
    make_caches(k=3)
    art = load_head(fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE).path)
    assert art.meta["temperature"] is None and art.temperature == 1.0


def test_a_head_saved_before_temperatures_loads_at_1_and_is_fitted_again() -> None:
    c = make_caches(k=3, sep=0.6, n=(40, 60, 60))
    config = HeadConfig(clf="svm", grid=(1.0,), refine=0)
    path = fit_head(config, SOURCE).path
    # What an older version wrote: no temperature, and inputs without the record number.
    meta = json.loads(path.read_text())
    del meta["temperature"], meta["inputs"]["record"]
    path.write_text(json.dumps(meta))
    art = load_head(path)
    assert art.temperature == 1.0
    np.testing.assert_allclose(head_probabilities(art.pipeline, c.X_val, art.temperature), softmax(decision_logits(art.pipeline, c.X_val)))
    assert evaluate(path)["n"] == 180
    again = fit_head(config, SOURCE)
    assert again.status == "fitted" and json.loads(again.path.read_text())["temperature"] != 1.0
    assert fit_head(config, SOURCE).status == "up-to-date"


@pytest.mark.parametrize("bad", [-1.0, 0, "warm", True])
def test_a_temperature_that_is_not_a_positive_number_is_refused(bad: object) -> None:
    make_caches(k=3, sep=0.6, n=(40, 60, 60))
    path = fit_head(HeadConfig(clf="svm", grid=(1.0,), refine=0), SOURCE).path
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": bad}))
    with pytest.raises(ValueError, match="the field 'temperature' should be a positive number"):
        evaluate(path)
    assert "the field 'temperature' should be a positive number" in error(invoke("evaluate", path))
