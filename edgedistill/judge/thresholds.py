"""Thresholds picked on calibration images, and what they can promise on new ones. Pure numpy and scipy.

A threshold that reaches a recall (or keeps a false-reject rate) on the calibration images reaches it on new images
only about half the time: the empirical quantile is a point estimate. With ``confidence`` c the threshold is the
order statistic that keeps the target with probability c over the calibration draw, distribution-free: with n
calibration positives, rejecting from the k-th highest positive score leaves a true recall R ~ Beta(k, n - k + 1),
and P(R >= r) = P(Binomial(n, r) <= k - 1) (the Clopper-Pearson duality); k is the smallest that reaches c. For a
false-reject limit f over N negatives, accepting the a+1-th highest negative leaves a true false-reject rate
F ~ Beta(a + 1, N - a), P(F <= f) = P(Binomial(N, f) >= a + 1); a is the largest that reaches c. When even the most
cautious threshold (every calibration positive rejected, every calibration negative accepted) falls short of c, the
calibration split is too small to promise the target: the promise says so, with the images it would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np
from scipy.stats import binom


@dataclass(frozen=True)
class OperatingPoint:
    """Pick the threshold for a recall (``target_recall``) or a false-reject limit (``max_false_reject``), held with
    ``confidence`` on new images (None: the calibration images' own quantile, a point estimate)."""

    target_recall: Optional[float] = None
    max_false_reject: Optional[float] = None
    confidence: Optional[float] = None

    def describe(self) -> str:
        rule = (
            f"recall >= {self.target_recall:g}"
            if self.target_recall is not None
            else f"false-reject rate <= {self.max_false_reject:g}"
        )
        return rule + (f" with {self.confidence:.0%} confidence" if self.confidence else "")


def pick_threshold(
    is_positive: np.ndarray,
    scores: np.ndarray,
    point: OperatingPoint,
    score_range: Optional[tuple[float, float]] = (0.0, 1.0),
) -> float:
    """The threshold (reject when score >= it) for ``point`` on calibration images.

    For a target recall r: the highest threshold that still rejects k of the P positive images, k = ceil(r * P), or
    with ``point.confidence`` the k of the bound (module docstring); for a false-reject limit f: the lowest threshold
    that rejects at most a of the N negative images, a = floor(f * N) or the bound's. The
    threshold is set midway between the deciding score and the next score on the other side, so that a device's
    float rounding cannot move an image across it; with no score on that side, midway to the end of
    ``score_range`` (probabilities: 0 and 1), or for unbounded scores (``score_range=None``: an anomaly score) half
    the scores' mean spacing beyond the deciding one."""
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    distinct = np.unique(s)
    if point.target_recall is not None:
        positives = np.sort(s[pos])[::-1]
        if not len(positives):
            raise ValueError("the calibration images hold no positive image: no threshold reaches a recall")
        k = (
            _recall_count(len(positives), point.target_recall, point.confidence)[0]
            if point.confidence
            else max(1, math.ceil(point.target_recall * len(positives) - 1e-9))
        )
        deciding = positives[k - 1]
        below = distinct[distinct < deciding]
        if len(below):
            return float((deciding + below[-1]) / 2)
        return float((deciding + score_range[0]) / 2) if score_range else float(deciding - _half_spacing(distinct))
    negatives = np.sort(s[~pos])[::-1]
    if not len(negatives):
        raise ValueError("the calibration images hold no negative image: no false-reject rate can be measured")
    allowed = (
        _false_reject_count(len(negatives), point.max_false_reject, point.confidence)[0]
        if point.confidence
        else math.floor(point.max_false_reject * len(negatives) + 1e-9)
    )
    if allowed >= len(negatives):  # every image may be rejected
        return (
            float((distinct[0] + score_range[0]) / 2) if score_range else float(distinct[0] - _half_spacing(distinct))
        )
    deciding = negatives[allowed]  # the highest-scoring negative that must stay accepted
    above = distinct[distinct > deciding]
    if len(above):
        return float((deciding + above[0]) / 2)
    return float((deciding + score_range[1]) / 2) if score_range else float(deciding + _half_spacing(distinct))


def _half_spacing(distinct: np.ndarray) -> float:
    """Half the mean gap between distinct scores (a margin for unbounded scores; 1e-6 for a single score)."""
    if len(distinct) < 2:
        return 1e-6 * max(1.0, abs(float(distinct[0])))
    return float(distinct[-1] - distinct[0]) / (len(distinct) - 1) / 2


@lru_cache(maxsize=4096)
def _recall_count(n: int, target: float, confidence: float) -> tuple[int, float]:
    """(k, the confidence it gives): the fewest of ``n`` calibration positives to reject, from the top, for a true
    recall of at least ``target`` with ``confidence``; all ``n`` when even that falls short."""
    held = binom.cdf(np.arange(n), n, target)  # k = 1..n rejected: P(Binomial(n, r) <= k - 1)
    enough = np.flatnonzero(held >= confidence)
    k = int(enough[0]) + 1 if len(enough) else n
    return k, float(held[k - 1])


@lru_cache(maxsize=4096)
def _false_reject_count(n: int, limit: float, confidence: float) -> tuple[int, float]:
    """(a, the confidence it gives): the most of ``n`` calibration negatives that may score above the threshold for
    a true false-reject rate of at most ``limit`` with ``confidence``; 0 when even that falls short."""
    held = binom.sf(np.arange(n), n, limit)  # a = 0..n-1 above the threshold: P(Binomial(N, f) >= a + 1)
    enough = np.flatnonzero(held >= confidence)
    a = int(enough[-1]) if len(enough) else 0
    return a, float(held[a])


def images_needed(point: OperatingPoint) -> int:
    """The calibration images of the deciding kind (positives for a recall, negatives for a false-reject limit) that
    the most cautious threshold needs to promise ``point`` with its confidence."""
    c = point.confidence
    if point.target_recall is not None:
        return 1 if point.target_recall <= 0 else math.ceil(math.log(1 - c) / math.log(point.target_recall))
    return math.ceil(math.log(1 - c) / math.log(1 - point.max_false_reject))


def threshold_promise(is_positive: np.ndarray, point: OperatingPoint) -> dict[str, Any]:
    """What ``point``'s threshold, picked on these calibration labels, promises on new images: the confidence it
    holds with, whether that reaches ``point.confidence``, the deciding images and how many it would need."""
    pos = np.asarray(is_positive, dtype=bool)
    if point.target_recall is not None:
        kind, n = "positive", int(pos.sum())
        count, achieved = _recall_count(n, point.target_recall, point.confidence) if n else (0, 0.0)
    else:
        kind, n = "negative", int((~pos).sum())
        count, achieved = _false_reject_count(n, point.max_false_reject, point.confidence) if n else (0, 0.0)
    return {
        "rule": point.describe(),
        "confidence": point.confidence,
        "achieved": achieved,
        "holds": achieved >= point.confidence - 1e-12,
        "deciding": kind,
        "images": n,
        "images_needed": images_needed(point),
        "count": count,
    }


def promise_text(promise: dict[str, Any], split: str) -> str:
    """One sentence on what a threshold picked on ``split`` can promise (and, when too small, what it would need)."""
    kind = promise["deciding"]  # positive images decide a recall, negative ones a false-reject rate
    if promise["holds"]:
        return (
            f"{promise['rule']}: holds on new images with {promise['achieved']:.1%} confidence (picked on "
            f"{promise['images']} {kind} images of '{split}')"
        )
    return (
        f"{promise['rule']} cannot be promised: '{split}' holds {promise['images']} {kind} image(s), enough for "
        f"{promise['achieved']:.0%} confidence at the most cautious threshold; {promise['images_needed']} are needed "
        f"(or lower evaluate.threshold_confidence, or relax the target)"
    )
