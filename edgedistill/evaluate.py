"""Measurements of one model: accuracy, calibration, size, host latency, serving cost."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader




@dataclass
class Prediction:
    logits: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def top1(self) -> float:
        return float((self.predicted == self.labels).mean()) if len(self.labels) else 0.0


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> Prediction:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    model.train(was_training)
    return Prediction(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def load_summary(run_dir) -> dict[str, Any]:
    """A run's summary.json (written by the evaluate stage), or an error that says how to get one."""
    import json
    from pathlib import Path

    from .errors import EdgedistillError

    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"{path} is missing or unreadable ({exc.__class__.__name__}): run `edgedistill "
                               "evaluate RECIPE` first (RUN is the evaluated run folder, runs/<name>)") from exc


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Confidence bins of a reliability diagram: images, accuracy and mean confidence per non-empty bin."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            out.append({"lo": float(lo), "hi": float(hi), "count": int(in_bin.sum()),
                        "accuracy": float(correct[in_bin].mean()), "confidence": float(confidence[in_bin].mean())})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al., "On Calibration of Modern Neural Networks", 2017): confidence vs accuracy gap."""
    total = len(labels)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, labels, bins)))


def classification_report(pred: Prediction, classes: list[str]) -> dict[str, Any]:
    matrix = confusion_matrix(pred.labels, pred.predicted, len(classes))
    support = matrix.sum(1)
    per_class = {c: (float(matrix[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {
        "top1": pred.top1,
        "samples": int(len(pred.labels)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "ece": expected_calibration_error(softmax(pred.logits), pred.labels),
        "reliability": reliability_bins(softmax(pred.logits), pred.labels),
    }


def regression_report(pred: Prediction, scaling) -> dict[str, Any]:
    """Per target and averaged over targets: MAE and RMSE in target units, R^2 (``scaling``: data.TargetScaling,
    which turns the model's standardized outputs back into target units)."""
    from edgerun.regression import summarize

    target = scaling.restore(pred.labels)
    metrics = summarize(scaling.restore(pred.logits), target, scaling.names)
    return {"task": "regression", "samples": int(len(target)), **metrics, "score": metrics["r2"]}


def regression_markdown(title: str, report: dict[str, Any]) -> str:
    lines = [f"# {title}", "", f"- images: {report['samples']}", f"- MAE {report['mae']:.4g}, RMSE "
             f"{report['rmse']:.4g}, R² {report['r2']:.4f} (mean over targets)", "", "| target | MAE | RMSE | R² |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {m['mae']:.4g} | {m['rmse']:.4g} | {m['r2']:.4f} |" for name, m in report["per_target"].items()]
    return "\n".join(lines) + "\n"


def report_markdown(title: str, report: dict[str, Any], classes: list[str]) -> str:
    lines = [f"# {title}", "", f"- top-1: **{report['top1'] * 100:.2f}%** on {report['samples']} images",
             f"- expected calibration error (15 bins): {report['ece']:.4f}", "", "| class | accuracy |", "|---|---|"]
    for c in classes:
        acc = report["per_class"][c]
        lines.append(f"| {c} | {'-' if acc is None else f'{acc * 100:.1f}%'} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for c, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def measure_latency(model: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int,
                    device: torch.device) -> dict[str, float]:
    """Median/p90 seconds of one forward pass on a fixed random batch (device-synchronised)."""
    model.eval().to(device)
    x = torch.randn(*shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": statistics.median(times), "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
            "batch": shape[0], "repeats": repeats}


def measure_ort_latency(model: nn.Module, image_size: int, batches: tuple[int, ...], repeats: int, warmup: int,
                        threads: Optional[int], workdir) -> dict[int, dict[str, float]]:
    """Median/p90 seconds per batch through ONNX Runtime's CPU provider, the runtime that serves the bundle
    on a host: the model exported once with a dynamic batch, the same fixed random input per batch size."""
    from pathlib import Path

    from edgerun.runners import OrtRunner

    from .export import INPUT_NAME, export_onnx

    path = Path(workdir) / "latency.onnx"
    export_onnx(model, path, (1, 3, image_size, image_size), opset=17, dynamic_batch=True)
    out = {}
    try:
        with OrtRunner(path, providers=["CPUExecutionProvider"], threads=threads) as runner:
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
                for _ in range(warmup):
                    runner.infer({INPUT_NAME: x})
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    runner.infer({INPUT_NAME: x})
                    times.append(time.perf_counter() - start)
                times.sort()
                out[batch] = {"median_s": statistics.median(times),
                              "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))], "repeats": repeats}
    finally:
        path.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------- paired comparisons
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
    p = 1.0 if n == 0 else min(1.0, 2 * tail / 2 ** n)
    return {"a_only": a_only, "b_only": b_only, "discordant": n, "images": int(len(a)), "p_value": p}


def images_to_resolve(a_only: int, b_only: int, images: int, alpha: float = 0.05, power: float = 0.8) -> Optional[int]:
    """Paired images a McNemar test needs to detect the observed accuracy difference at ``alpha`` with
    ``power`` (Connor, "Sample size for testing differences in proportions for the paired-sample design",
    Biometrics 1987), taking the observed discordant rates as the truth. None when the rates are equal."""
    if images == 0 or a_only == b_only:
        return None
    p10, p01 = a_only / images, b_only / images
    delta, disc = p10 - p01, p10 + p01
    z_a, z_b = statistics.NormalDist().inv_cdf(1 - alpha / 2), statistics.NormalDist().inv_cdf(power)
    n = (z_a * math.sqrt(disc) + z_b * math.sqrt(max(disc - delta ** 2, 0.0))) ** 2 / delta ** 2
    return int(math.ceil(n))


def bootstrap_intervals(teacher_correct: np.ndarray, student_correct: np.ndarray, baseline_correct: np.ndarray,
                        samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of retention (student / teacher top-1) and KD gain (student − baseline),
    resampling images with replacement and keeping the three models paired on each resampled image."""
    t, s, b = (np.asarray(x, dtype=np.float64) for x in (teacher_correct, student_correct, baseline_correct))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(samples, len(s)))
    t_acc, s_acc, b_acc = t[idx].mean(1), s[idx].mean(1), b[idx].mean(1)
    retention = np.divide(s_acc, t_acc, out=np.zeros_like(s_acc), where=t_acc > 0)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {"retention": [float(np.percentile(retention, lo)), float(np.percentile(retention, hi))],
            "kd_gain": [float(np.percentile(s_acc - b_acc, lo)), float(np.percentile(s_acc - b_acc, hi))],
            "level": level, "samples": samples}
