"""The run's summary as text: the verdict with its evidence, advice when the student falls short, the table and the
sentences under it (summary.md and the console). Runs side by side are ``judge.compare``."""

from __future__ import annotations

import re
from typing import Any, Optional

from edgedistill.judge.thresholds import promise_text

SIGNIFICANCE = 0.05
RETENTION_ADVICE = 0.90
TITLES = {
    "top1": "top-1",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "recall_at_false_reject": "recall at the false-reject limit",
}

# the next size up within a family, for "a larger student" advice
_LARGER = [
    (r"^mobilenetv3_small_\d+$", "mobilenetv3_large_100"),
    (r"^mobilenetv2_0\d\d$", "mobilenetv2_100"),
    (r"^mobilenetv2_100$", "mobilenetv2_140"),
    (r"^squeezenet1_1$", "squeezenet1_0"),
    (r"^efficientnet_b(\d)$", None),
    (r"^resnet10t$", "resnet18"),
    (r"^lcnet_0\d\d$", "lcnet_100"),
    (r"^lcnet_100$", "lcnet_150"),
]


def larger_model(name: str) -> Optional[str]:
    for pattern, bigger in _LARGER:
        match = re.match(pattern, name)
        if match:
            return bigger or f"efficientnet_b{int(match.group(1)) + 1}"
    return None


def metric_title(summary: dict[str, Any]) -> str:
    """The name of what a summary's retention and KD gain are measured on (top-1 for older summaries)."""
    return (summary.get("metric") or {}).get("title") or "top-1"


def _judged(summary: dict[str, Any]) -> dict[str, Any]:
    """What the verdict speaks of: the paired test, the gain (> 0: the student is better), its interval, what it
    measures and the retention on it; where the line operates when the run has an operating point (each model at its
    own threshold), else on the run's metric."""
    cmp = (summary.get("operating_point") or {}).get("comparison")
    if cmp:
        rule = summary["operating_point"]["rule"]
        what = (
            f"recall at matched false-reject rate ({rule})"
            if cmp["measure"] == "recall"
            else f"false-reject rate saved at matched recall ({rule})"
        )
        return {
            "significance": cmp["significance"],
            "gain": cmp["gain"],
            "interval": cmp["gain_interval"],
            "what": what,
            "retention": cmp.get("retention"),
        }
    return {
        "significance": summary["significance"],
        "gain": summary["kd_gain"],
        "interval": summary["intervals"]["kd_gain"],
        "what": metric_title(summary),
        "retention": summary.get("retention"),
    }


def evidence_text(summary: dict[str, Any]) -> str:
    """The paired test behind a verdict, in words: McNemar's discordant images, or the permutation test."""
    judged = _judged(summary)
    sig = judged["significance"]
    lo, hi = (v * 100 for v in judged["interval"])
    if sig.get("test") == "permutation":
        test = (
            f"paired permutation test p = {sig['p_value']:.3g} on {sig['images']} images ({sig['discordant']} "
            f"predicted differently, {sig['resamples']:,} resamples)"
        )
    else:
        kind = sig.get("note", "").split(" images")[0] if sig.get("note") else ""
        where = f"{sig['images']} {kind} images" if kind else f"{sig['images']} images"
        test = (
            f"McNemar p = {sig['p_value']:.3g} on {where} ({sig['a_only']} right only for the student, "
            f"{sig['b_only']} only for the baseline)"
        )
    return f"{test}; 95% interval of the gain [{lo:+.2f}, {hi:+.2f}]"


def verdict(summary: dict[str, Any], min_gain: float) -> tuple[str, bool]:
    """(sentence, helped): "helped" needs a significant paired test and a gain of at least ``min_gain``, on the
    line's terms: at the operating point when the run has one (each model at its own threshold), else on the run's
    metric. When the planner estimates the student no faster than its teacher on the export target, the sentence
    says so and names faster candidates."""
    judged = _judged(summary)
    sig, gain, what = judged["significance"], judged["gain"] * 100, judged["what"]
    p = sig["p_value"]
    points = "points" if what == "top-1" else f"points of {what}"
    evidence = evidence_text(summary)
    helped = False
    if p < SIGNIFICANCE and gain < 0:
        text = (
            f"distillation hurt: the KD student is {-gain:.2f} {points} below its baseline trained without KD "
            f"({evidence}); ship the baseline or revisit temperature/alpha/teacher"
        )
    elif p < SIGNIFICANCE and gain > 0:
        if gain < min_gain * 100:
            text = (
                f"distillation helped, but by little: +{gain:.2f} {points}, under the {min_gain * 100:.2f}-point "
                f"threshold ({evidence})"
            )
        else:
            helped = True
            retention = f", retention {judged['retention'] * 100:.1f}%" if judged["retention"] else ""
            text = f"distillation helped: +{gain:.2f} {points} over the baseline{retention} ({evidence})"
    else:
        need = sig.get("images_to_resolve")
        if sig.get("test") == "permutation":
            resolve = "more evaluation images would resolve it"
        else:
            resolve = (
                f"about {need:,} paired images would resolve a difference this size (80% power)"
                if need
                else "both made the same number of mistakes"
            )
        text = (
            f"within noise: the KD student is {gain:+.2f} {points} from its baseline, not a significant difference "
            f"({evidence}); {resolve}"
        )
    return text + device_sentence(summary), helped


def device_sentence(summary: dict[str, Any]) -> str:
    """'' when the student is estimated faster than its teacher beyond the planner's error on the export target;
    "within the planner's error" when the intervals overlap; NOT DEPLOYABLE AS A SPEED-UP only when the student's
    interval lies wholly below the teacher's. Never a firmer word than the intervals allow."""
    check = summary.get("device_check")
    if not check:
        return ""
    verdict = check.get("verdict") or ("faster" if check["student_faster"] else "slower")
    if verdict == "faster":
        return ""
    others = check.get("faster_candidates") or []
    names = ", ".join(f"{c['model']} (~{c['est_fps']:.0f} FPS)" for c in others)
    ranges = ""
    if check.get("student_fps_range") and check.get("teacher_fps_range"):
        (s_lo, s_hi), (t_lo, t_hi) = check["student_fps_range"], check["teacher_fps_range"]
        ranges = f"; 90% intervals {s_lo:.0f}-{s_hi:.0f} vs {t_lo:.0f}-{t_hi:.0f} FPS"
    figures = f"{check['student_fps']:.0f} vs {check['teacher_fps']:.0f} FPS{ranges}, edgedistill plan, not measured"
    if verdict == "within error":
        direction = "faster" if check["student_fps"] > check["teacher_fps"] else "slower"
        return (
            f". On {check['device']} the student is ESTIMATED {direction} than its teacher, within the planner's "
            f"error ({figures}): measure both with edgerun bench before counting on a speed-up"
            + (f"; estimated faster beyond the error: {names}" if names else "")
        )
    return (
        f". NOT DEPLOYABLE AS A SPEED-UP: on {check['device']} the student is ESTIMATED slower than its "
        f"teacher beyond the planner's error ({figures}); ship the teacher, or distill into a model estimated "
        "faster there: "
        + (
            names
            if names
            else "none of the planner's candidates is beyond its error (at this image size per-layer overhead "
            "dominates: try a larger image size or measure with edgerun bench)"
        )
    )


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
    metric = (summary.get("metric") or {}).get("name", "top1")
    extra = () if regression or metric == "top1" else (metric_title(summary),)
    rows = [
        (
            "model",
            "role",
            "MAE / R²" if regression else "top-1",
            *extra,
            "params",
            "size MB",
            "ORT b1 ms",
            f"ORT b{batch} ms",
            "PyTorch b1 ms",
        )
    ]
    roles = ["teacher"] + [a["role"] for a in summary.get("chain", [])] + ["student", "baseline"]
    for role in roles:
        m = summary[role]
        label = {"student": "student (KD)"}.get(role, role)
        if role == "student" and summary.get("generations"):
            label = f"student (KD, generation {m['generation']})"
        quality = f"{m['mae']:.4g} / {m['r2']:.3f}" if regression else f"{m['top1'] * 100:.2f}%"
        chosen = (f"{m[metric] * 100:.2f}%",) if extra else ()
        rows.append(
            (
                m["model"],
                label,
                quality,
                *chosen,
                f"{m['params'] / 1e6:.2f}M",
                f"{m['size_mb']:.2f}",
                f"{m['latency_ms_b1']:.2f}" if "latency_ms_b1" in m else "= student",
                f"{m[f'latency_ms_b{batch}']:.2f}" if f"latency_ms_b{batch}" in m else "= student",
                f"{m['torch_latency_ms_b1']:.2f}" if "torch_latency_ms_b1" in m else "= student",
            )
        )
    return rows


def cost_line(c: dict[str, Any]) -> str:
    line = (
        f"monthly serving cost at {c['requests_per_month']:,.0f} requests: teacher "
        f"{c['teacher']['monthly_cost']:,.2f} ({c['teacher']['instances']} instance(s), "
        f"{c['teacher']['compute_hours']:,.0f} busy h), student {c['student']['monthly_cost']:,.2f} "
        f"({c['student']['instances']}, {c['student']['compute_hours']:,.0f} busy h), saving "
        f"{c['monthly_saving']:,.2f} a month ({c.get('annual_saving', 12 * c['monthly_saving']):,.2f} a year)"
    )
    return line + payback_phrase(c)


def payback_phrase(c: dict[str, Any]) -> str:
    if c.get("distillation_cost") is None:
        return ""
    if c.get("payback_months") is None:
        return f"; the distillation work ({c['distillation_cost']:,.2f}) does not pay back: the student saves nothing"
    return (
        f"; the distillation work ({c['distillation_cost']:,.2f}) pays for itself in {c['payback_months']:.1f} month(s)"
    )


def summary_facts(summary: dict[str, Any]) -> list[str]:
    """The sentences under the table, shared by summary.md and the console."""
    batch = summary["latency_batch"]
    if summary.get("task") == "regression":
        return _regression_facts(summary) + _speed_facts(summary, batch)
    r_lo, r_hi = (v * 100 for v in summary["intervals"]["retention"])
    g_lo, g_hi = (v * 100 for v in summary["intervals"]["kd_gain"])
    what = metric_title(summary)
    test = "permutation" if summary["significance"].get("test") == "permutation" else "McNemar"
    facts = []
    chosen = summary.get("metric")
    if chosen:
        facts += [f"WARNING: {w}" for w in chosen.get("warnings", [])]
        facts.append(f"judged on {what}: {chosen['reason']}")
        if chosen.get("positive_class"):
            facts.append(f"positive class {chosen['positive_class']}: {chosen['positive_reason']}")
    facts += [
        f"retention (student / teacher {what}): {summary['retention'] * 100:.1f}% (95% interval "
        f"{r_lo:.1f}-{r_hi:.1f}%)",
        f"KD gain (student − baseline {what}): {summary['kd_gain'] * 100:+.2f} points (95% interval "
        f"{g_lo:+.2f} to {g_hi:+.2f}; {test} p = {summary['significance']['p_value']:.3g})",
    ]
    if chosen and chosen["name"] != "top1":
        facts.append(
            f"top-1 for reference: retention {summary['top1_retention'] * 100:.1f}%, student − baseline "
            f"{summary['top1_kd_gain'] * 100:+.2f} points"
        )
    if chosen and chosen["name"] != "balanced_accuracy" and summary["student"].get("balanced_accuracy_interval"):
        facts.append(
            "balanced accuracy with 95% intervals: "
            + "; ".join(
                f"{r} {summary[r]['balanced_accuracy'] * 100:.2f}% "
                f"[{summary[r]['balanced_accuracy_interval'][0] * 100:.2f}, "
                f"{summary[r]['balanced_accuracy_interval'][1] * 100:.2f}]"
                for r in ("teacher", "student", "baseline")
            )
        )
    facts += positive_facts(summary)
    facts += _data_free_facts(summary)
    if summary.get("unlabeled_images"):
        facts.append(
            f"unlabeled images labelled by the teacher and used in distillation: "
            f"{summary['unlabeled_images']:,} (the baseline never saw them)"
        )
    sched = summary.get("schedule") or {}
    if all((sched.get(r) or {}).get("epochs") for r in ("student", "baseline")):
        st, bl = sched["student"], sched["baseline"]
        facts.append(
            f"training budget: student {st['epochs']} epochs x {st['train_images']:,} images "
            f"({st['epochs'] * st['train_images']:,} samples), baseline {bl['epochs']} epochs x "
            f"{bl['train_images']:,} labelled images ({bl['epochs'] * bl['train_images']:,} samples)"
        )
    for gen in summary.get("generations", []):
        score, val = gen.get("score", gen["top1"]), gen.get("val_score", gen.get("val_top1"))
        facts.append(
            f"born-again generation {gen['generation']}: {what} {score * 100:.2f}% "
            f"(validation {val * 100:.2f}%)" + (" <- kept as the student" if gen["kept"] else "")
        )
    facts += _speed_facts(summary, batch)
    if summary.get("advice"):
        facts.append("retention is under 90%; the method's remedies, as recipe lines: " + "; ".join(summary["advice"]))
    return facts


def _regression_facts(summary: dict[str, Any]) -> list[str]:
    g_lo, g_hi = summary["intervals"]["kd_gain"]
    return [
        f"retention (student R² / teacher R²): {summary['retention'] * 100:.1f}%",
        f"KD gain (baseline MAE − student MAE, target units): {summary['kd_gain']:+.4g} (95% bootstrap "
        f"interval {g_lo:+.4g} to {g_hi:+.4g})",
        "targets: "
        + ", ".join(
            f"{n} (train mean {m:.4g}, std {sd:.4g})"
            for n, m, sd in zip(summary["targets"]["names"], summary["targets"]["mean"], summary["targets"]["std"])
        ),
    ]


def _data_free_facts(summary: dict[str, Any]) -> list[str]:
    """What a data-free run trained on and was evaluated on, and the data-driven run it is compared with."""
    free = summary.get("data_free")
    if not free:
        return []
    facts = [
        f"data-free: the student and the baseline trained on {free['synthetic_images']:,} images "
        f"synthesized from the teacher (DeepInversion; BN-statistics loss {free['bn_loss'][0]:.2f} -> "
        f"{free['bn_loss'][1]:.2f}, teacher confidence {free['teacher_confidence']:.2f}), no real "
        "training image; "
        + (
            "evaluated on real images"
            if free["real_evaluation"]
            else "evaluated on the synthetic images only (no data.root): not a real accuracy"
        )
    ]
    driven = free.get("data_driven")
    if driven:
        facts.append(
            f"data-driven run {driven['run']}: student {driven['student_top1'] * 100:.2f}%, baseline "
            f"{driven['baseline_top1'] * 100:.2f}% (this data-free student "
            f"{summary['student']['top1'] * 100:.2f}%)"
        )
    return facts


def positive_facts(summary: dict[str, Any]) -> list[str]:
    """The positive class's ROC-AUC and PR-AUC, and recall / false-reject rate at each model's threshold."""
    chosen = summary.get("metric") or {}
    positive = chosen.get("positive_class")
    if not positive:
        return []
    facts = []
    roles = [r for r in ("teacher", "student", "baseline") if summary.get(r, {}).get("roc_auc") is not None]
    if roles:
        facts.append(
            f"{positive} (positive) ROC-AUC / PR-AUC with 95% intervals: "
            + "; ".join(
                f"{r} {summary[r]['roc_auc']:.3f} [{summary[r]['roc_auc_interval'][0]:.3f}, "
                f"{summary[r]['roc_auc_interval'][1]:.3f}] / {summary[r]['pr_auc']:.3f} "
                f"[{summary[r]['pr_auc_interval'][0]:.3f}, {summary[r]['pr_auc_interval'][1]:.3f}]"
                for r in roles
            )
        )
    roles_ece = [r for r in ("teacher", "student", "baseline") if summary[r].get("ece") is not None]
    if roles_ece:
        facts.append(
            f"calibration error (ECE, 15 bins) of the softmax the device computes, on `{summary['eval_split']}`: "
            + "; ".join(
                f"{r} {summary[r]['ece']:.3f}"
                + (
                    f" (P({positive}) {summary[r]['positive_ece']:.3f})"
                    if summary[r].get("positive_ece") is not None
                    else ""
                )
                for r in roles_ece
            )
        )
    op = summary.get("operating_point")
    if op:
        calib = chosen.get("calibration") or {}
        facts.append(
            f"operating point {op['rule']}: each model's threshold picked on `{op['calibration_split']}` "
            f"({calib.get('images', '?')} images, {calib.get('positives', '?')} of them {positive}), reported on "
            f"`{summary['eval_split']}`: "
            + "; ".join(
                f"{r} threshold {op[r]['threshold']:.3f}, recall {_pct(op[r]['recall'])} "
                f"[{_pct(op[r]['recall_interval'][0])}, {_pct(op[r]['recall_interval'][1])}], false-reject "
                f"{_pct(op[r]['false_reject'])} [{_pct(op[r]['false_reject_interval'][0])}, "
                f"{_pct(op[r]['false_reject_interval'][1])}]"
                for r in ["teacher"] + [a["role"] for a in summary.get("chain", [])] + ["student", "baseline"]
                if r in op
            )
            + " (intervals: evaluation and calibration images resampled, the threshold picked again each time)"
        )
        cmp = op.get("comparison")
        if cmp:
            facts.append(
                f"where the line operates, student against baseline: {cmp['measure'].replace('_', '-')} "
                f"{_pct(cmp['student'])} vs {_pct(cmp['baseline'])} at matched {cmp['matched']} (teacher "
                f"{_pct(cmp['teacher'])}), the student's advantage {cmp['gain'] * 100:+.1f} points: "
                f"{evidence_text(summary)}"
            )
    for promise, split in (
        (op.get("promise") if op else None, (op or {}).get("calibration_split")),
        ((chosen.get("calibration") or {}).get("promise"), (chosen.get("calibration") or {}).get("split")),
    ):
        if promise:
            facts.append(("" if promise["holds"] else "WARNING: ") + promise_text(promise, split))
    return facts


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or value != value else f"{value * 100:.1f}%"


def _speed_facts(summary: dict[str, Any], batch: int) -> list[str]:
    """Size, host speed, the device estimate and cost: the same sentences for every task."""
    facts = [
        f"parameters: {summary['param_reduction']:.1f}x fewer; weights: {summary['size_reduction']:.1f}x smaller",
        f"host speedup (teacher / student latency): {summary['speedup']:.2f}x at batch 1, "
        f"{summary[f'speedup_b{batch}']:.2f}x at batch {batch} "
        f"({summary['host'].get('runtime', 'PyTorch')}, {summary['host']['threads']} threads"
        + (f"; PyTorch eager {summary['speedup_torch']:.2f}x at batch 1" if summary.get("speedup_torch") else "")
        + ")",
    ]
    est = summary.get("device_estimate")
    if est:
        ratio = est["student"]["est_fps"] / est["teacher"]["est_fps"]
        check = summary.get("device_check") or {}
        word = {"faster": "faster beyond the planner's error", "slower": "slower beyond the planner's error"}.get(
            check.get("verdict"), "within the planner's error"
        )

        def fps(role: str) -> str:
            e = est[role]
            span = f" ({e['est_fps_lo']:.0f}-{e['est_fps_hi']:.0f})" if "est_fps_lo" in e else ""
            return f"{e['est_fps']:.0f}{span} FPS"

        facts.append(
            f"ESTIMATED on {est['device']} ({est['precision'].upper()}, {est['image_size']} px, "
            f"edgedistill plan, not measured; 90% intervals): teacher {fps('teacher')}, student {fps('student')} "
            f"({ratio:.2f}x the teacher, {word}); measure with `edgerun bench`"
        )
    if summary.get("cost"):
        facts.append(cost_line(summary["cost"]))
    facts += int8_facts(summary)
    ds = summary.get("deepstream")
    if ds:
        facts.append(
            f"DeepStream preprocessing on the host (whole frame resized, one scale; {ds['images']} images): "
            f"top-1 {ds['deepstream_top1'] * 100:.2f}% against the bundle's {ds['bundle_top1'] * 100:.2f}% "
            f"({ds['difference'] * 100:+.2f} points; {ds['note']}); configs in bundle/deepstream/"
        )
    return facts


def int8_facts(summary: dict[str, Any]) -> list[str]:
    """The export's INT8 attempts side by side (host, ONNX Runtime) and what ships, or why not and what next."""
    int8 = summary.get("int8")
    if not int8 or not int8.get("attempts"):
        return []
    regression = "fp32_r2" in int8 and int8.get("fp32_r2") is not None
    key, scale, unit = ("r2", 1, "") if regression else ("top1", 100, "%")
    fp32 = (int8.get("fp32_gate") or {}).get(key, int8["fp32_r2"] if regression else int8["fp32_top1"])
    names = {"ptq": "PTQ", "partial": "partial", "qad": "QAD", "qad+partial": "QAD + partial"}
    parts = [f"FP32 {fp32 * scale:.2f}{unit}"]
    for kind, a in int8["attempts"].items():
        kept = f", {len(a['kept_fp16'])} layers FP16" if a.get("kept_fp16") else ""
        line = a.get("line")
        judged = (
            f"; recall {_pct(line['recall'])} vs FP32 {_pct(line['fp32_recall'])}, drop bound "
            f"{100 * line['recall_drop_upper']:+.2f}, false-reject {_pct(line['false_reject'])}, rise bound "
            f"{100 * line['false_reject_rise_upper']:+.2f}"
            if line and None not in (line["recall_drop_upper"], line["false_reject_rise_upper"])
            else ""
        )
        parts.append(f"{names[kind]} {a[key] * scale:.2f}{unit} (drop {a['drop'] * scale:.2f}{kept}{judged})")
    shipped = (
        f"ships {names[int8['chosen']]} INT8"
        if int8["status"] == "accepted"
        else f"INT8 REJECTED (the bundle keeps its best attempt, {names[int8['chosen']]}, marked rejected)"
    )
    where = (
        "the gate's images, which chose the variant (in-sample for it; the bundle's check images, apart, chose nothing)"
    )
    if int8.get("line"):
        where += (
            "; each attempt at its own threshold, passing when the upper 95% bounds of recall drop and false-reject "
            f"rise are within {100 * int8['line']['margin']:.2f} points"
        )
    lines = [f"INT8 on the host (ONNX Runtime, {where}): " + "; ".join(parts) + f": {shipped}"]
    if int8["status"] != "accepted":
        lines.append(int8["advice"])
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = summary_rows(summary, summary["latency_batch"])
    lines = [
        f"# {summary['name']}: distillation summary",
        "",
        f"Evaluated on `{summary['eval_split']}` ({summary['eval_samples']} images).",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += [""] + [f"- {fact}" for fact in summary_facts(summary)]
    lines += ["", f"**Verdict:** {summary['verdict']}", ""]
    return "\n".join(lines)
