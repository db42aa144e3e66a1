"""Judging models on the evaluation images: one model's report (accuracy, per class, calibration), reading a run's
summary, and every model of a run compared on its metric (intervals, thresholds, the paired test)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgedistill.judge import metrics
from edgedistill.judge.metrics import EvalPlan, confusion_matrix
from edgedistill.judge.thresholds import OperatingPoint, pick_threshold, threshold_promise
from edgedistill.models.predict import Prediction
from edgerun.decision import softmax


def load_summary(run_dir) -> dict[str, Any]:
    """A run's summary.json (written by the evaluate stage), or an error that says how to get one."""
    import json
    from pathlib import Path

    from edgedistill.errors import EdgedistillError

    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgedistillError(
            f"{path} is missing or unreadable ({exc.__class__.__name__}): run `edgedistill "
            "evaluate RECIPE` first (RUN is the evaluated run folder, runs/<name>)"
        ) from exc


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Confidence bins of a reliability diagram: images, accuracy and mean confidence per non-empty bin."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            out.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "count": int(in_bin.sum()),
                    "accuracy": float(correct[in_bin].mean()),
                    "confidence": float(confidence[in_bin].mean()),
                }
            )
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al., "On Calibration of Modern Neural Networks", 2017): confidence vs accuracy gap."""
    total = len(labels)
    return float(
        sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, labels, bins))
    )


def positive_calibration_error(is_positive: np.ndarray, scores: np.ndarray, bins: int = 15) -> float:
    """ECE of one class's probability (the score the line's threshold cuts): per equal-width bin of the score, the
    gap between the share of positive images and the mean score, weighted by the bin's images."""
    pos, s = np.asarray(is_positive, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    which = np.clip((s * bins).astype(int), 0, bins - 1)
    gap = 0.0
    for b in np.unique(which):
        members = which == b
        gap += members.sum() * abs(pos[members].mean() - s[members].mean())
    return float(gap / len(s)) if len(s) else float("nan")


def classification_report(pred: Prediction, classes: list[str], plan: Optional[EvalPlan] = None) -> dict[str, Any]:
    """One model on one split: top-1, balanced accuracy, macro F1, per-class accuracy and precision/recall/F1,
    confusion matrix, calibration; with a positive class its ROC-AUC and PR-AUC. ``score`` is the plan's metric
    (recall at the false-reject limit: with the threshold picked on this same split, for ranking steps only)."""
    matrix = confusion_matrix(pred.labels, pred.predicted, len(classes))
    support = matrix.sum(1)
    per_class = {c: (float(matrix[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    k = len(classes)
    report = {
        "top1": pred.top1,
        "balanced_accuracy": metrics.balanced_accuracy(pred.labels, pred.predicted, k),
        "macro_f1": metrics.macro_f1(pred.labels, pred.predicted, k),
        "samples": int(len(pred.labels)),
        "per_class": per_class,
        "per_class_metrics": metrics.per_class(pred.labels, pred.predicted, classes),
        "confusion_matrix": matrix.tolist(),
        "ece": expected_calibration_error(softmax(pred.logits), pred.labels),
        "reliability": reliability_bins(softmax(pred.logits), pred.labels),
    }
    report["score"] = report["top1"]
    if plan is not None:
        if plan.positive_index is not None:
            positive = pred.labels == plan.positive_index
            scores = metrics.positive_scores(pred.logits, plan.positive_index)
            report["positive"] = {
                "class": plan.positive,
                "roc_auc": metrics.roc_auc(positive, scores),
                "pr_auc": metrics.average_precision(positive, scores),
            }
        if plan.metric == "recall_at_false_reject":
            point = plan.metric_point()
            threshold = metrics.pick_threshold(positive, scores, point)
            report["recall_at_false_reject"] = metrics.rates_at(positive, scores, threshold)["recall"]
        report["metric"] = plan.metric
        report["score"] = report[plan.metric]
    return report


def regression_report(pred: Prediction, scaling) -> dict[str, Any]:
    """Per target and averaged over targets: MAE and RMSE in target units, R^2 (``scaling``: data.TargetScaling,
    which turns the model's standardized outputs back into target units)."""
    from edgerun.regression import summarize

    target = scaling.restore(pred.labels)
    metrics = summarize(scaling.restore(pred.logits), target, scaling.names)
    return {"task": "regression", "samples": int(len(target)), **metrics, "score": metrics["r2"]}


def regression_markdown(title: str, report: dict[str, Any]) -> str:
    lines = [
        f"# {title}",
        "",
        f"- images: {report['samples']}",
        f"- MAE {report['mae']:.4g}, RMSE {report['rmse']:.4g}, R² {report['r2']:.4f} (mean over targets)",
        "",
        "| target | MAE | RMSE | R² |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {m['mae']:.4g} | {m['rmse']:.4g} | {m['r2']:.4f} |" for name, m in report["per_target"].items()
    ]
    return "\n".join(lines) + "\n"


def report_markdown(title: str, report: dict[str, Any], classes: list[str]) -> str:
    lines = [f"# {title}", "", f"- top-1: **{report['top1'] * 100:.2f}%** on {report['samples']} images"]
    if "balanced_accuracy" in report:
        lines.append(
            f"- balanced accuracy {report['balanced_accuracy'] * 100:.2f}%, macro F1 {report['macro_f1'] * 100:.2f}%"
        )
    positive = report.get("positive")
    if positive and positive.get("roc_auc") is not None:
        lines.append(
            f"- positive class {positive['class']}: ROC-AUC {positive['roc_auc']:.4f}, PR-AUC {positive['pr_auc']:.4f}"
        )
    lines += [f"- expected calibration error (15 bins): {report['ece']:.4f}", ""]
    prf = report.get("per_class_metrics")
    if prf:
        lines += ["| class | images | precision | recall (accuracy) | F1 |", "|---|---|---|---|---|"]
        lines += [
            f"| {c} | {prf[c]['support']} | {prf[c]['precision'] * 100:.1f}% | {prf[c]['recall'] * 100:.1f}% | "
            f"{prf[c]['f1'] * 100:.1f}% |"
            for c in classes
        ]
    else:
        lines += ["| class | accuracy |", "|---|---|"]
        for c in classes:
            acc = report["per_class"][c]
            lines.append(f"| {c} | {'-' if acc is None else f'{acc * 100:.1f}%'} |")
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- paired comparisons
def images_to_resolve(a_only: int, b_only: int, images: int, alpha: float = 0.05, power: float = 0.8) -> Optional[int]:
    """Paired images a McNemar test needs to detect the observed accuracy difference at ``alpha`` with
    ``power`` (Connor, "Sample size for testing differences in proportions for the paired-sample design",
    Biometrics 1987), taking the observed discordant rates as the truth. None when the rates are equal."""
    if images == 0 or a_only == b_only:
        return None
    p10, p01 = a_only / images, b_only / images
    delta, disc = p10 - p01, p10 + p01
    z_a, z_b = statistics.NormalDist().inv_cdf(1 - alpha / 2), statistics.NormalDist().inv_cdf(power)
    n = (z_a * math.sqrt(disc) + z_b * math.sqrt(max(disc - delta**2, 0.0))) ** 2 / delta**2
    return int(math.ceil(n))


# ------------------------------------------------------------------------------- comparing models on the line's terms
def _decisions(pred: Prediction, plan: EvalPlan, threshold: Optional[float]) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(labels, predictions, classes, metric) in the form the chosen metric counts: classes for top-1, balanced
    accuracy and macro F1; reject (1) or accept (0) at the model's threshold vs positive (1) or not for recall."""
    if plan.metric != "recall_at_false_reject":
        return pred.labels, pred.predicted, pred.logits.shape[1], plan.metric
    positive = (pred.labels == plan.positive_index).astype(np.int64)
    rejected = (metrics.positive_scores(pred.logits, plan.positive_index) >= threshold).astype(np.int64)
    return positive, rejected, 2, "recall"


@dataclass
class _Comparison:
    """What every part of ``compare_models`` reads: the predictions, the plan, the labels, the bootstrap indices,
    the positive class's scores on the evaluation and calibration images, and each model's metric threshold."""

    preds: dict[str, Prediction]
    plan: EvalPlan
    idx: np.ndarray
    samples: int
    classes: Optional[list[str]]
    positive: Optional[np.ndarray] = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    calib_pos: dict[str, np.ndarray] = field(default_factory=dict)
    calib_scores: dict[str, np.ndarray] = field(default_factory=dict)
    metric_threshold: dict[str, Optional[float]] = field(default_factory=dict)
    calib_idx: Optional[np.ndarray] = None  # bootstrap resamples of the calibration images, paired with idx

    @property
    def labels(self) -> np.ndarray:
        return self.preds["student"].labels

    @property
    def k(self) -> int:
        return self.preds["student"].logits.shape[1]


def _model_facts(c: _Comparison, role: str) -> tuple[dict[str, Any], np.ndarray, Optional[dict]]:
    """One model's metrics with their intervals, its per-resample metric, and its ROC/PR curves (positive class)."""
    plan, labels, k, idx = c.plan, c.labels, c.k, c.idx
    pred = c.preds[role]
    y, p, n_classes, name = _decisions(pred, plan, c.metric_threshold[role])
    facts: dict[str, Any] = {
        "top1": pred.top1,
        "balanced_accuracy": metrics.balanced_accuracy(labels, pred.predicted, k),
        "macro_f1": metrics.macro_f1(labels, pred.predicted, k),
    }
    value = float(metrics.metric_from_counts(name, *metrics.counts(y, p, n_classes)))
    facts[plan.metric] = value
    facts["score"] = value
    if plan.metric == "recall_at_false_reject" and c.calib_idx is not None:
        per_resample = _repicked(c, role, plan.metric_point())[0]  # the threshold's own uncertainty included
    else:
        per_resample = metrics.resampled_metric(name, y, p, n_classes, idx)
    facts["score_interval"] = metrics.interval(per_resample)
    facts["balanced_accuracy_interval"] = (
        facts["score_interval"]
        if name == "balanced_accuracy"
        else metrics.interval(metrics.resampled_metric("balanced_accuracy", labels, pred.predicted, k, idx))
    )
    facts["per_class"] = metrics.per_class(labels, pred.predicted, c.classes or [str(i) for i in range(k)])
    # calibration of the outputs the device uses: the softmax of the exported model's logits (a logit-adjusted
    # loss changes training only), top-label ECE and, with a positive class, that class's probability's
    facts["ece"] = expected_calibration_error(softmax(pred.logits), labels)
    if c.metric_threshold[role] is not None:
        facts["metric_threshold"] = c.metric_threshold[role]
    curves = None
    if c.positive is not None and role in ("teacher", "student", "baseline"):
        positive, s = c.positive, c.scores[role]
        few = idx[: c.samples // 2]
        facts["roc_auc"] = metrics.roc_auc(positive, s)
        facts["positive_ece"] = positive_calibration_error(positive, s)
        facts["pr_auc"] = metrics.average_precision(positive, s)
        facts["roc_auc_interval"] = metrics.interval(
            metrics.resampled(lambda r: metrics.roc_auc(positive[r], s[r]), few)
        )
        facts["pr_auc_interval"] = metrics.interval(
            metrics.resampled(lambda r: metrics.average_precision(positive[r], s[r]), few)
        )
        curves = {
            "roc": metrics.thin(metrics.roc_curve(positive, s)),
            "pr": metrics.thin(metrics.precision_recall_curve(positive, s)),
        }
    return facts, per_resample, curves


def _repicked(c: _Comparison, role: str, point: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
    """(recall, false-reject rate) per bootstrap resample, the threshold picked again on each resample of the
    calibration images and applied to the paired resample of the evaluation images: the interval then holds the
    threshold's own uncertainty, not only the evaluation images' (NaN where a resample lacks a class)."""
    recall, false_reject = np.full(len(c.idx), np.nan), np.full(len(c.idx), np.nan)
    pos, scores = c.calib_pos[role], c.calib_scores[role]
    for b, (r, q) in enumerate(zip(c.idx, c.calib_idx)):
        try:
            threshold = pick_threshold(pos[q], scores[q], point)
        except ValueError:  # this resample of the calibration images holds no positive (or no negative) image
            continue
        decided = c.scores[role][r] >= threshold
        here = c.positive[r]
        recall[b] = decided[here].mean() if here.any() else np.nan
        false_reject[b] = decided[~here].mean() if (~here).any() else np.nan
    return recall, false_reject


def _operating_point(c: _Comparison, calib_name: str) -> dict[str, Any]:
    """Each model's threshold for the plan's operating point, picked on the calibration images, with its recall and
    false-reject rate there and on the evaluation images; their intervals resample both image sets, the threshold
    picked again each time; what the calibration images can promise on new ones; and the student against the
    baseline where the line operates (``comparison``)."""
    positive, point = c.positive, c.plan.operating_point
    op: dict[str, Any] = {"rule": point.describe(), "calibration_split": calib_name}
    if point.confidence:
        op["promise"] = threshold_promise(c.calib_pos["student"], point)
    decided, resampled = {}, {}
    for role in c.preds:
        threshold = pick_threshold(c.calib_pos[role], c.calib_scores[role], point)
        at_calib = metrics.rates_at(c.calib_pos[role], c.calib_scores[role], threshold)
        here = metrics.rates_at(positive, c.scores[role], threshold)
        decided[role] = c.scores[role] >= threshold
        resampled[role] = recall_b, false_reject_b = _repicked(c, role, point)
        op[role] = {
            "threshold": threshold,
            "calibration": {"recall": at_calib["recall"], "false_reject": at_calib["false_reject"]},
            **{
                k2: here[k2] for k2 in ("recall", "false_reject", "positives", "negatives", "detected", "false_rejects")
            },
            "recall_interval": metrics.interval(recall_b[~np.isnan(recall_b)]),
            "false_reject_interval": metrics.interval(false_reject_b[~np.isnan(false_reject_b)]),
        }
    op["comparison"] = _at_operating_point(c, op, decided, resampled)
    return op


def _at_operating_point(c: _Comparison, op: dict, decided: dict, resampled: dict) -> Optional[dict[str, Any]]:
    """Student against baseline (and teacher) where the line operates, each model at its own threshold from the
    calibration images: under a false-reject limit, recall (the defects caught at matched false-reject), tested
    with exact McNemar on the positive images; under a target recall, the false-reject rate (good parts thrown
    away at matched recall), on the negative images. Gain > 0: the student is better; the interval resamples both
    image sets, the thresholds picked again each time."""
    by_recall = c.plan.operating_point.max_false_reject is not None
    measure, images = ("recall", c.positive) if by_recall else ("false_reject", ~c.positive)
    if not images.any():
        return None  # the evaluation images hold none of the kind the line's measure counts
    right = {role: decided[role][images] == by_recall for role in ("student", "baseline")}
    sig = metrics.mcnemar_exact(right["student"], right["baseline"])
    sig["images_to_resolve"] = images_to_resolve(sig["a_only"], sig["b_only"], sig["images"])
    sig["note"] = f"{'positive' if by_recall else 'negative'} images only, each model at its own threshold"
    k = 0 if by_recall else 1
    sign = 1 if by_recall else -1  # a lower false-reject rate is the better one
    gain = sign * (op["student"][measure] - op["baseline"][measure])
    gains = sign * (resampled["student"][k] - resampled["baseline"][k])
    teacher = op["teacher"][measure]
    return {
        "measure": measure,
        "matched": "false-reject rate" if by_recall else "recall",
        **{role: op[role][measure] for role in ("teacher", "student", "baseline")},
        "gain": gain,
        "gain_interval": metrics.interval(gains[~np.isnan(gains)]),
        # of the defects the teacher catches at its threshold, the share the student catches at its own
        "retention": op["student"][measure] / teacher if by_recall and teacher else None,
        "significance": sig,
    }


def _significance(c: _Comparison, seed: int) -> dict[str, Any]:
    """The paired test of student against baseline on the metric: exact McNemar for top-1 and recall (on the
    positive images, each model at its own threshold), a permutation test otherwise."""
    y_s, p_s, n_classes, name = _decisions(c.preds["student"], c.plan, c.metric_threshold["student"])
    _, p_b, _, _ = _decisions(c.preds["baseline"], c.plan, c.metric_threshold["baseline"])
    if name not in ("top1", "recall"):
        return metrics.permutation_test(name, y_s, p_s, p_b, n_classes, seed=seed)
    keep = np.ones(len(y_s), dtype=bool) if name == "top1" else y_s == 1  # recall: the positive images
    sig = metrics.mcnemar_exact((p_s == y_s)[keep], (p_b == y_s)[keep])
    sig["images_to_resolve"] = images_to_resolve(sig["a_only"], sig["b_only"], sig["images"])
    if name == "recall":
        sig["note"] = "positive images only, each model rejecting at its own threshold"
    return sig


def compare_models(
    preds: dict[str, Prediction],
    plan: EvalPlan,
    calib: Optional[dict[str, Prediction]] = None,
    calib_name: str = "",
    seed: int = 0,
    samples: int = 2000,
    classes: Optional[list[str]] = None,
) -> dict[str, Any]:
    """Every model of a run on the evaluation images, judged on the plan's metric: each model's metrics (top-1,
    balanced accuracy with its interval, macro F1, per-class precision/recall/F1; ROC-AUC and PR-AUC of the
    positive class), thresholds picked on the calibration
    predictions (``calib``) with recall and false-reject rate on the evaluation images, the paired test of student
    vs baseline on the metric, and bootstrap intervals (images resampled, models kept paired).

    ``preds`` holds ``teacher``, ``student`` and ``baseline`` (and any other role). Returns the summary's
    ``metric``, ``models``, ``operating_point``, ``significance``, ``intervals``, ``retention``, ``kd_gain``,
    ``curves``."""
    roles = list(preds)
    c = _Comparison(
        preds,
        plan,
        metrics.bootstrap_samples(len(preds["student"].labels), samples, seed),
        samples,
        classes,
        metric_threshold={r: None for r in roles},
    )
    out: dict[str, Any] = {"metric": plan.as_dict(), "models": {}, "curves": {}}
    if plan.positive_index is not None:
        c.positive = c.labels == plan.positive_index
        c.scores = {r: metrics.positive_scores(p.logits, plan.positive_index) for r, p in preds.items()}
    if calib is not None:
        out["metric"]["calibration"] = {
            "split": calib_name,
            "images": int(len(calib["student"].labels)),
            "positives": int((calib["student"].labels == plan.positive_index).sum()),
        }
        c.calib_pos = {r: calib[r].labels == plan.positive_index for r in roles}
        c.calib_scores = {r: metrics.positive_scores(calib[r].logits, plan.positive_index) for r in roles}
        c.calib_idx = metrics.bootstrap_samples(len(calib["student"].labels), samples, seed + 1)
        if plan.metric == "recall_at_false_reject":
            point = plan.metric_point()
            c.metric_threshold = {r: pick_threshold(c.calib_pos[r], c.calib_scores[r], point) for r in roles}
            if point.confidence:
                out["metric"]["calibration"]["promise"] = threshold_promise(c.calib_pos["student"], point)
    per_resample: dict[str, np.ndarray] = {}
    for role in roles:
        out["models"][role], per_resample[role], curves = _model_facts(c, role)
        if curves is not None:
            out["curves"][role] = curves
    if plan.operating_point is not None and calib is not None:
        out["operating_point"] = _operating_point(c, calib_name)
    # the paired test and the intervals of retention and gain, on the metric
    out["significance"] = _significance(c, seed)
    t, s_, b = (out["models"][r]["score"] for r in ("teacher", "student", "baseline"))
    out["retention"] = s_ / t if t else 0.0
    out["kd_gain"] = s_ - b
    retention = np.divide(
        per_resample["student"],
        per_resample["teacher"],
        out=np.zeros_like(per_resample["student"]),
        where=per_resample["teacher"] > 0,
    )
    retention[np.isnan(per_resample["student"]) | np.isnan(per_resample["teacher"])] = np.nan  # no value there
    out["intervals"] = {
        "retention": metrics.interval(retention),
        "kd_gain": metrics.interval(per_resample["student"] - per_resample["baseline"]),
        "level": 0.95,
        "samples": samples,
    }
    return out
