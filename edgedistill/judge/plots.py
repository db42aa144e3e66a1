"""The report's plots (matplotlib, Agg) as PNG bytes: training curves, the teacher's confusion matrix and calibration,
per-class accuracy, the trade-off of every model, the planner's estimate next to device measurements."""

from __future__ import annotations

from typing import Any

import numpy as np


def _training_curves(plt, info: dict[str, Any]):
    s, curves = info["summary"], info["curves"]
    if not curves:
        return None
    kd_runs = {k: v for k, v in curves.items() if any("kd" in e for e in v)}
    regression = s.get("task") == "regression"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in kd_runs.items():
        axes[0].plot([r["epoch"] + 1 for r in rows], [r["kd"] for r in rows], marker="o", label=name)
    axes[0].set(title="KD loss (soft targets, x T²)", xlabel="epoch")
    for name, rows in curves.items():
        if any("ce" in r for r in rows):
            axes[1].plot(
                [r["epoch"] + 1 for r in rows], [r.get("ce", r.get("loss")) for r in rows], marker="o", label=name
            )
        key, scale = ("val_r2", 1) if regression else ("val_top1", 100)
        validated = [r for r in rows if r.get(key) is not None]
        axes[2].plot([r["epoch"] + 1 for r in validated], [scale * r[key] for r in validated], marker="o", label=name)
    if regression:
        axes[0].set(title="KD loss (MSE to the teacher's predictions)", xlabel="epoch")
    axes[1].set(title="task loss (MSE/Huber to the targets)" if regression else "CE loss (hard labels)", xlabel="epoch")
    axes[2].set(title="validation R²" if regression else "validation top-1 (%)", xlabel="epoch")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return "training curves: KD and CE logged apart", fig


def _teacher_validation(plt, info: dict[str, Any]):
    teacher = info["reports"].get("teacher")
    classes = info["summary"].get("classes") or []
    if not (teacher and teacher.get("confusion_matrix")):
        return None
    matrix = np.array(teacher["confusion_matrix"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    im = axes[0].imshow(matrix, cmap="Blues")
    axes[0].set(title="teacher confusion matrix (rows: true)", xticks=range(len(classes)), yticks=range(len(classes)))
    axes[0].set_xticklabels(classes, rotation=90, fontsize=7)
    axes[0].set_yticklabels(classes, fontsize=7)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    bins = teacher.get("reliability") or []
    if bins:
        axes[1].bar(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            width=1 / 15,
            alpha=0.7,
            edgecolor="black",
            label="accuracy per confidence bin",
        )
    axes[1].plot([0, 1], [0, 1], color="tab:red", linestyle="--", label="perfect calibration")
    axes[1].set(
        title=f"teacher calibration (ECE {teacher.get('ece', float('nan')):.3f})",
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axes[1].legend(fontsize=8)
    return "teacher validation: confusion matrix and calibration", fig


def _per_class_accuracy(plt, info: dict[str, Any]):
    s = info["summary"]
    classes = s.get("classes") or []
    per_class = {
        role: info["reports"].get(folder)
        for role, folder in (("teacher", "teacher"), ("student", "student"), ("baseline", "baseline"))
    }
    if not (all(per_class.values()) and classes and s.get("task") != "regression"):
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 3), 3.6))
    x = np.arange(len(classes))
    for i, (role, rep) in enumerate(per_class.items()):
        ax.bar(x + (i - 1) * 0.27, [100 * (rep["per_class"].get(c) or 0) for c in classes], width=0.27, label=role)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set(title="per-class accuracy (%)", ylim=(0, 105))
    ax.legend(fontsize=8)
    return "per-class accuracy: teacher, student, baseline", fig


def _positive_class_curves(plt, info: dict[str, Any]):
    s = info["summary"]
    curves = s.get("curves") or {}
    if not curves:
        return None
    positive = (s.get("metric") or {}).get("positive_class")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    op = s.get("operating_point") or {}
    for role, c in curves.items():
        auc, ap = s[role].get("roc_auc"), s[role].get("pr_auc")
        (line,) = axes[0].plot(c["roc"]["false_reject"], c["roc"]["recall"], label=f"{role} (AUC {auc:.3f})")
        axes[1].step(
            c["pr"]["recall"], c["pr"]["precision"], where="post", color=line.get_color(), label=f"{role} (AP {ap:.3f})"
        )
        if role in op and op[role].get("recall") is not None:
            axes[0].scatter([op[role]["false_reject"]], [op[role]["recall"]], s=40, zorder=3, color=line.get_color())
    axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes[0].set(
        title=f"ROC of {positive}" + (" (dots: operating points)" if op else ""),
        xlabel="false-reject rate (good parts rejected)",
        ylabel=f"recall ({positive} rejected)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axes[1].set(
        title=f"precision-recall of {positive}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02)
    )
    for ax in axes:
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return f"ROC and precision-recall curves of the positive class ({positive})", fig


def _tradeoff(plt, info: dict[str, Any]):
    points = tradeoff_points(info)
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p in points:
        if p.get("latency_ms") is not None:
            axes[0].scatter(p["latency_ms"], p["top1"], s=60)
            axes[0].annotate(
                p["label"], (p["latency_ms"], p["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        axes[1].scatter(p["size_mb"], p["top1"], s=60)
        axes[1].annotate(p["label"], (p["size_mb"], p["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    axes[0].set(title="top-1 vs host latency (batch 1)", xlabel="ms", ylabel="top-1 (%)")
    axes[1].set(title="top-1 vs weights size", xlabel="MB", ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return "trade-off: every model of the run", fig


def _device(plt, info: dict[str, Any]):
    comparison = device_rows(info)
    if not comparison:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = [r["what"] for r in comparison]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [r["estimated"] or 0 for r in comparison], width=0.4, label="expected (estimate or host)")
    ax.bar(x + 0.2, [r["measured"] or 0 for r in comparison], width=0.4, label="measured on the device")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("device: estimate vs measurement")
    return "device: planner estimate next to the measurement", fig


# one function per figure, in display order: each returns (title, figure), or None when the run has nothing for it
FIGURES = (_training_curves, _teacher_validation, _per_class_accuracy, _positive_class_curves, _tradeoff, _device)


def figures(info: dict[str, Any]) -> dict[str, bytes]:
    """The report's plots as PNG bytes, in display order (matplotlib, Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    for figure in FIGURES:
        made = figure(plt, info)
        if made is None:
            continue
        name, fig = made
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()
    return pngs


def tradeoff_points(info: dict[str, Any]) -> list[dict[str, Any]]:
    s = info["summary"]
    if s.get("task") == "regression":
        return []  # accuracy against latency and size: a classification plot
    roles = ["teacher"] + [a["role"] for a in s.get("chain", [])] + ["student", "baseline"]
    points = []
    for role in roles:
        m = s.get(role)
        if not m:
            continue
        latency = m.get("latency_ms_b1", s["student"].get("latency_ms_b1") if role == "baseline" else None)
        points.append(
            {"label": f"{role} ({m['model']})", "top1": 100 * m["top1"], "size_mb": m["size_mb"], "latency_ms": latency}
        )
    int8 = ((info.get("manifest") or {}).get("metrics") or {}).get("int8") or {}
    if (int8.get("int8") or {}).get("top1") is not None:
        points.append(
            {
                "label": f"student INT8 ({int8['int8'].get('status', '?')})",
                "top1": 100 * int8["int8"]["top1"],
                "size_mb": s["student"]["size_mb"] / 4,
                "latency_ms": None,
            }
        )
    return points


def device_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Planner estimates next to measured device figures, one row per quantity that both sides have."""
    from edgedistill.plan.measured import model_latency_ms

    est = info["summary"].get("device_estimate") or {}
    rows = []
    for item in info["device"]:
        d = item["data"]
        if item["kind"] == "bench":
            model_ms = model_latency_ms(d["result"])
            rows.append(
                {
                    "what": "student FPS (model)",
                    "estimated": (est.get("student") or {}).get("est_fps"),
                    "measured": 1000.0 * d["result"].get("batch", 1) / model_ms if model_ms else None,
                    "source": item["path"],
                }
            )
            rows.append(
                {
                    "what": "student FPS (pipeline)",
                    "estimated": None,
                    "measured": d["result"].get("throughput_fps"),
                    "source": item["path"],
                }
            )
            total = (d["result"].get("memory") or {}).get("total_mb")
            rows.append(
                {
                    "what": "process memory MB",
                    "estimated": (est.get("student") or {}).get("est_memory_mb"),
                    "measured": total,
                    "source": item["path"],
                }
            )
        elif item["kind"] == "camera":
            rows.append(
                {
                    "what": "camera FPS (end to end)",
                    "estimated": None,
                    "measured": d.get("end_to_end_fps"),
                    "source": item["path"],
                }
            )
        elif item["kind"] == "validate":
            rows.append(
                {
                    "what": "device top-1 % (expected: host FP32)",
                    "estimated": 100 * (d.get("host_fp32_top1") or 0) or None,
                    "measured": 100 * d["top1"],
                    "source": item["path"],
                }
            )
    return rows
