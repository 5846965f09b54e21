"""The statistics behind the reported numbers: confidence intervals, paired tests, calibration error and temperature scaling.

Pure functions of counts and arrays: evaluate, fit and the report call them; none reads or writes a file.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = ["wilson_interval", "discordant_pairs", "mcnemar", "expected_calibration_error", "softmax", "fit_temperature",
           "TEMPERATURE_BOUNDS"]

TEMPERATURE_BOUNDS = (1e-2, 1e2)
"""The range a fitted temperature is kept in. On a val split a head gets entirely right, the likelihood keeps rising as T
falls; the lower bound stops it at scores a hundred times sharper rather than at zero."""


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n``.

    Chosen over the normal (Wald) interval, which shrinks to a point at 0 % and 100 % and covers too little on small
    test splits; Wilson's stays inside [0, 1] and keeps close to the coverage it claims.

    Args:
        correct: the number right.
        n: the number tried, at least 1.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        (low, high), as fractions.

    Raises:
        ValueError: counts that are not whole numbers with 0 <= correct <= n and n >= 1, or a confidence outside (0, 1).
    """
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (correct, n)):
        raise ValueError(f"the Wilson interval takes whole counts, got correct={correct!r}, n={n!r}")
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"the Wilson interval needs n >= 1 and 0 <= correct <= n, got correct={correct}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0 and n the bounds are exactly 0 and 1; computed, they may be off by a rounding error.
    return 0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == n else min(1.0, centre + half)


def _paired(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a_correct), np.asarray(b_correct)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired results must be two 1-D arrays of the same length, one entry per test image; got shapes {a.shape} and {b.shape}")
    if a.dtype != bool or b.dtype != bool:
        raise ValueError(f"paired results must be boolean (right or wrong per image), got {a.dtype} and {b.dtype}")
    return a, b


def discordant_pairs(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int]:
    """The images only model A got right, and those only model B got right: all that McNemar's test looks at."""
    a, b = _paired(a_correct, b_correct)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """The two-sided p-value of McNemar's exact test that two models, scored on the same images, are equally accurate.

    Images both models get right, or both wrong, say nothing about which is better; of the discordant ones, each is
    A's or B's with probability 1/2 when they are equal, so the count of A's is binomial. Exact rather than the
    chi-squared approximation, which is poor for the few discordant images of a small test split.

    Args:
        a_correct: per image, whether model A got it right.
        b_correct: the same for model B, on the same images in the same order.

    Returns:
        The p-value; 1 when no image is discordant.

    Raises:
        ValueError: arrays that are not boolean, not 1-D or not of the same length.
    """
    only_a, only_b = discordant_pairs(a_correct, b_correct)
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def _checked_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y) or len(y) == 0:
        raise ValueError(f"expected N x classes scores and N labels, N >= 1; got shapes {p.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be column indices 0..{p.shape[1] - 1} of the scores")
    return p, y


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """How far a model's confidence is from its accuracy: the expected calibration error over equal-width bins.

    Each prediction's confidence is its top probability. Predictions are put in ``bins`` equal-width bins of
    confidence ((0, 1/bins], (1/bins, 2/bins], ...); the error is the mean over bins of |accuracy - mean confidence|,
    weighted by the share of predictions in each.

    Args:
        probabilities: N x classes.
        labels: N true class indices (columns of ``probabilities``).
        bins: the number of bins.

    Returns:
        The error, a fraction in [0, 1]: 0 for a model exactly as sure as it is right.
    """
    p, y = _checked_scores(probabilities, labels)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = p.max(axis=1)
    right = (p.argmax(axis=1) == y).astype(np.float64)
    which = np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True)
    # Per bin, |right - confidence| summed rather than averaged: the bin's weight, its share of N, is then a division by N.
    gap = np.abs(np.bincount(which, right, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / len(y))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 whose ``softmax(logits / T)`` best explains ``labels``: least mean negative log-likelihood.

    Temperature scaling (Guo et al., 2017): one scalar, so the ranking, and each prediction, stay as they are; only how
    sure the probabilities are changes. The likelihood is convex in 1/T, so a bounded search on log T finds its minimum,
    within :data:`TEMPERATURE_BOUNDS`.

    Args:
        logits: N x classes scores, e.g. a head's decision values on val.
        labels: N true class indices (columns of ``logits``).

    Returns:
        The temperature.
    """
    z, y = _checked_scores(logits, labels)
    if not np.isfinite(z).all():
        raise ValueError("the scores to calibrate hold NaN or inf")
    from scipy.optimize import minimize_scalar

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    found = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))
