"""The line's reject decision: a positive class (a defect), its score, a threshold chosen on the workstation.

An inspection line does not act on the arg-max: it rejects a part when the model's probability of the positive
class reaches the threshold picked on held-out images for a target recall or a maximum false-reject rate
(``edgedistill``'s evaluate stage; the manifest's ``decision`` carries it here). Recall is the share of positive
(defective) parts rejected; the false-reject rate is the share of negative (good) parts rejected.

One implementation for both sides: the workstation's metrics and the device's ``validate`` and ``camera`` use
these functions. Python 3.6, numpy only.
"""

import numpy as np

from edgerun.errors import BundleError


def softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def positive_scores(logits, index):
    """The probability of class ``index`` for each row of ``logits`` (softmax over the classes)."""
    return softmax(logits)[:, int(index)]


def rates_at(is_positive, scores, threshold):
    """Recall and false-reject rate when every image scoring ``>= threshold`` is rejected."""
    pos = np.asarray(is_positive, dtype=bool)
    rejected = np.asarray(scores, dtype=np.float64) >= float(threshold)
    positives, negatives = int(pos.sum()), int((~pos).sum())
    detected, false_rejects = int((rejected & pos).sum()), int((rejected & ~pos).sum())
    return {
        "recall": detected / positives if positives else None,
        "false_reject": false_rejects / negatives if negatives else None,
        "positives": positives,
        "negatives": negatives,
        "detected": detected,
        "false_rejects": false_rejects,
        "threshold": float(threshold),
    }


def threshold_for(decision, precision):
    """The reject threshold for a model computing in ``precision``: the INT8 model's own (picked on the same
    calibration images by the same rule) when the bundle has one, else the FP32 student's (FP16 engines use it)."""
    own = (decision.get("thresholds") or {}).get(precision)
    return own if own is not None else decision.get("threshold")


def check_decision(data, where):
    """The manifest's optional ``decision``: {metric, positive_class, threshold, ...}; raises BundleError."""
    decision = data.get("decision")
    if decision is None:
        return
    if not isinstance(decision, dict):
        raise BundleError("%s: 'decision' must be an object" % where)
    positive = decision.get("positive_class")
    if positive is not None and positive not in data["classes"]:
        raise BundleError(
            "%s: decision.positive_class '%s' is not one of the classes %s" % (where, positive, data["classes"])
        )
    threshold = decision.get("threshold")
    anomaly = data.get("task") == "anomaly"  # an anomaly score is unbounded: any finite number
    if threshold is not None:
        if positive is None:
            raise BundleError("%s: decision.threshold needs decision.positive_class" % where)
        _check_threshold(threshold, "decision.threshold", anomaly, where)
    for precision, value in sorted((decision.get("thresholds") or {}).items()):
        _check_threshold(value, "decision.thresholds.%s" % precision, anomaly, where)


def _check_threshold(value, key, anomaly, where):
    """A probability in [0, 1]; for an anomaly bundle any finite score."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if anomaly:
        if not number or value != value or value in (float("inf"), float("-inf")):
            raise BundleError("%s: %s must be a finite anomaly score, not %r" % (where, key, value))
    elif not number or not 0.0 <= value <= 1.0:
        raise BundleError("%s: %s must be a probability in [0, 1], not %r" % (where, key, value))


def auroc(is_positive, scores):
    """ROC-AUC of ``scores`` ranking positive above negative images (ties count half), None without both kinds;
    the Mann-Whitney statistic over average ranks. numpy only (the device side)."""
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
