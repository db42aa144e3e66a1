"""An anomaly detector judged as a line would use it: image AUROC and PR-AUC (defective parts above good ones),
recall at the false-reject limit with a threshold picked on good images alone, and where masks exist pixel AUROC
and PRO (per-region overlap, Bergmann et al., "MVTec AD", CVPR 2019 / IJCV 2021: the mean, over false-positive
rates up to 0.3, of the average overlap of each connected defect region), each with a bootstrap interval over
images. Pure numpy, scipy and OpenCV's connected components.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgedistill.judge.metrics import average_precision, bootstrap_samples, interval, roc_auc
from edgedistill.judge.thresholds import OperatingPoint, pick_threshold, threshold_promise

PIXELS = 2_000_000  # pixel AUROC on at most this many pixels (a seeded subsample: every image's pixels alike)


def good_threshold(good_scores: np.ndarray, max_false_reject: float, confidence: Optional[float] = 0.95) -> dict:
    """The threshold (reject when score >= it) that keeps the false-reject rate under ``max_false_reject`` on new
    good parts with ``confidence``, picked on good calibration images only, and what they can promise."""
    scores = np.asarray(good_scores, dtype=np.float64)
    if not len(scores):
        raise ValueError("no good calibration images: the threshold is picked on good images")
    negatives = np.zeros(len(scores), dtype=bool)
    point = OperatingPoint(max_false_reject=max_false_reject, confidence=confidence)
    return {
        "threshold": float(pick_threshold(negatives, scores, point, score_range=None)),  # scores are unbounded
        "rule": point.describe(),
        "calibration_images": int(len(scores)),
        "promise": threshold_promise(negatives, point),
    }


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, seed: int = 0) -> Optional[float]:
    """ROC-AUC of every pixel's map value against its mask (a seeded subsample past ``PIXELS``)."""
    values, truth = np.asarray(maps, np.float64).ravel(), np.asarray(masks).ravel() > 0
    if len(values) > PIXELS:
        keep = np.random.default_rng(seed).choice(len(values), PIXELS, replace=False)
        values, truth = values[keep], truth[keep]
    return roc_auc(truth, values)


def pro_score(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, steps: int = 60) -> Optional[float]:
    """The normalised area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD's PRO)."""
    import cv2

    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks) > 0
    regions = []
    for i, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8))
        regions += [(i, labels == r) for r in range(1, count)]
    good_pixels = maps[~masks]
    if not regions or not len(good_pixels):
        return None
    thresholds = np.quantile(good_pixels, np.linspace(1 - max_fpr, 1, steps))[::-1]
    fprs, pros = [], []
    for t in thresholds:
        fprs.append(float((good_pixels >= t).mean()))
        pros.append(float(np.mean([(maps[i][region] >= t).mean() for i, region in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    order = np.argsort(fprs)
    return float(np.trapezoid(pros[order], fprs[order]) / max_fpr) if fprs.max() > 0 else None


def anomaly_report(
    scores: np.ndarray,
    is_defective: np.ndarray,
    threshold: Optional[float] = None,
    maps: Optional[np.ndarray] = None,
    masks: Optional[np.ndarray] = None,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Image AUROC and PR-AUC, recall and false-reject at ``threshold``, pixel AUROC and PRO where ``masks`` hold
    defects; each with a 95% bootstrap interval over images (the same resamples for every figure)."""
    scores, bad = np.asarray(scores, np.float64), np.asarray(is_defective, dtype=bool)
    if bad.all() or not bad.any():
        raise ValueError("judging a detector needs good and defective images")
    idx = bootstrap_samples(len(scores), samples, seed)

    def with_interval(fn) -> dict:
        value = fn(np.arange(len(scores)))
        draws = np.array([v for v in (fn(i) for i in idx) if v is not None], dtype=np.float64)
        return {"value": value, "interval": interval(draws) if len(draws) else None}

    out = {
        "images": int(len(scores)),
        "defective": int(bad.sum()),
        "image_auroc": with_interval(lambda i: roc_auc(bad[i], scores[i])),
        "pr_auc": with_interval(lambda i: average_precision(bad[i], scores[i])),
    }
    if threshold is not None:
        rejected = scores >= threshold
        out["threshold"] = float(threshold)
        out["recall"] = with_interval(lambda i: float(rejected[i][bad[i]].mean()) if bad[i].any() else None)
        out["false_reject"] = with_interval(lambda i: float(rejected[i][~bad[i]].mean()) if (~bad[i]).any() else None)
    if maps is not None and masks is not None:
        maps, masks = np.asarray(maps), np.asarray(masks)
        if maps.shape != masks.shape:
            raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape")
        if (masks > 0).any():
            out["pixel_auroc"] = pixel_auroc(maps, masks)
            out["pro"] = pro_score(maps[bad], masks[bad])
    return out
