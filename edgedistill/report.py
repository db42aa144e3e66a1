"""The run as text and pictures: the verdict with its evidence, advice when the student falls short, the summary
tables, and the report (report.md + report_files/, report.html with the plots inlined: one file to send)."""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np

SIGNIFICANCE = 0.05
RETENTION_ADVICE = 0.90

# the next size up within a family, for "a larger student" advice
_LARGER = [(r"^mobilenetv3_small_\d+$", "mobilenetv3_large_100"), (r"^mobilenetv2_0\d\d$", "mobilenetv2_100"),
           (r"^mobilenetv2_100$", "mobilenetv2_140"), (r"^squeezenet1_1$", "squeezenet1_0"),
           (r"^efficientnet_b(\d)$", None), (r"^resnet10t$", "resnet18")]


def larger_model(name: str) -> Optional[str]:
    for pattern, bigger in _LARGER:
        match = re.match(pattern, name)
        if match:
            return bigger or f"efficientnet_b{int(match.group(1)) + 1}"
    return None


def verdict(summary: dict[str, Any], min_gain: float) -> tuple[str, bool]:
    """(sentence, helped): "helped" needs a significant McNemar test and a gain of at least ``min_gain``."""
    gain = summary["kd_gain"] * 100
    sig = summary["significance"]
    p = sig["p_value"]
    lo, hi = (v * 100 for v in summary["intervals"]["kd_gain"])
    evidence = (f"McNemar p = {p:.3g} on {sig['images']} images ({sig['a_only']} right only for the student, "
                f"{sig['b_only']} only for the baseline); 95% interval of the gain [{lo:+.2f}, {hi:+.2f}]")
    if p < SIGNIFICANCE and gain < 0:
        return (f"distillation hurt: the KD student is {-gain:.2f} points below its baseline trained without KD "
                f"({evidence}); ship the baseline or revisit temperature/alpha/teacher", False)
    if p < SIGNIFICANCE and gain > 0:
        if gain < min_gain * 100:
            return (f"distillation helped, but by little: +{gain:.2f} points, under the {min_gain * 100:.2f}-point "
                    f"threshold ({evidence})", False)
        return (f"distillation helped: +{gain:.2f} points over the baseline, retention "
                f"{summary['retention'] * 100:.1f}% ({evidence})", True)
    need = sig.get("images_to_resolve")
    resolve = (f"about {need:,} paired images would resolve a difference this size (80% power)" if need
               else "both made the same number of mistakes")
    return (f"within noise: the KD student is {gain:+.2f} points from its baseline, not a significant difference "
            f"({evidence}); {resolve}", False)


def advice(summary: dict[str, Any], student_epochs: int) -> list[str]:
    """The method's remedies as recipe lines, when the student keeps under 90% of its teacher."""
    if summary["retention"] >= RETENTION_ADVICE:
        return []
    student = summary["student"]["model"]
    bigger = larger_model(student)
    lines = []
    if bigger:
        lines.append(f"a larger student: --set student.model={bigger}")
    lines += [
        "a softer or sharper teacher: --set distill.temperature=4 (or search: edgedistill sweep RECIPE "
        "--temperature 2,3,4,5 --alpha 0.5,0.7,0.9)",
        "match intermediate features: --set distill.features=auto",
        "let the teacher label more images: --set data.unlabeled=/path/to/unlabeled/images",
        f"a gentler chain: --set 'distill.chain=[{bigger or 'MODEL_BETWEEN_TEACHER_AND_STUDENT'}]'",
        f"a longer schedule: --set student.epochs={max(2 * student_epochs, 1)}",
    ]
    return lines


def summary_rows(summary: dict[str, Any], batch: int) -> list[tuple[str, ...]]:
    regression = summary.get("task") == "regression"
    rows = [("model", "role", "MAE / R²" if regression else "top-1", "params", "size MB", "ORT b1 ms",
             f"ORT b{batch} ms", "PyTorch b1 ms")]
    roles = ["teacher"] + [a["role"] for a in summary.get("chain", [])] + ["student", "baseline"]
    for role in roles:
        m = summary[role]
        label = {"student": "student (KD)"}.get(role, role)
        if role == "student" and summary.get("generations"):
            label = f"student (KD, generation {m['generation']})"
        quality = f"{m['mae']:.4g} / {m['r2']:.3f}" if regression else f"{m['top1'] * 100:.2f}%"
        rows.append((m["model"], label, quality, f"{m['params'] / 1e6:.2f}M", f"{m['size_mb']:.2f}",
                     f"{m['latency_ms_b1']:.2f}" if "latency_ms_b1" in m else "= student",
                     f"{m[f'latency_ms_b{batch}']:.2f}" if f"latency_ms_b{batch}" in m else "= student",
                     f"{m['torch_latency_ms_b1']:.2f}" if "torch_latency_ms_b1" in m else "= student"))
    return rows


def cost_line(c: dict[str, Any]) -> str:
    line = (f"monthly serving cost at {c['requests_per_month']:,.0f} requests: teacher "
            f"{c['teacher']['monthly_cost']:,.2f} ({c['teacher']['instances']} instance(s), "
            f"{c['teacher']['compute_hours']:,.0f} busy h), student {c['student']['monthly_cost']:,.2f} "
            f"({c['student']['instances']}, {c['student']['compute_hours']:,.0f} busy h), saving "
            f"{c['monthly_saving']:,.2f} a month ({c.get('annual_saving', 12 * c['monthly_saving']):,.2f} a year)")
    return line + payback_phrase(c)


def payback_phrase(c: dict[str, Any]) -> str:
    if c.get("distillation_cost") is None:
        return ""
    if c.get("payback_months") is None:
        return f"; the distillation work ({c['distillation_cost']:,.2f}) does not pay back: the student saves nothing"
    return (f"; the distillation work ({c['distillation_cost']:,.2f}) pays for itself in "
            f"{c['payback_months']:.1f} month(s)")


def summary_facts(summary: dict[str, Any]) -> list[str]:
    """The sentences under the table, shared by summary.md and the console."""
    batch = summary["latency_batch"]
    if summary.get("task") == "regression":
        g_lo, g_hi = summary["intervals"]["kd_gain"]
        facts = [f"retention (student R² / teacher R²): {summary['retention'] * 100:.1f}%",
                 f"KD gain (baseline MAE − student MAE, target units): {summary['kd_gain']:+.4g} (95% bootstrap "
                 f"interval {g_lo:+.4g} to {g_hi:+.4g})",
                 "targets: " + ", ".join(f"{n} (train mean {m:.4g}, std {sd:.4g})" for n, m, sd in zip(
                     summary["targets"]["names"], summary["targets"]["mean"], summary["targets"]["std"]))]
        return facts + _speed_facts(summary, batch)
    r_lo, r_hi = (v * 100 for v in summary["intervals"]["retention"])
    g_lo, g_hi = (v * 100 for v in summary["intervals"]["kd_gain"])
    facts = [f"retention (student / teacher top-1): {summary['retention'] * 100:.1f}% (95% interval "
             f"{r_lo:.1f}-{r_hi:.1f}%)",
             f"KD gain (student − baseline): {summary['kd_gain'] * 100:+.2f} points (95% interval "
             f"{g_lo:+.2f} to {g_hi:+.2f}; McNemar p = {summary['significance']['p_value']:.3g})"]
    free = summary.get("data_free")
    if free:
        facts.append(f"data-free: the student and the baseline trained on {free['synthetic_images']:,} images "
                     f"synthesized from the teacher (DeepInversion; BN-statistics loss {free['bn_loss'][0]:.2f} -> "
                     f"{free['bn_loss'][1]:.2f}, teacher confidence {free['teacher_confidence']:.2f}), no real "
                     "training image; " + ("evaluated on real images" if free["real_evaluation"] else
                                           "evaluated on the synthetic images only (no data.root): not a real accuracy"))
        driven = free.get("data_driven")
        if driven:
            facts.append(f"data-driven run {driven['run']}: student {driven['student_top1'] * 100:.2f}%, baseline "
                         f"{driven['baseline_top1'] * 100:.2f}% (this data-free student "
                         f"{summary['student']['top1'] * 100:.2f}%)")
    if summary.get("unlabeled_images"):
        facts.append(f"unlabeled images labelled by the teacher and used in distillation: "
                     f"{summary['unlabeled_images']:,} (the baseline never saw them)")
    sched = summary.get("schedule") or {}
    if all((sched.get(r) or {}).get("epochs") for r in ("student", "baseline")):
        st, bl = sched["student"], sched["baseline"]
        facts.append(f"training budget: student {st['epochs']} epochs x {st['train_images']:,} images "
                     f"({st['epochs'] * st['train_images']:,} samples), baseline {bl['epochs']} epochs x "
                     f"{bl['train_images']:,} labelled images ({bl['epochs'] * bl['train_images']:,} samples)")
    for gen in summary.get("generations", []):
        facts.append(f"born-again generation {gen['generation']}: {gen['top1'] * 100:.2f}% "
                     f"(validation {gen['val_top1'] * 100:.2f}%)" + (" <- kept as the student" if gen["kept"] else ""))
    facts += _speed_facts(summary, batch)
    if summary.get("advice"):
        facts.append("retention is under 90%; the method's remedies, as recipe lines: "
                     + "; ".join(summary["advice"]))
    return facts


def _speed_facts(summary: dict[str, Any], batch: int) -> list[str]:
    """Size, host speed, the device estimate and cost: the same sentences for every task."""
    facts = [f"parameters: {summary['param_reduction']:.1f}x fewer; weights: {summary['size_reduction']:.1f}x smaller",
             f"host speedup (teacher / student latency): {summary['speedup']:.2f}x at batch 1, "
             f"{summary[f'speedup_b{batch}']:.2f}x at batch {batch} "
             f"({summary['host'].get('runtime', 'PyTorch')}, {summary['host']['threads']} threads"
             + (f"; PyTorch eager {summary['speedup_torch']:.2f}x at batch 1" if summary.get("speedup_torch") else "")
             + ")"]
    est = summary.get("device_estimate")
    if est:
        facts.append(f"ESTIMATED on {est['device']} ({est['precision'].upper()}, {est['image_size']} px, "
                     f"edgedistill plan, not measured): teacher {est['teacher']['est_fps']:.0f} FPS, student "
                     f"{est['student']['est_fps']:.0f} FPS; measure with `edgerun bench`")
    if summary.get("cost"):
        facts.append(cost_line(summary["cost"]))
    return facts


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = summary_rows(summary, summary["latency_batch"])
    lines = [f"# {summary['name']}: distillation summary", "",
             f"Evaluated on `{summary['eval_split']}` ({summary['eval_samples']} images).", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += [""] + [f"- {fact}" for fact in summary_facts(summary)]
    lines += ["", f"**Verdict:** {summary['verdict']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run's report
def _read_json(path) -> Optional[dict]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epoch_records(path) -> list[dict[str, Any]]:
    """The per-epoch records of a step's metrics.jsonl (losses, top-1, seconds); [] when it is unreadable."""
    import json

    rows = []
    try:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "epoch":
                rows.append(record)
    except (OSError, ValueError):
        return []
    return rows


def _measured_kind(data: dict) -> str:
    if "result" in data and "verdict" in data:
        return "bench"
    if "end_to_end_fps" in data:
        return "camera"
    if "top1" in data and "max_drop" in data:
        return "validate"
    return "unknown"


def collect_report(run_dir, measured: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the report shows, read from a finished run folder (and device JSON files, if given)."""
    from pathlib import Path

    from .errors import EdgedistillError

    from .evaluate import load_summary

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    curves = {p.parent.name: epoch_records(p) for p in sorted(run_dir.glob("*/metrics.jsonl"))}
    reports = {p.parent.name: _read_json(p) for p in sorted(run_dir.glob("*/report.json"))}
    manifest = _read_json(run_dir / "bundle" / "manifest.json")
    device = []
    for path in measured:
        data = _read_json(Path(path))
        if data is None:
            raise EdgedistillError(f"--measured {path}: not a readable JSON file from edgerun (bench/validate/camera "
                                   "--json)")
        kind = _measured_kind(data)
        if kind == "unknown":
            raise EdgedistillError(f"--measured {path}: neither an `edgerun bench --json`, `validate --json` nor "
                                   "`camera --json` file")
        device.append({"path": str(path), "kind": kind, "data": data})
    return {"summary": summary, "curves": {k: v for k, v in curves.items() if v}, "reports": reports,
            "manifest": manifest, "device": device, "run_dir": str(run_dir)}


def _figures(info: dict[str, Any]) -> dict[str, bytes]:
    """The report's plots as PNG bytes, in display order (matplotlib, Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        figures[name] = buf.getvalue()

    s, curves = info["summary"], info["curves"]
    kd_runs = {k: v for k, v in curves.items() if any("kd" in e for e in v)}
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for name, rows in kd_runs.items():
            axes[0].plot([r["epoch"] + 1 for r in rows], [r["kd"] for r in rows], marker="o", label=name)
        axes[0].set(title="KD loss (soft targets, x T²)", xlabel="epoch")
        for name, rows in curves.items():
            if any("ce" in r for r in rows):
                axes[1].plot([r["epoch"] + 1 for r in rows], [r.get("ce", r.get("loss")) for r in rows], marker="o",
                             label=name)
            regression = s.get("task") == "regression"
            key, scale = ("val_r2", 1) if regression else ("val_top1", 100)
            validated = [r for r in rows if r.get(key) is not None]
            axes[2].plot([r["epoch"] + 1 for r in validated], [scale * r[key] for r in validated], marker="o",
                         label=name)
        regression = s.get("task") == "regression"
        if regression:
            axes[0].set(title="KD loss (MSE to the teacher's predictions)", xlabel="epoch")
        axes[1].set(title="task loss (MSE/Huber to the targets)" if regression else "CE loss (hard labels)",
                    xlabel="epoch")
        axes[2].set(title="validation R²" if regression else "validation top-1 (%)", xlabel="epoch")
        for ax in axes:
            if ax.lines:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        save("training curves: KD and CE logged apart", fig)
    teacher = info["reports"].get("teacher")
    classes = s.get("classes") or []
    if teacher and teacher.get("confusion_matrix"):
        matrix = np.array(teacher["confusion_matrix"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        im = axes[0].imshow(matrix, cmap="Blues")
        axes[0].set(title="teacher confusion matrix (rows: true)", xticks=range(len(classes)),
                    yticks=range(len(classes)))
        axes[0].set_xticklabels(classes, rotation=90, fontsize=7)
        axes[0].set_yticklabels(classes, fontsize=7)
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        bins = teacher.get("reliability") or []
        if bins:
            axes[1].bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7,
                        edgecolor="black", label="accuracy per confidence bin")
        axes[1].plot([0, 1], [0, 1], color="tab:red", linestyle="--", label="perfect calibration")
        axes[1].set(title=f"teacher calibration (ECE {teacher.get('ece', float('nan')):.3f})", xlabel="confidence",
                    ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        axes[1].legend(fontsize=8)
        save("teacher validation: confusion matrix and calibration", fig)
    per_class = {role: info["reports"].get(folder) for role, folder in (("teacher", "teacher"), ("student", "student"),
                                                                        ("baseline", "baseline"))}
    if all(per_class.values()) and classes and s.get("task") != "regression":
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 3), 3.6))
        x = np.arange(len(classes))
        for i, (role, rep) in enumerate(per_class.items()):
            ax.bar(x + (i - 1) * 0.27, [100 * (rep["per_class"].get(c) or 0) for c in classes], width=0.27,
                   label=role)
        ax.set_xticks(x)
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.set(title="per-class accuracy (%)", ylim=(0, 105))
        ax.legend(fontsize=8)
        save("per-class accuracy: teacher, student, baseline", fig)
    points = tradeoff_points(info)
    if points:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for p in points:
            if p.get("latency_ms") is not None:
                axes[0].scatter(p["latency_ms"], p["top1"], s=60)
                axes[0].annotate(p["label"], (p["latency_ms"], p["top1"]), fontsize=8, xytext=(4, 4),
                                 textcoords="offset points")
            axes[1].scatter(p["size_mb"], p["top1"], s=60)
            axes[1].annotate(p["label"], (p["size_mb"], p["top1"]), fontsize=8, xytext=(4, 4),
                             textcoords="offset points")
        axes[0].set(title="top-1 vs host latency (batch 1)", xlabel="ms", ylabel="top-1 (%)")
        axes[1].set(title="top-1 vs weights size", xlabel="MB", ylabel="top-1 (%)")
        for ax in axes:
            ax.grid(alpha=0.3)
        save("trade-off: every model of the run", fig)
    comparison = device_rows(info)
    if comparison:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        labels = [r["what"] for r in comparison]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [r["estimated"] or 0 for r in comparison], width=0.4, label="expected (estimate or host)")
        ax.bar(x + 0.2, [r["measured"] or 0 for r in comparison], width=0.4, label="measured on the device")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
        ax.set_title("device: estimate vs measurement")
        save("device: planner estimate next to the measurement", fig)
    return figures


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
        points.append({"label": f"{role} ({m['model']})", "top1": 100 * m["top1"], "size_mb": m["size_mb"],
                       "latency_ms": latency})
    int8 = ((info.get("manifest") or {}).get("metrics") or {}).get("int8") or {}
    if (int8.get("int8") or {}).get("top1") is not None:
        points.append({"label": f"student INT8 ({int8['int8'].get('status', '?')})", "top1": 100 * int8["int8"]["top1"],
                       "size_mb": s["student"]["size_mb"] / 4, "latency_ms": None})
    return points


def device_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Planner estimates next to measured device figures, one row per quantity that both sides have."""
    from .planner import model_latency_ms

    est = info["summary"].get("device_estimate") or {}
    rows = []
    for item in info["device"]:
        d = item["data"]
        if item["kind"] == "bench":
            model_ms = model_latency_ms(d["result"])
            rows.append({"what": "student FPS (model)", "estimated": (est.get("student") or {}).get("est_fps"),
                         "measured": 1000.0 * d["result"].get("batch", 1) / model_ms if model_ms else None,
                         "source": item["path"]})
            rows.append({"what": "student FPS (pipeline)", "estimated": None,
                         "measured": d["result"].get("throughput_fps"), "source": item["path"]})
            total = (d["result"].get("memory") or {}).get("total_mb")
            rows.append({"what": "process memory MB", "estimated": (est.get("student") or {}).get("est_memory_mb"),
                         "measured": total, "source": item["path"]})
        elif item["kind"] == "camera":
            rows.append({"what": "camera FPS (end to end)", "estimated": None, "measured": d.get("end_to_end_fps"),
                         "source": item["path"]})
        elif item["kind"] == "validate":
            rows.append({"what": "device top-1 % (expected: host FP32)",
                         "estimated": 100 * (d.get("host_fp32_top1") or 0) or None,
                         "measured": 100 * d["top1"], "source": item["path"]})
    return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def report_sections(info: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, markdown lines) of every section; shared by report.md and report.html."""
    s = info["summary"]
    out = []
    rows = summary_rows(s, s["latency_batch"])
    out.append(("Teacher, student and baseline", _md_table(rows[0], rows[1:]) + [""]
                + [f"- {fact}" for fact in summary_facts(s)] + ["", f"**Verdict:** {s['verdict']}"]))
    teacher = info["reports"].get("teacher")
    if s.get("task") == "regression":
        rows_t = [(name, *(f"{s[r]['per_target'][name]['mae']:.4g} / {s[r]['per_target'][name]['r2']:.3f}"
                           for r in ("teacher", "student", "baseline"))) for name in s["targets"]["names"]]
        out.append(("Per target (MAE / R²)", _md_table(["target", "teacher", "student", "baseline"], rows_t)))
        teacher = None  # per-class accuracy and calibration are classification facts
    if teacher:
        per_class = [(c, "-" if v is None else f"{100 * v:.1f}%") for c, v in teacher["per_class"].items()]
        out.append(("Teacher validation", [f"top-1 {100 * teacher['top1']:.2f}% on {teacher['samples']} images; "
                                           f"expected calibration error {teacher['ece']:.4f} (15 bins)", ""]
                    + _md_table(["class", "teacher accuracy"], per_class)))
    manifest = info.get("manifest")
    if manifest:
        metrics = manifest.get("metrics") or {}
        int8, parity = metrics.get("int8") or {}, metrics.get("parity") or {}
        lines = []
        regression = manifest.get("task") == "regression"
        if parity:
            lines.append(f"- ONNX Runtime vs PyTorch on {parity.get('samples')} held-out images: max abs error "
                         f"{parity.get('max_abs_error', float('nan')):.2e}" + ("" if regression else
                                                                              f", top-1 agreement "
                                                                              f"{100 * parity.get('top1_agreement', 0):.2f}%"))
        if int8.get("int8") and regression:
            lines.append(f"- host INT8 (ONNX Runtime, QDQ): R² {int8['int8']['r2']:.4f}, MAE {int8['int8']['mae']:.4g} vs "
                         f"FP32 R² {int8['fp32_r2']:.4f}, MAE {int8['fp32_mae']:.4g} (R² drop {int8['int8']['drop']:.4f}, "
                         f"{int8['int8']['status']})")
        elif int8.get("int8"):
            lines.append(f"- host INT8 (ONNX Runtime, QDQ): top-1 {100 * int8['int8']['top1']:.2f}% vs FP32 "
                         f"{100 * int8['fp32_top1']:.2f}% (drop {100 * int8['int8']['drop']:.2f} points, "
                         f"{int8['int8']['status']})")
        lines.append(f"- bundle for `{manifest.get('target')}`: `edgedistill pack {info['run_dir']}/bundle -o "
                     f"{manifest.get('name')}.edb`")
        out.append(("Export: parity and INT8 on the host", lines))
    est = s.get("device_estimate")
    dev = device_rows(info)
    lines = []
    if est:
        lines.append(f"ESTIMATES (edgedistill plan, {est['device']}, {est['precision'].upper()}, {est['image_size']} px; "
                     f"not measurements): teacher {est['teacher']['est_fps']:.0f} FPS, student "
                     f"{est['student']['est_fps']:.0f} FPS, student process memory {est['student']['est_memory_mb']:.0f} MB")
    if dev:
        lines += [""] + _md_table(["quantity", "expected (planner estimate or host figure)", "measured", "file"],
                                  [(r["what"], "-" if r["estimated"] is None else f"{r['estimated']:.1f}",
                                    "-" if r["measured"] is None else f"{r['measured']:.1f}", r["source"])
                                   for r in dev])
    elif est:
        lines.append("")
        lines.append("no device measurement given: run `edgerun bench BUNDLE --engine E --json bench.json` on the "
                     "board and `edgedistill report RUN --measured bench.json`")
    if lines:
        out.append(("Device", lines))
    if s.get("cost"):
        out.append(("Cost", [f"- {cost_line(s['cost'])}", "- prices are the recipe's inputs; try others with "
                             f"`edgedistill cost {info['run_dir']} --price-per-hour P --distillation-cost C`"]))
    return out


def write_report(run_dir, measured: Sequence[str] = ()) -> tuple[Any, Any]:
    """report.md (+ report_files/*.png) and report.html (one self-contained file, images inlined) in the run."""
    import base64
    import html
    import re as _re
    from pathlib import Path

    info = collect_report(run_dir, measured)
    run_dir = Path(run_dir)
    s = info["summary"]
    figures = _figures(info)
    sections = report_sections(info)
    files = run_dir / "report_files"
    files.mkdir(exist_ok=True)
    slug = {name: _re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] + ".png" for name in figures}
    for name, png in figures.items():
        (files / slug[name]).write_bytes(png)
    md = [f"# {s['name']}: distillation report", "", f"Evaluated on `{s['eval_split']}` ({s['eval_samples']} images).",
          ""]
    for title, lines in sections:
        md += [f"## {title}", ""] + lines + [""]
    md += ["## Plots", ""] + [f"![{name}](report_files/{slug[name]})\n" for name in figures]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    def md_to_html(lines: list[str]) -> str:
        out, table = [], []

        def inline(text: str) -> str:
            text = html.escape(text)
            text = _re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            return _re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        def flush() -> None:
            if table:
                cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not row.startswith("|---")]
                out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                           + "</table>")
                table.clear()

        for line in lines:
            if line.startswith("|"):
                table.append(line)
                continue
            flush()
            if line.startswith("- "):
                out.append(f"<li>{inline(line[2:])}</li>")
            elif line:
                out.append(f"<p>{inline(line)}</p>")
        flush()
        return "\n".join(out)

    body = [f"<h1>{html.escape(s['name'])}: distillation report</h1>",
            f"<p>Evaluated on <code>{html.escape(s['eval_split'])}</code> ({s['eval_samples']} images).</p>"]
    for title, lines in sections:
        body += [f"<h2>{html.escape(title)}</h2>", md_to_html(lines)]
    body.append("<h2>Plots</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(f'<figure><img class="plot" alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(name)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px}th{background:#f0f0f0}img.plot{max-width:100%}code{background:#f4f4f4}"
             "figcaption{font-size:12px;color:#555}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(s["name"]) + " report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")
    html_path = run_dir / "report.html"
    html_path.write_text(page)
    return html_path, md_path


def compare_text(summaries: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Runs of one recipe side by side (seeds): top-1s, retention, KD gain, p; then mean ± std over the runs
    (regression runs: R², retention of R², KD gain in MAE)."""
    import statistics

    from .errors import EdgedistillError

    tasks = {s.get("task", "classification") for s in summaries}
    if len(tasks) > 1:
        raise EdgedistillError("compare: these runs mix classification and regression summaries; compare runs of "
                               "one recipe")
    if tasks == {"regression"}:
        lines = [f"{'run':28} {'seed':>4} {'teacher R2':>10} {'student R2':>10} {'baseline R2':>11} {'retention':>9} "
                 f"{'MAE gain':>9}"]
        for name, s in zip(names, summaries):
            lines.append(f"{name[-28:]:28} {s.get('seed', '-')!s:>4} {s['teacher']['r2']:10.4f} "
                         f"{s['student']['r2']:10.4f} {s['baseline']['r2']:11.4f} {100 * s['retention']:8.1f}% "
                         f"{s['kd_gain']:+9.4g}")
        gains = [s["kd_gain"] for s in summaries]
        lines += ["", f"mean over {len(summaries)} run(s): retention "
                      f"{statistics.mean(100 * s['retention'] for s in summaries):.1f}%, KD gain (baseline MAE - "
                      f"student MAE) {statistics.mean(gains):+.4g}"]
        return "\n".join(lines)

    header = f"{'run':28} {'seed':>4} {'teacher':>8} {'student':>8} {'baseline':>8} {'retention':>9} {'KD gain':>8} " \
             f"{'p':>8}"
    lines = [header, "-" * len(header)]
    for name, s in zip(names, summaries):
        lines.append(f"{name[-28:]:28} {s.get('seed', '-')!s:>4} {100 * s['teacher']['top1']:7.2f}% "
                     f"{100 * s['student']['top1']:7.2f}% {100 * s['baseline']['top1']:7.2f}% "
                     f"{100 * s['retention']:8.1f}% {100 * s['kd_gain']:+7.2f} {s['significance']['p_value']:8.2g}")

    def ms(values: list[float], fmt: str) -> str:
        if len(values) < 2:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"

    retention = [100 * s["retention"] for s in summaries]
    gain = [100 * s["kd_gain"] for s in summaries]
    lines += ["", f"mean over {len(summaries)} run(s): retention {ms(retention, '.1f')}%, KD gain "
                  f"{ms(gain, '+.2f')} points, student {ms([100 * s['student']['top1'] for s in summaries], '.2f')}% "
                  f"vs baseline {ms([100 * s['baseline']['top1'] for s in summaries], '.2f')}%"]
    if len(summaries) > 1 and statistics.mean(gain) > 0 and min(gain) <= 0:
        lines.append("the gain changes sign across runs: report it as not established")
    return "\n".join(lines)
