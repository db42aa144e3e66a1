"""An anomaly detector as a bundle for the device: one ONNX graph from image to (score, anomaly map), teacher,
student and normalisation folded in, with the threshold picked on good images, the report split's images (which
chose nothing) for ``edgerun validate`` and the host's figures on them. The same manifest schema as every bundle
(``task: anomaly``, classes good / defective, ``model.output_name`` the score, ``model.map_name`` the map).
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgedistill.errors import ExportError
from edgedistill.ship.anomaly_int8 import AnomalyInt8Job, build_anomaly_int8, scores_of
from edgedistill.ship.onnx import cpu_runner
from edgerun.bundle.manifest import ANOMALY_CLASSES, SCHEMA_VERSION, write_manifest
from edgerun.preprocess import PreprocessSpec
from edgerun.runtime.runners import OrtRunner

log = logging.getLogger(__name__)

INPUT, SCORE, MAP = "input", "score", "anomaly_map"
OPSET = 17


class _ScoreFirst(torch.nn.Module):
    """(score, map): the score is the bundle's output_name, read first by every edgerun runner."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score = self.detector(x)
        return score, amap


def export_detector(detector: torch.nn.Module, size: int, path: Path) -> None:
    dummy = torch.zeros(1, 3, size, size)
    # the wrapper in eval mode too: the exporter restores the exported module's mode afterwards, and a wrapper left
    # in training mode would put the detector's BatchNorms back into training (batch statistics) with it
    torch.onnx.export(
        _ScoreFirst(detector).eval(),
        (dummy,),
        str(path),
        opset_version=OPSET,
        dynamo=False,
        input_names=[INPUT],
        output_names=[SCORE, MAP],
        dynamic_axes={INPUT: {0: "batch"}, SCORE: {0: "batch"}, MAP: {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)))


def parity(runner: OrtRunner, detector: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The exported graph (an active ONNX Runtime ``runner``) against PyTorch on ``x``: the largest score and map
    differences."""
    out = runner.infer({INPUT: x.numpy()})
    detector.eval()
    with torch.no_grad():
        want_map, want_score = detector(x)
    return {
        "score_max_abs_error": float(np.abs(out[SCORE] - want_score.numpy()).max()),
        "map_max_abs_error": float(np.abs(out[MAP] - want_map.numpy()).max()),
        "images": int(len(x)),
    }


def build_anomaly_bundle(job: dict[str, Any]) -> dict[str, Any]:
    """Write ``job['folder']``: model.onnx, val.npz (the report split's images and labels), manifest.json.
    ``job``: detector, images (uint8 N,S,S,3 after the device geometry), is_defective, tensor (their model
    input), size, mean, std, name, target, threshold, operating_point, metrics (the host's on those images),
    source; optional ``int8`` (the :class:`AnomalyInt8Job` fields that are not the report's: calib, calib_all,
    pick, method, max_drop, seed): then also model.int8.onnx, gated and with its own threshold."""
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    size = int(job["size"])
    export_detector(job["detector"], size, folder / "model.onnx")
    report = job["tensor"].numpy()
    with cpu_runner(folder / "model.onnx") as runner:
        checked = parity(runner, job["detector"], job["tensor"][:16])
        fp32_scores = scores_of(runner, report) if job.get("int8") is not None else None
    if checked["score_max_abs_error"] > 1e-3:
        raise ExportError(f"the ONNX detector's scores differ from PyTorch's by {checked['score_max_abs_error']:.2e}")
    labels = np.asarray(job["is_defective"], dtype=np.int64)
    variants, int8_figures, thresholds = {}, None, None
    if job.get("int8") is not None:
        int8_job = AnomalyInt8Job(
            fp32=folder / "model.onnx",
            report=report,
            is_defective=labels.astype(bool),
            fp32_scores=fp32_scores,
            **job["int8"],
        )
        variants["int8"], int8_figures = build_anomaly_int8(int8_job, folder / "model.int8.onnx")
        thresholds = {"fp32": float(job["threshold"]), "int8": variants["int8"]["threshold"]}
        log.info(
            "anomaly INT8 (Q/DQ, %s): image AUROC %.4f (FP32 %.4f, drop upper 95%% bound %.4f): %s",
            int8_figures["calibration"],
            int8_figures["image_auroc"] or float("nan"),
            int8_figures["fp32_image_auroc"] or float("nan"),
            float("nan") if int8_figures["auroc_drop_upper95"] is None else int8_figures["auroc_drop_upper95"],
            int8_figures["status"],
        )
    np.savez_compressed(folder / "val.npz", images=np.asarray(job["images"], np.uint8), labels=labels)
    spec = PreprocessSpec(resize=size, crop=size, interpolation="area", mean=job["mean"], std=job["std"])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": job["name"],
        "task": "anomaly",
        "classes": list(ANOMALY_CLASSES),
        "model": {
            "file": "model.onnx",
            "input_name": INPUT,
            "input_shape": [1, 3, size, size],
            "output_name": SCORE,
            "output_shape": [1],
            "map_name": MAP,
            "map_shape": [1, 1, size, size],
            "layout": "NCHW",
            "dtype": "float32",
            "opset": OPSET,
            "dynamic_batch": None,
        },
        "preprocess": spec.to_dict(),
        "target": job["target"],
        "samples": {
            "val": {
                "file": "val.npz",
                "count": int(len(labels)),
                "format": "raw uint8 RGB images + int64 labels (1 = defective)",
                "split": job["split"],
                "chose": "nothing (the threshold and the normalisation were picked on val/'s good parts)",
            }
        },
        "decision": {
            "metric": "anomaly_score",
            "positive_class": "defective",
            "threshold": float(job["threshold"]),
            **({"thresholds": thresholds} if thresholds else {}),
            "operating_point": job["operating_point"],
        },
        "variants": variants,
        "metrics": {
            "anomaly": job["metrics"],
            "parity": checked,
            **({"anomaly_int8": int8_figures} if int8_figures else {}),
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()},
        "source": job["source"],
    }
    (folder / "anomaly.json").write_text(json.dumps({"normalization": job.get("normalization")}, indent=2))
    write_manifest(str(folder), manifest)  # every file hashed, anomaly.json's normalisation facts included
    return {"folder": str(folder), "parity": checked, **({"int8": int8_figures} if int8_figures else {})}
