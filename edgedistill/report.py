"""The run summary as text: the verdict with its evidence, advice when the student falls short, tables."""
from __future__ import annotations

import re
from typing import Any, Optional

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
    rows = [("model", "role", "top-1", "params", "size MB", "latency b1 ms", f"latency b{batch} ms")]
    roles = ["teacher"] + [a["role"] for a in summary.get("chain", [])] + ["student", "baseline"]
    for role in roles:
        m = summary[role]
        label = {"student": "student (KD)"}.get(role, role)
        if role == "student" and summary.get("generations"):
            label = f"student (KD, generation {m['generation']})"
        rows.append((m["model"], label, f"{m['top1'] * 100:.2f}%", f"{m['params'] / 1e6:.2f}M", f"{m['size_mb']:.2f}",
                     f"{m['latency_ms_b1']:.2f}" if "latency_ms_b1" in m else "= student",
                     f"{m[f'latency_ms_b{batch}']:.2f}" if f"latency_ms_b{batch}" in m else "= student"))
    return rows


def cost_line(c: dict[str, Any]) -> str:
    return (f"monthly serving cost at {c['requests_per_month']:,.0f} requests: teacher "
            f"{c['teacher']['monthly_cost']:,.2f} ({c['teacher']['instances']} instance(s), "
            f"{c['teacher']['compute_hours']:,.0f} busy h), student {c['student']['monthly_cost']:,.2f} "
            f"({c['student']['instances']}, {c['student']['compute_hours']:,.0f} busy h), saving {c['monthly_saving']:,.2f}")


def summary_facts(summary: dict[str, Any]) -> list[str]:
    """The sentences under the table, shared by summary.md and the console."""
    batch = summary["latency_batch"]
    r_lo, r_hi = (v * 100 for v in summary["intervals"]["retention"])
    g_lo, g_hi = (v * 100 for v in summary["intervals"]["kd_gain"])
    facts = [f"retention (student / teacher top-1): {summary['retention'] * 100:.1f}% (95% interval "
             f"{r_lo:.1f}-{r_hi:.1f}%)",
             f"KD gain (student − baseline): {summary['kd_gain'] * 100:+.2f} points (95% interval "
             f"{g_lo:+.2f} to {g_hi:+.2f}; McNemar p = {summary['significance']['p_value']:.3g})"]
    if summary.get("unlabeled_images"):
        facts.append(f"unlabeled images labelled by the teacher and used in distillation: "
                     f"{summary['unlabeled_images']:,} (the baseline never saw them)")
    for gen in summary.get("generations", []):
        facts.append(f"born-again generation {gen['generation']}: {gen['top1'] * 100:.2f}% "
                     f"(validation {gen['val_top1'] * 100:.2f}%)" + (" <- kept as the student" if gen["kept"] else ""))
    facts += [f"parameters: {summary['param_reduction']:.1f}x fewer; weights: {summary['size_reduction']:.1f}x smaller",
              f"host speedup (teacher / student latency): {summary['speedup']:.2f}x at batch 1, "
              f"{summary[f'speedup_b{batch}']:.2f}x at batch {batch} ({summary['host']['device']}, "
              f"{summary['host']['threads']} threads)"]
    if summary.get("cost"):
        facts.append(cost_line(summary["cost"]))
    if summary.get("advice"):
        facts.append("retention is under 90%; the method's remedies, as recipe lines: "
                     + "; ".join(summary["advice"]))
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
