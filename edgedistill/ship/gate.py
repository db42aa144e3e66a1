"""The INT8 gate's images and statistics: images kept apart, each variant at its own threshold, non-inferiority.

Three kinds of images meet in an export, and none may decide for another:

- the calibration images of the line's threshold (the evaluate stage's calibration split): every variant's own
  threshold is picked there, by the same rule and confidence as the FP32 student's;
- the gate images: a part of the evaluation split on which the INT8 gate compares each variant with FP32 and
  chooses the one that ships;
- the check images (``val.npz``): the rest, which chose nothing; the host's figures the manifest records for the
  device, and ``edgerun validate``, are on them.

On the line's terms (``LineGate``) the gate is a non-inferiority test: a variant passes when the upper one-sided 95%
bootstrap bound of its recall drop and of its false-reject rise against FP32, each model at its own threshold, is
within ``export.int8_max_drop``. A bootstrap resample draws the calibration images and the gate images again and
picks both thresholds again, so the bound carries the thresholds' own uncertainty; it is paired (both models on the
same resampled images), so a variant that decides every image as FP32 does has a bound of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from edgerun.decision import positive_scores, rates_at


def split_apart(
    labels: Optional[np.ndarray], n: int, n_check: int, n_gate: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(check indices, gate indices) into a split of ``n`` images, disjoint, each sorted; stratified by ``labels``
    when given (each class shared in proportion), a plain random draw otherwise. When the split holds fewer than
    ``n_check + n_gate`` images, the check images get at most half of it and the gate the rest."""
    if n_check + n_gate > n:
        n_check = min(n_check, max(1, n // 2))
        n_gate = min(n_gate, n - n_check)
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
        return np.sort(order[:n_check]), np.sort(order[n_check : n_check + n_gate])
    labels = np.asarray(labels)
    check, gate = [], []
    classes, counts = np.unique(labels, return_counts=True)
    want_check = _apportion(counts, n_check)
    want_gate = _apportion(counts - want_check, n_gate)
    for c, k_check, k_gate in zip(classes, want_check, want_gate):
        members = rng.permutation(np.flatnonzero(labels == c))
        check.append(members[:k_check])
        gate.append(members[k_check : k_check + k_gate])
    return np.sort(np.concatenate(check)), np.sort(np.concatenate(gate))


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` shared over classes in proportion to ``counts`` (largest remainders), never above a class's count."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(min(total, counts.sum()))
    if total == 0:
        return np.zeros_like(counts)
    exact = counts * total / counts.sum()
    share = np.minimum(np.floor(exact).astype(np.int64), counts)
    for i in np.argsort(-(exact - share), kind="stable"):
        if share.sum() >= total:
            break
        if share[i] < counts[i]:
            share[i] += 1
    return share


@dataclass
class LineGate:
    """The line's decision for the INT8 gate: the positive class, the calibration images' labels and the FP32
    model's outputs on them and on the gate images, how a threshold is picked (the evaluate stage's rule and
    confidence: positives, scores -> threshold), the margin (``export.int8_max_drop``) and the bootstrap."""

    positive_index: int
    calib_labels: np.ndarray
    gate_labels: np.ndarray
    fp32_calib: np.ndarray  # FP32 outputs (logits) on the calibration images
    fp32_gate: np.ndarray  # ... and on the gate images
    pick: Callable[[np.ndarray, np.ndarray], float]
    margin: float
    resamples: int = 1000
    seed: int = 0

    def threshold(self, calib_outputs: np.ndarray) -> float:
        """A model's own threshold, picked on the calibration images by the line's rule."""
        return self.pick(self._calib_pos, positive_scores(calib_outputs, self.positive_index))

    @property
    def _calib_pos(self) -> np.ndarray:
        return np.asarray(self.calib_labels) == self.positive_index

    def rates(self, outputs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
        """Recall and false-reject rate of a model's ``outputs`` on images with ``labels`` at ``threshold``."""
        return rates_at(
            np.asarray(labels) == self.positive_index, positive_scores(outputs, self.positive_index), threshold
        )

    def judge(self, variant_calib: np.ndarray, variant_gate: np.ndarray) -> dict[str, Any]:
        """A variant against FP32 on the gate images, each at its own threshold: recall drop and false-reject rise
        (> 0: the variant is worse), their upper one-sided 95% bounds, and whether both are within the margin."""
        k = self.positive_index
        cal_pos, gate_pos = self._calib_pos, np.asarray(self.gate_labels) == k
        cal = {"fp32": positive_scores(self.fp32_calib, k), "int8": positive_scores(variant_calib, k)}
        gate = {"fp32": positive_scores(self.fp32_gate, k), "int8": positive_scores(variant_gate, k)}
        thresholds = {m: self.pick(cal_pos, cal[m]) for m in cal}
        at = {m: rates_at(gate_pos, gate[m], thresholds[m]) for m in gate}
        drop = _difference(at["fp32"]["recall"], at["int8"]["recall"])
        rise = _difference(at["int8"]["false_reject"], at["fp32"]["false_reject"])
        drops, rises = self._bootstrap(cal_pos, gate_pos, cal, gate)
        drop_upper, rise_upper = _upper(drops), _upper(rises)
        # the same bound with both thresholds held at their values: what the gate images alone leave uncertain
        gate_drops, gate_rises = self._bootstrap(cal_pos, gate_pos, cal, gate, thresholds=thresholds)
        return {
            "threshold": thresholds["int8"],
            "fp32_threshold": thresholds["fp32"],
            "recall": at["int8"]["recall"],
            "false_reject": at["int8"]["false_reject"],
            "fp32_recall": at["fp32"]["recall"],
            "fp32_false_reject": at["fp32"]["false_reject"],
            "positives": at["int8"]["positives"],
            "negatives": at["int8"]["negatives"],
            "recall_drop": drop,
            "false_reject_rise": rise,
            "recall_drop_upper": drop_upper,
            "false_reject_rise_upper": rise_upper,
            "recall_drop_upper_gate_only": _upper(gate_drops),
            "false_reject_rise_upper_gate_only": _upper(gate_rises),
            "calibration_positives": int(cal_pos.sum()),
            "calibration_negatives": int((~cal_pos).sum()),
            "margin": self.margin,
            "resamples": self.resamples,
            "passes": bool(
                drop_upper is not None
                and rise_upper is not None
                and drop_upper <= self.margin + 1e-12
                and rise_upper <= self.margin + 1e-12
            ),
        }

    def _bootstrap(
        self,
        cal_pos: np.ndarray,
        gate_pos: np.ndarray,
        cal: dict[str, np.ndarray],
        gate: dict[str, np.ndarray],
        thresholds: Optional[dict[str, float]] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Paired resamples of the calibration and gate images, both thresholds picked again on each; with
        ``thresholds``, the gate images alone are resampled and the thresholds held."""
        rng = np.random.default_rng(self.seed)
        n_cal, n_gate = len(cal_pos), len(gate_pos)
        drops = np.full(self.resamples, np.nan)
        rises = np.full(self.resamples, np.nan)
        for b in range(self.resamples):
            ci, gi = rng.integers(0, n_cal, n_cal), rng.integers(0, n_gate, n_gate)
            try:
                t = thresholds or {m: self.pick(cal_pos[ci], cal[m][ci]) for m in cal}
            except ValueError:  # a resample without a positive (or negative) calibration image: no threshold
                continue
            pos = gate_pos[gi]
            rejected = {m: gate[m][gi] >= t[m] for m in gate}
            if pos.any():
                drops[b] = rejected["fp32"][pos].mean() - rejected["int8"][pos].mean()
            if (~pos).any():
                rises[b] = rejected["int8"][~pos].mean() - rejected["fp32"][~pos].mean()
        return drops, rises


def _difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else float(a - b)


def _upper(values: np.ndarray, level: float = 0.95) -> Optional[float]:
    """The upper one-sided ``level`` bootstrap bound (the percentile), None when no resample had a value."""
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, 100 * level)) if len(finite) else None
