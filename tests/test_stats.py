"""The statistics module: each function against values worked out by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.stats import (
    TEMPERATURE_BOUNDS, discordant_pairs, expected_calibration_error, fit_temperature, mcnemar, softmax, wilson_interval,
)

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def test_wilson_interval_of_8_out_of_10_is_the_closed_form() -> None:
    # p = 0.8, n = 10: centre (p + z^2/2n) / (1 + z^2/n), half-width z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    z2 = Z95**2
    centre = (0.8 + z2 / 20) / (1 + z2 / 10)
    half = Z95 / (1 + z2 / 10) * math.sqrt(0.8 * 0.2 / 10 + z2 / 400)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook value


def test_wilson_interval_at_the_ends_and_its_width() -> None:
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z95**2 / (10 + Z95**2)))  # Wald's would be the point 0
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + Z95**2))
    narrow, wide = wilson_interval(800, 1000), wilson_interval(8, 10, confidence=0.99)
    assert narrow[1] - narrow[0] < 0.05 < wilson_interval(8, 10)[1] - wilson_interval(8, 10)[0] < wide[1] - wide[0]


@pytest.mark.parametrize("args", [(11, 10), (-1, 10), (0, 0), (0.5, 10), (True, 10)])
def test_wilson_interval_refuses_impossible_counts(args: tuple) -> None:
    with pytest.raises(ValueError, match="Wilson interval"):
        wilson_interval(*args)


def _pairs(both: int, neither: int, only_a: int, only_b: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * both + [False] * neither + [True] * only_a + [False] * only_b
    b = [True] * both + [False] * neither + [False] * only_a + [True] * only_b
    return np.array(a), np.array(b)


def test_mcnemar_counts_only_the_discordant_images() -> None:
    # 6 discordant images, 5 of them A's: p = 2 * P(X <= 1), X ~ Binomial(6, 1/2) = 2 * (1 + 6) / 64.
    a, b = _pairs(both=5, neither=1, only_a=5, only_b=1)
    assert discordant_pairs(a, b) == (5, 1)
    assert mcnemar(a, b) == pytest.approx(14 / 64) and mcnemar(b, a) == pytest.approx(14 / 64)
    # The images both get right or both wrong change nothing.
    assert mcnemar(*_pairs(both=500, neither=300, only_a=5, only_b=1)) == pytest.approx(14 / 64)
    # All 6 discordant ones A's: 2 / 64, below 0.05.
    assert mcnemar(*_pairs(both=5, neither=1, only_a=6, only_b=0)) == pytest.approx(2 / 64)
    assert mcnemar(*_pairs(both=5, neither=3, only_a=0, only_b=0)) == 1.0


def test_mcnemar_refuses_unpaired_results() -> None:
    with pytest.raises(ValueError, match="same length"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="boolean"):
        mcnemar(np.ones(3), np.ones(3))


# Four predictions of three classes: confidences 0.95 (right), 0.85 (wrong), 0.65 (right), 0.55 (wrong).
PROBABILITIES = np.array([[0.95, 0.03, 0.02], [0.85, 0.10, 0.05], [0.20, 0.65, 0.15], [0.55, 0.25, 0.20]])
LABELS = np.array([0, 1, 1, 2])


def test_expected_calibration_error_on_four_points() -> None:
    # Five bins of width 0.2. (0.8, 1]: 0.95 and 0.85, accuracy 1/2, confidence 0.9, weight 2/4 -> 0.2;
    # (0.6, 0.8]: 0.65 right -> |1 - 0.65| / 4 = 0.0875; (0.4, 0.6]: 0.55 wrong -> 0.55 / 4 = 0.1375.
    assert expected_calibration_error(PROBABILITIES, LABELS, bins=5) == pytest.approx(0.2 + 0.0875 + 0.1375)
    # One bin: |accuracy - mean confidence| = |0.5 - 0.75|.
    assert expected_calibration_error(PROBABILITIES, LABELS, bins=1) == pytest.approx(0.25)
    # Sure and right everywhere: no error.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_expected_calibration_error_refuses_labels_outside_the_columns() -> None:
    with pytest.raises(ValueError, match="column indices 0..2"):
        expected_calibration_error(PROBABILITIES, np.array([0, 1, 1, 3]))


def test_softmax_with_a_temperature() -> None:
    z = np.array([[0.0, math.log(3.0)]])
    np.testing.assert_allclose(softmax(z), [[0.25, 0.75]])
    np.testing.assert_allclose(softmax(z, 0.5), [[0.1, 0.9]])  # twice as sharp: 3^2 = 9 to 1


def test_the_temperature_fit_recovers_the_temperature_the_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20000, 4))
    for true in (0.5, 2.5):
        p = softmax(logits, true)
        labels = (p.cumsum(axis=1) < rng.random((len(p), 1))).sum(axis=1)
        found = fit_temperature(logits, labels)
        assert found == pytest.approx(true, rel=0.05)
        assert fit_temperature(3 * logits, labels) == pytest.approx(3 * found, rel=1e-3)  # scores 3x as large, T too


def test_the_temperature_falls_to_near_its_bound_when_val_is_all_right() -> None:
    # The likelihood keeps rising as T falls; the search ends where it is flat to float precision, well below 1.
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    found = fit_temperature(logits, np.array([0, 1, 0]))
    assert TEMPERATURE_BOUNDS[0] <= found < 0.05
