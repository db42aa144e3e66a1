"""Metrics on the line's own terms: per-class precision/recall/F1, balanced accuracy, macro F1, ROC and PR curves
of a positive class, the operating point (a score threshold picked on held-out images), paired tests and
bootstrap intervals. Pure numpy; checked against scikit-learn in the tests.

- balanced accuracy: the mean of per-class recalls (Brodersen et al., "The balanced accuracy and its posterior
  distribution", ICPR 2010); what top-1 becomes when every class counts the same.
- ROC-AUC: the Mann-Whitney probability that a positive image outscores a negative one (ties count half);
  PR-AUC: average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (scikit-learn's form).
- recall at a false-reject rate: the share of positive (defective) images rejected when the threshold is the one
  that rejected at most that share of negative (good) images on a calibration split, as inspection tools
  report it; the threshold is never picked on the images it is reported on.
- paired tests of two models on the same images: exact McNemar for top-1 and for recall (both are "right or
  wrong per image"); for balanced accuracy and macro F1, a paired permutation test that swaps the two models'
  predictions image by image (the exact randomization distribution is sampled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgedistill.judge.thresholds import OperatingPoint, pick_threshold  # noqa: F401  (part of the metrics' API)
from edgedistill.resample import bootstrap_samples  # noqa: F401  (part of the metrics' API)
from edgerun.decision import positive_scores, rates_at, softmax

METRICS = ("top1", "balanced_accuracy", "macro_f1", "recall_at_false_reject")
IMBALANCE_RATIO = 1.5  # largest / smallest training class above which top-1 is the wrong yardstick
DEFAULT_MAX_FALSE_REJECT = 0.05
TITLES = {
    "top1": "top-1",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "recall_at_false_reject": "recall at the false-reject limit",
    "recall": "recall",
}

__all__ = ["softmax", "positive_scores", "rates_at", "confusion_matrix"]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


# ------------------------------------------------------------------------------------ counts and their metrics
def counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, predicted, true) per class."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    tp = np.bincount(labels[labels == predicted], minlength=num_classes)[:num_classes]
    return tp, np.bincount(predicted, minlength=num_classes)[:num_classes], np.bincount(labels, minlength=num_classes)


def metric_from_counts(name: str, tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """A metric of per-class counts; the class axis is the last, any leading axes are kept (batches of resamples).

    ``recall`` is the recall of class 1 of a binary view (positive vs the rest). Macro averages run over the classes
    that have images (support > 0), as scikit-learn's do when given those labels."""
    tp, pred, true = (np.asarray(x, dtype=np.float64) for x in (tp, pred, true))
    if name == "top1":
        return tp.sum(-1) / np.maximum(true.sum(-1), 1)
    if name == "recall":
        return tp[..., 1] / np.maximum(true[..., 1], 1)
    present = true > 0
    if name == "balanced_accuracy":
        recall = np.where(present, tp / np.maximum(true, 1), 0.0)
        return recall.sum(-1) / np.maximum(present.sum(-1), 1)
    if name == "macro_f1":
        f1 = np.where(pred + true > 0, 2 * tp / np.maximum(pred + true, 1), 0.0)
        return np.where(present, f1, 0.0).sum(-1) / np.maximum(present.sum(-1), 1)
    raise ValueError(f"unknown metric '{name}' (known: top1, balanced_accuracy, macro_f1, recall)")


def per_class(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of every class (0 where a ratio has no images, as scikit-learn)."""
    tp, pred, true = counts(labels, predicted, len(classes))
    out = {}
    for i, name in enumerate(classes):
        precision = tp[i] / pred[i] if pred[i] else 0.0
        recall = tp[i] / true[i] if true[i] else 0.0
        f1 = 2 * tp[i] / (pred[i] + true[i]) if pred[i] + true[i] else 0.0
        out[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(true[i])}
    return out


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    return float(metric_from_counts("balanced_accuracy", *counts(labels, predicted, num_classes)))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    return float(metric_from_counts("macro_f1", *counts(labels, predicted, num_classes)))


# ------------------------------------------------------------------------------------------ curves of one class
def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U / (P N), ties half); None without both kinds of image."""
    pos = np.asarray(is_positive, dtype=bool)
    p, n = int(pos.sum()), int((~pos).sum())
    if not p or not n:
        return None
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[pos].sum() - p * (p + 1) / 2.0) / (p * n))


def _cumulative(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when rejecting at each distinct score, from the highest down, and the thresholds."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], np.asarray(is_positive, dtype=bool)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each distinct score
    tps = np.cumsum(y)[last]
    return tps, (last + 1) - tps, s[last]


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """False-positive (false-reject) and true-positive (recall) rates at every distinct threshold, from (0, 0)."""
    tps, fps, thresholds = _cumulative(is_positive, scores)
    p, n = max(int(tps[-1]), 1), max(int(fps[-1]), 1)
    return {
        "false_reject": [0.0] + list(fps / n),
        "recall": [0.0] + list(tps / p),
        "threshold": [float("inf")] + [float(t) for t in thresholds],
    }


def precision_recall_curve(is_positive: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    tps, fps, thresholds = _cumulative(is_positive, scores)
    p = max(int(tps[-1]), 1)
    return {
        "precision": list(tps / np.maximum(tps + fps, 1)),
        "recall": list(tps / p),
        "threshold": [float(t) for t in thresholds],
    }


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """PR-AUC as scikit-learn's average_precision_score: ``sum_n (R_n - R_{n-1}) P_n``."""
    if not np.asarray(is_positive, dtype=bool).any():
        return None
    curve = precision_recall_curve(is_positive, scores)
    recall = np.asarray(curve["recall"])
    return float(np.sum(np.diff(np.r_[0.0, recall]) * np.asarray(curve["precision"])))


def thin(curve: dict[str, list[float]], points: int = 200) -> dict[str, list[float]]:
    """At most ``points`` evenly spaced points of a curve (for summaries and plots), first and last kept."""
    n = len(next(iter(curve.values())))
    if n <= points:
        return curve
    keep = np.unique(np.r_[np.linspace(0, n - 1, points).round().astype(int), n - 1])
    return {k: [v[i] for i in keep] for k, v in curve.items()}


# ------------------------------------------------------------------------------------------- the operating point
# --------------------------------------------------------------------------------------------- choosing a metric
@dataclass(frozen=True)
class EvalPlan:
    """What the comparison of a run is about: the metric (and why), the positive class (and why), the operating
    point, the training classes' imbalance ratio."""

    metric: str
    metric_reason: str
    positive: Optional[str]
    positive_index: Optional[int]
    positive_reason: str
    operating_point: Optional[OperatingPoint]
    imbalance: float
    warnings: tuple[str, ...] = ()
    confidence: Optional[float] = None  # every threshold picked on calibration images holds with it

    @property
    def metric_title(self) -> str:
        return TITLES[self.metric]

    @property
    def false_reject_limit(self) -> float:
        op = self.operating_point
        return op.max_false_reject if op is not None and op.max_false_reject is not None else DEFAULT_MAX_FALSE_REJECT

    def metric_point(self) -> Optional[OperatingPoint]:
        """The operating point the metric itself needs (recall at the false-reject limit), else None."""
        return (
            OperatingPoint(max_false_reject=self.false_reject_limit, confidence=self.confidence)
            if self.metric == "recall_at_false_reject"
            else None
        )

    def as_dict(self) -> dict[str, Any]:
        op = self.operating_point
        return {
            "name": self.metric,
            "title": self.metric_title,
            "reason": self.metric_reason,
            "positive_class": self.positive,
            "positive_reason": self.positive_reason,
            "operating_point": None
            if op is None
            else {"target_recall": op.target_recall, "max_false_reject": op.max_false_reject},
            "threshold_confidence": self.confidence,
            "false_reject_limit": self.false_reject_limit if self.metric == "recall_at_false_reject" else None,
            "imbalance_ratio": self.imbalance,
            "warnings": list(self.warnings),
        }


def plan_evaluation(
    metric: Optional[str],
    positive: Optional[str],
    operating_point: Optional[OperatingPoint],
    classes: Sequence[str],
    train_labels: np.ndarray,
    where: str = "evaluate",
    confidence: Optional[float] = None,
) -> EvalPlan:
    """The metric and positive class a run is judged on, from the recipe's choices and the training labels.

    Default metric: balanced accuracy when the largest training class has more than 1.5x the images of the
    smallest, else top-1. Default positive class: for two classes, the minority one; none otherwise (ROC/PR and
    operating points then need ``evaluate.positive_class``)."""
    labelled = np.asarray(train_labels)
    labelled = labelled[labelled >= 0]
    sizes = np.bincount(labelled, minlength=len(classes))
    smallest = int(sizes.min()) if len(sizes) else 0
    ratio = float(sizes.max() / smallest) if smallest else float("inf")
    sizes_text = (
        ", ".join(f"{c} {n}" for c, n in zip(classes, sizes))
        if len(classes) <= 12
        else f"largest {int(sizes.max())}, smallest {smallest}"
    )
    warnings = []
    if metric is None:
        if ratio > IMBALANCE_RATIO:
            metric, reason = (
                "balanced_accuracy",
                (
                    f"the largest training class has {ratio:.1f}x the images of the smallest ({sizes_text}), above "
                    f"{IMBALANCE_RATIO}x: top-1 would reward a model that favours the majority"
                ),
            )
        else:
            metric, reason = "top1", f"the training classes are balanced within {IMBALANCE_RATIO}x ({ratio:.2f}x)"
        reason += f" (default; set {where}.metric to choose)"
    else:
        reason = f"{where}.metric"
        if metric == "top1" and ratio > IMBALANCE_RATIO:
            warnings.append(
                f"the training classes are imbalanced {ratio:.1f}:1 ({sizes_text}) and {where}.metric "
                "is top1, which rewards a model that calls everything the majority class: consider "
                f"{where}.metric: balanced_accuracy (or recall_at_false_reject with "
                f"{where}.positive_class)"
            )
    if positive is not None:
        if positive not in classes:
            import difflib

            close = difflib.get_close_matches(positive, list(classes), n=1)
            raise ValueError(
                f"{where}.positive_class '{positive}' is not a class of this data ({', '.join(classes)})"
                + (f"; did you mean '{close[0]}'?" if close else "")
            )
        index, positive_reason = list(classes).index(positive), f"{where}.positive_class"
    elif len(classes) == 2:
        index = int(np.argmin(sizes))
        positive = classes[index]
        positive_reason = (
            f"the minority of the two classes ({positive}: {int(sizes[index])} of {int(sizes.sum())} "
            f"training images; set {where}.positive_class to choose)"
        )
    else:
        index, positive_reason = None, f"none: {len(classes)} classes (set {where}.positive_class for ROC/PR curves)"
    needs = [
        k
        for k, v in (
            ("operating_point", operating_point),
            ("metric: recall_at_false_reject", metric == "recall_at_false_reject" or None),
        )
        if v
    ]
    if needs and index is None:
        raise ValueError(
            f"{where}.{needs[0]} needs a positive class, and this data has {len(classes)} classes: set "
            f"{where}.positive_class to the class whose recall matters"
        )
    if operating_point is not None and confidence is not None and operating_point.confidence is None:
        operating_point = OperatingPoint(operating_point.target_recall, operating_point.max_false_reject, confidence)
    return EvalPlan(
        metric, reason, positive, index, positive_reason, operating_point, ratio, tuple(warnings), confidence
    )


# -------------------------------------------------------------------------------------------- paired comparisons
def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two classifiers on the same images (McNemar 1947; the exact binomial form).

    Only discordant images count: ``a_only`` (a right, b wrong) and ``b_only``. Under "equally accurate"
    each discordant image is a fair coin, so the two-sided p-value is ``min(1, 2 * P[X <= min(a_only, b_only)])``
    for X ~ Binomial(a_only + b_only, 1/2), computed with exact integers.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    p = 1.0 if n == 0 else min(1.0, 2 * tail / 2**n)
    return {"test": "mcnemar", "a_only": a_only, "b_only": b_only, "discordant": n, "images": int(len(a)), "p_value": p}


def permutation_test(
    name: str,
    labels: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_classes: int,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired permutation test of ``metric(a) - metric(b)`` on the same images: under "equally good" the two
    models' predictions of each image are exchangeable, so each discordant image's pair is swapped at random;
    two-sided p = (1 + #{|d*| >= |d|}) / (1 + resamples) (Phipson & Smyth 2010: never 0)."""
    y, a, b = (np.asarray(x) for x in (labels, pred_a, pred_b))
    k = num_classes
    same = a == b
    base_tp, base_pred, true = counts(y[same], a[same], k)
    true = np.bincount(y, minlength=k)
    d = ~same
    eye = np.eye(k)
    a_tp, b_tp = eye[y[d]] * (a[d] == y[d])[:, None], eye[y[d]] * (b[d] == y[d])[:, None]
    a_pred, b_pred = eye[a[d]], eye[b[d]]
    observed = float(
        metric_from_counts(name, base_tp + a_tp.sum(0), base_pred + a_pred.sum(0), true)
        - metric_from_counts(name, base_tp + b_tp.sum(0), base_pred + b_pred.sum(0), true)
    )
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // max(1, int(d.sum()) * k)))
    extreme, done = 0, 0
    while done < resamples:
        m = rng.integers(0, 2, size=(min(chunk, resamples - done), int(d.sum()))).astype(np.float64)
        # model X takes a where m = 1 and b elsewhere; model Y the other one of each pair
        x_tp = base_tp + b_tp.sum(0) + m @ (a_tp - b_tp)
        x_pred = base_pred + b_pred.sum(0) + m @ (a_pred - b_pred)
        y_tp = base_tp + a_tp.sum(0) - m @ (a_tp - b_tp)
        y_pred = base_pred + a_pred.sum(0) - m @ (a_pred - b_pred)
        diff = metric_from_counts(name, x_tp, x_pred, true) - metric_from_counts(name, y_tp, y_pred, true)
        extreme += int((np.abs(diff) >= abs(observed) - 1e-12).sum())
        done += len(m)
    return {
        "test": "permutation",
        "difference": observed,
        "discordant": int(d.sum()),
        "images": int(len(y)),
        "resamples": resamples,
        "p_value": (1 + extreme) / (1 + resamples),
    }


# --------------------------------------------------------------------------------------------------- bootstrap
def resampled_metric(
    name: str, labels: np.ndarray, predicted: np.ndarray, num_classes: int, idx: np.ndarray
) -> np.ndarray:
    """The metric on each resample (rows of ``idx``)."""
    y, p = np.asarray(labels), np.asarray(predicted)
    out = np.empty(len(idx))
    for r, rows in enumerate(idx):
        out[r] = metric_from_counts(name, *counts(y[rows], p[rows], num_classes))
    return out


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, lo)), float(np.percentile(finite, hi))]


def resampled(fn: Callable[[np.ndarray], Optional[float]], idx: np.ndarray) -> np.ndarray:
    """``fn(rows)`` on each resample; NaN where it has no value (a resample without positives)."""
    values = [fn(rows) for rows in idx]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
