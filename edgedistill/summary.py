"""The run's summary as text: the verdict with its evidence, advice when the student falls short, the table and the
sentences under it (summary.md and the console), and runs side by side (``edgedistill compare``)."""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

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
