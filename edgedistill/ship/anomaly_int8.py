"""The anomaly bundle's INT8 model, judged on the detector's own terms: the ranking (image AUROC) and the reject
decision at the line's threshold, never top-1.

- The graph: explicit Q/DQ by TensorRT's rules (``ship.qdq``), activation ranges from the good calibration
  images (the ``val/`` good parts that fitted the normalisation); ``export.int8_method`` picks the calibrator.
  MinMax is the default for a reason that matters here: the anomaly is the tail, and a range clipped to good
  images' 99.99th percentile saturates exactly the activations a defect drives.
- Its own threshold: the INT8 model's scores on the same calibration images, the same rule as FP32's
  (``pick``), as the classifier's INT8 variants do; the device rejects at it (``decision.thresholds.int8``).
- The gate: on the report split's images (they chose no threshold; the gate's one choice is accept or reject),
  a paired bootstrap of the AUROC drop; accepted when its upper 95% bound is within ``export.int8_max_drop``.
  Recall and false-reject at each model's own threshold and the scores' largest difference are reported beside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgedistill.errors import ExportError
from edgedistill.resample import bootstrap_samples
from edgedistill.ship.onnx import chunked_outputs, cpu_runner
from edgerun.decision import auroc, rates_at
from edgerun.runtime.runners import OrtRunner


@dataclass
class AnomalyInt8Job:
    """``fp32``: the bundle's model.onnx; ``calib``: the good calibration images (model input, N,3,S,S);
    ``calib_all`` and ``pick``: every calibration image and the rule that turns their scores into a threshold
    dict (``{"threshold": ...}``), FP32's rule; ``report`` and ``is_defective``: the report split's images
    (model input) and labels; ``fp32_scores``: the FP32 graph's scores on them; ``method``: the calibrator;
    ``max_drop``: the gate; ``seed``: the bootstrap's."""

    fp32: Path
    calib: np.ndarray
    calib_all: np.ndarray
    pick: Callable[[np.ndarray], dict]
    report: np.ndarray
    is_defective: np.ndarray
    fp32_scores: np.ndarray
    method: str = "minmax"
    max_drop: float = 0.01
    seed: int = 0
    samples: int = 1000


def scores_of(runner: OrtRunner, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The graph's image scores (its first output) on model-ready images, through an active ``runner``."""
    return chunked_outputs(runner, x.astype(np.float32), batch).reshape(len(x))


def build_anomaly_int8(job: AnomalyInt8Job, out: Path) -> tuple[dict, dict]:
    """Write the Q/DQ model to ``out``; return (the manifest's ``variants.int8`` entry, the host figures)."""
    import onnx

    from edgedistill.ship.qdq import activation_ranges, insert_qdq, qdq_violations

    amax = activation_ranges(job.fp32, job.calib.astype(np.float32), 8, job.method, out.parent)
    model = insert_qdq(onnx.load(str(job.fp32)), amax)
    broken = qdq_violations(model)
    if broken:
        raise ExportError(f"the anomaly INT8 graph breaks TensorRT's Q/DQ rules: {broken[:3]}")
    onnx.save(model, str(out))
    with cpu_runner(out) as runner:
        picked = job.pick(scores_of(runner, job.calib_all))
        scores = scores_of(runner, job.report)
    threshold = float(picked["threshold"])
    bad = np.asarray(job.is_defective, dtype=bool)
    fp32, int8 = auroc(bad, job.fp32_scores), auroc(bad, scores)
    drops = []
    for idx in bootstrap_samples(len(bad), job.samples, job.seed):
        a, b = auroc(bad[idx], job.fp32_scores[idx]), auroc(bad[idx], scores[idx])
        if a is not None and b is not None:
            drops.append(a - b)
    upper = float(np.quantile(drops, 0.95)) if drops else None
    accepted = upper is not None and upper <= job.max_drop
    figures = {
        "image_auroc": int8,
        "fp32_image_auroc": fp32,
        "auroc_drop": None if None in (fp32, int8) else fp32 - int8,
        "auroc_drop_upper95": upper,
        "threshold": threshold,
        **{k: v for k, v in rates_at(bad, scores, threshold).items() if k in ("recall", "false_reject")},
        "score_max_abs_error": float(np.abs(scores - job.fp32_scores).max()),
        "images": int(len(bad)),
        "gate": f"paired bootstrap ({job.samples}) of the image AUROC drop on the report split; upper 95% bound "
        f"<= {job.max_drop}",
        "status": "accepted" if accepted else "rejected",
        "calibration": job.method,
    }
    variant = {
        "file": out.name,
        "precision": "int8",
        "format": "qdq",
        "symmetric": True,
        "explicit_quantization": True,
        "method": "ptq",
        "calibration": job.method,
        "threshold": threshold,
        "image_auroc": int8,
        "drop": figures["auroc_drop"] or 0.0,
        "status": figures["status"],
        "for": "tensorrt (every version, no calibrator) and onnxruntime",
    }
    return variant, figures
