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

from .recipe import CostConfig

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al., "On Calibration of Modern Neural Networks", 2017): confidence vs accuracy gap."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


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
    }


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


def monthly_cost(latency_s: float, cost: CostConfig, price_per_hour: float) -> dict[str, float]:
    """Instances to serve ``requests_per_month`` at batch-1 latency and the target utilization, and their price.

    Busy seconds per month = requests * latency; one instance gives 730 h * 3600 s * utilization of them.
    """
    busy_seconds = cost.requests_per_month * latency_s
    capacity = HOURS_PER_MONTH * 3600.0 * cost.utilization
    instances = max(1, math.ceil(busy_seconds / capacity))
    return {"instances": instances, "price_per_hour": price_per_hour,
            "monthly_cost": round(instances * price_per_hour * HOURS_PER_MONTH, 2),
            "compute_hours": round(busy_seconds / 3600.0, 2)}


def cost_comparison(teacher_latency: float, student_latency: float,
                    cost: Optional[CostConfig]) -> Optional[dict[str, Any]]:
    if cost is None:
        return None
    teacher = monthly_cost(teacher_latency, cost, cost.price_per_hour)
    student = monthly_cost(student_latency, cost, cost.student_price_per_hour or cost.price_per_hour)
    return {"teacher": teacher, "student": student,
            "monthly_saving": round(teacher["monthly_cost"] - student["monthly_cost"], 2),
            "requests_per_month": cost.requests_per_month, "utilization": cost.utilization}
