"""Binary classification metrics in numpy: threshold metrics, ROC / PR curves and their areas,
the best-F1 threshold, and bootstrap confidence intervals (no scikit-learn needed).

Conventions: ``labels`` are 0/1 (1 = the turn is complete), ``scores`` are probabilities, and a
score is predicted positive when ``score > threshold`` (the rule of
:func:`smart_turn_mm.predict_endpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "BinaryMetrics",
    "average_precision",
    "best_f1_threshold",
    "binary_metrics",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "pr_curve",
    "roc_auc",
    "roc_curve",
]

# Metrics that get a bootstrap confidence interval.
CI_METRICS = ("accuracy", "f1", "roc_auc", "pr_auc")


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.float64).reshape(-1)
    s = np.asarray(scores).astype(np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y, s


def _ranked(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts at each distinct score, from the highest score down, and
    those distinct scores. Predicting positive for ``score >= distinct[k]`` gives
    ``tp[k]``, ``fp[k]``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = (last_of_run + 1) - tp
    return tp, fp, s_sorted[last_of_run]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), starting at (0, 0); NaN without both classes."""
    y, s = _check(labels, scores)
    pos, neg = y.sum(), len(y) - y.sum()
    if pos == 0 or neg == 0:
        return np.array([np.nan]), np.array([np.nan])
    tp, fp, _ = _ranked(y, s)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN unless both classes are present."""
    fpr, tpr = roc_curve(labels, scores)
    if np.isnan(fpr).any():
        return math.nan
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid rule


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at each distinct threshold, from the highest score down."""
    y, s = _check(labels, scores)
    pos = y.sum()
    if pos == 0:
        return np.array([np.nan]), np.array([np.nan])
    tp, fp, _ = _ranked(y, s)
    return tp / (tp + fp), tp / pos


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: sum over thresholds of precision x recall increase (the
    step-wise area, no interpolation); NaN without positives."""
    precision, recall = pr_curve(labels, scores)
    if np.isnan(recall).any():
        return math.nan
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, the threshold that gives it with the ``score > threshold`` rule).

    The threshold is the midpoint between the last score predicted positive and the next
    lower score (just below the lowest score when everything is predicted positive).
    """
    y, s = _check(labels, scores)
    pos = y.sum()
    if pos == 0 or len(y) == 0:
        return math.nan, math.nan
    tp, fp, distinct = _ranked(y, s)
    f1 = 2 * tp / (tp + fp + pos)
    k = int(np.argmax(f1))
    lower = distinct[k + 1] if k + 1 < len(distinct) else distinct[k] - 1e-6
    return float(f1[k]), float((distinct[k] + lower) / 2)


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of one set of scores. ``threshold`` is the decision threshold used for the
    counts, accuracy, precision, recall and F1; AUCs and the best F1 do not depend on it."""

    n: int
    positives: int
    threshold: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float
    pr_auc: float
    best_f1: float
    best_f1_threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready (NaN becomes None)."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> BinaryMetrics:
    """All metrics of ``scores`` against ``labels`` at ``threshold``."""
    y, s = _check(labels, scores)
    pred = s > threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    best_f1, best_threshold = best_f1_threshold(y, s)
    return BinaryMetrics(
        n=len(y),
        positives=int(y.sum()),
        threshold=float(threshold),
        accuracy=_ratio(tp + tn, len(y)),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        roc_auc=roc_auc(y, s),
        pr_auc=average_precision(y, s),
        best_f1=best_f1,
        best_f1_threshold=best_threshold,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def _quick_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pred = s > threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    return {
        "accuracy": float(np.mean(pred == (y == 1))),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y, s),
        "pr_auc": average_precision(y, s),
    }


def _percentiles(values: Sequence[float], level: float) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(arr, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _bootstrap(
    n: int,
    statistic: Callable[[np.ndarray], dict[str, float]],
    n_resamples: int,
    level: float,
    seed: int,
) -> dict[str, tuple[float, float]]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if n == 0 or n_resamples < 1:
        return {m: (math.nan, math.nan) for m in CI_METRICS}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        for m, v in statistic(idx).items():
            draws[m].append(v)
    return {m: _percentiles(v, level) for m, v in draws.items()}


def bootstrap_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling segments with replacement) for accuracy, F1,
    ROC-AUC and PR-AUC: ``{metric: (low, high)}``."""
    y, s = _check(labels, scores)
    return _bootstrap(
        len(y), lambda i: _quick_metrics(y[i], s[i], threshold), n_resamples, level, seed
    )


def paired_bootstrap_ci(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Intervals for the DIFFERENCE a - b of each metric, both scored on the same resampled
    segments (e.g. audio+video minus audio-only). An interval above 0 means a beats b."""
    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)

    def diff(i: np.ndarray) -> dict[str, float]:
        ma, mb = _quick_metrics(y[i], a[i], threshold), _quick_metrics(y[i], b[i], threshold)
        return {m: ma[m] - mb[m] for m in CI_METRICS}

    return _bootstrap(len(y), diff, n_resamples, level, seed)
