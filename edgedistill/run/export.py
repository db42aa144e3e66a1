"""The export stage: the kept student to a verified bundle, the evaluate stage's figures and reject decision in its
manifest, and quantization-aware distillation when ``export.int8`` reaches it.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from torch import nn

from edgedistill.data.splits import with_unlabeled
from edgedistill.files import atomic_write_text
from edgedistill.judge.summary import summary_markdown
from edgedistill.judge.thresholds import pick_threshold
from edgedistill.run.context import RunContext
from edgedistill.run.folder import MODEL_FILE
from edgedistill.ship.fakequant import QuantPlan
from edgedistill.train.job import Teaching, TrainJob, balance_for
from edgedistill.train.loop import train_model

log = logging.getLogger(__name__)


# the INT8 gate's facts the summary carries, where the user reads the verdict
INT8_SUMMARY_KEYS = (
    "fp32_top1",
    "fp32_r2",
    "attempts",
    "chosen",
    "status",
    "drop",
    "kept_fp16",
    "advice",
    "layers",
    "calibration",
    "fp32_gate",
    "line",
)


def _host_facts(ctx: RunContext) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(the host's figures the manifest records, the reject decision) from the evaluate stage's summary.json; the
    decision only when the summary is this recipe's."""
    summary_path = ctx.run_dir / "summary.json"
    if not summary_path.exists():
        log.warning("export: no summary.json yet (run evaluate first to carry host metrics into the manifest)")
        return {}, None
    s = json.loads(summary_path.read_text())
    quality = ("r2", "mae") if ctx.recipe.task == "regression" else ("top1",)
    host = {f"{role}_{k}": s[role][k] for role in ("teacher", "student", "baseline") for k in quality}
    host.update({k: s[k] for k in ("retention", "kd_gain", "eval_split", "eval_samples")})
    decision = None
    if s.get("metric"):
        host["metric"] = s["metric"]["name"]
        host.update({f"{role}_score": s[role]["score"] for role in ("teacher", "student", "baseline")})
        if s.get("fingerprint") == ctx.fingerprint("evaluate"):
            decision = _decision(s)
        else:
            log.warning(
                "export: %s is from another recipe: the bundle gets no reject threshold; run `edgedistill "
                "evaluate RECIPE` first",
                summary_path,
            )
    return host, decision


def _gate_into_summary(ctx: RunContext, manifest: dict[str, Any]) -> None:
    """The INT8 gate and the DeepStream measurement written into summary.json/md, beside the verdict."""
    summary_path = ctx.run_dir / "summary.json"
    int8 = manifest["metrics"].get("int8") or {}
    ds = manifest["metrics"].get("deepstream")
    if not summary_path.exists() or not (int8.get("attempts") or ds):
        return
    s = json.loads(summary_path.read_text())
    if int8.get("attempts"):
        s["int8"] = {k: int8.get(k) for k in INT8_SUMMARY_KEYS}
    if ds:
        s["deepstream"] = dict(ds, note=manifest["deepstream"]["note"])
    atomic_write_text(summary_path, json.dumps(s, indent=2))
    atomic_write_text(ctx.run_dir / "summary.md", summary_markdown(s))


def stage_export(ctx: RunContext) -> dict[str, Any]:
    """The kept student to a verified bundle, with the host's figures and the reject decision in its manifest."""
    from edgedistill.ship.export import ExportJob, build_bundle

    recipe, data = ctx.recipe, ctx.data
    student_key = ctx.best_student()
    student = ctx.trained_model(student_key, "export")
    teacher = ctx.trained_model("teacher", "export") if recipe.export.teacher else None
    host, decision = _host_facts(ctx)
    manifest = build_bundle(
        ExportJob(
            qad=lambda plan: quantization_aware_distillation(ctx, student, student_key, plan),
            model=student,
            out_dir=ctx.stage_dir("export"),
            name=recipe.name,
            classes=data.classes,
            train=data.train,
            val=ctx.eval_split,  # images no stage chose anything on: the gate's and the bundle's check images
            threshold_images=ctx.calib_split if (decision or {}).get("threshold") is not None else None,
            pick_threshold=_threshold_rule(ctx),
            data_cfg=recipe.data,
            cfg=recipe.export,
            seed=recipe.seed,
            checkpoint=ctx.stage_dir(student_key) / MODEL_FILE,
            recipe_yaml=recipe.to_yaml(),
            teacher=teacher,
            source={
                "student_model": recipe.student.model,
                "teacher_model": recipe.teacher.model,
                "recipe_fingerprint": ctx.fingerprint("export"),
                **({"tracking": ctx.tracker.source()} if ctx.tracker.enabled else {}),
            },
            host_metrics=host,
            targets=data.scaling.as_dict() if data.scaling is not None else None,
            decision=decision,
        )
    )
    ctx.mark_done("export", ["manifest.json", "model.onnx"])
    _gate_into_summary(ctx, manifest)
    par = manifest["metrics"]["parity"]
    log.info(
        "export: bundle for %s in %s (parity max abs error %.1e%s); pack it with `edgedistill pack %s -o %s.edb`",
        recipe.export.target,
        ctx.stage_dir("export"),
        par["max_abs_error"],
        "" if data.scaling is not None else f", top-1 agreement {par['top1_agreement'] * 100:.2f}%",
        ctx.stage_dir("export"),
        recipe.name,
    )
    return manifest


def _threshold_rule(ctx: RunContext) -> Optional[Callable[[np.ndarray, np.ndarray], float]]:
    """How the evaluate stage picked the student's threshold (the operating point, else the metric's false-reject
    limit, with the run's confidence), for every INT8 variant's own threshold; None when nothing was picked."""
    plan = ctx.evaluation
    point = None if plan is None else plan.operating_point or plan.metric_point()
    if point is None:
        return None
    return functools.partial(pick_threshold, point=point)


def _epoch_seconds(folder: Path) -> float:
    """The seconds a step's epochs took, from its metrics.jsonl (0 when it has none)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(
        json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if '"kind": "epoch"' in line
    )


def quantization_aware_distillation(
    ctx: RunContext, student: nn.Module, student_key: str, plan: QuantPlan
) -> tuple[nn.Module, dict[str, Any]]:
    """``export.int8`` reaching QAD: the trained student with fake quantization on what the INT8 model quantizes
    (``plan``: the layers' calibrated input ranges, the residual Adds' inputs), fine-tuned with the distill stage's
    loss against the FP32 teacher (``export.qad_teacher``: the run's teacher, or the FP32 student itself) for
    ``export.qad_epochs`` at ``export.qad_lr``, BatchNorm statistics frozen; resumable in ``<run>/qad/`` like every
    step. Returns the float model with the fine-tuned weights and the facts the manifest records."""
    import hashlib

    from edgedistill.models.checkpoint import read_metadata
    from edgedistill.ship.fakequant import add_fake_quant, remove_fake_quant

    recipe = ctx.recipe
    export = recipe.export
    folder = ctx.run_dir / "qad"
    facts = {
        "student": ctx.fingerprint(student_key),
        "export": recipe.fingerprint("export"),
        "amax": sorted(plan.describe().items()),
    }
    fingerprint = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    step = ctx.steps[student_key]
    if export.qad_teacher == "teacher":
        teacher = ctx.trained_model(ctx.steps["distill"].teacher, "export (quantization-aware distillation)")
    else:
        teacher = ctx.trained_model(student_key, "export (quantization-aware distillation)")
    model = add_fake_quant(student, plan)
    cfg = recipe.student.model_copy(
        update={
            "epochs": export.qad_epochs,
            "lr": export.qad_lr,
            "warmup_epochs": 0.0,
            "val_every": 1,
            "layer_decay": None,
        }
    )
    train = ctx.data.train if ctx.unlabeled is None else with_unlabeled(ctx.data.train, ctx.unlabeled)
    data_cfg = ctx.step_data(ctx.steps["distill"])  # the distill stage's stream: distill.balance: sampler included
    balance = None
    if recipe.task != "regression":
        balance = balance_for(cfg, train, data_cfg, recipe.distill, original_sampler=recipe.data.sampler)
    log.info(
        "export: quantization-aware distillation of %s against the FP32 %s (%d epoch(s), lr %.1e, %d fake-"
        "quantized layers) in %s",
        step.cfg.model,
        export.qad_teacher,
        cfg.epochs,
        cfg.lr,
        len(plan.input_amax),
        folder,
    )
    history = train_model(
        TrainJob(
            model=model,
            train=train,
            val=ctx.data.val,
            data=data_cfg,
            cfg=cfg,
            folder=folder,
            seed=recipe.seed,
            fingerprint=fingerprint,
            device=ctx.device,
            label="qad",
            teaching=Teaching(teacher=teacher, distill=recipe.distill),
            hardware=recipe.train,
            task=recipe.task,
            balance=balance,
            freeze_bn=True,
        )
    )
    seconds = sum(r.get("seconds", 0.0) for r in history)
    student_seconds = _epoch_seconds(ctx.stage_dir(student_key))
    facts = {
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "teacher": export.qad_teacher,
        "objective": "recovery: the FP32 student's own outputs"
        if export.qad_teacher == "student"
        else "retraining: against the run's FP32 teacher (the student may change beyond recovering INT8)",
        "train_seconds": round(seconds, 1),
        "student_train_seconds": round(student_seconds, 1),
        "val_top1_fake_quant": (history[-1] if history else {}).get("val_top1"),
        "checkpoint": str(folder / "last.safetensors"),
        "fingerprint": read_metadata(folder / "last.safetensors").get("fingerprint"),
    }
    return remove_fake_quant(model.cpu()).eval(), facts


def _decision(summary: dict[str, Any]) -> dict[str, Any]:
    """The device's reject decision from the evaluate stage: the metric, the positive class and, when a threshold
    was picked (an operating point, or recall at a false-reject limit), the student's threshold with what it gave
    on the host."""
    chosen = summary["metric"]
    out: dict[str, Any] = {"metric": chosen["name"], "positive_class": chosen.get("positive_class")}
    op = summary.get("operating_point")
    if op:
        mine = op["student"]
        out.update(
            threshold=mine["threshold"],
            operating_point=chosen["operating_point"],
            calibration_split=op["calibration_split"],
            host={"split": summary["eval_split"], "recall": mine["recall"], "false_reject": mine["false_reject"]},
        )
    elif summary["student"].get("metric_threshold") is not None:
        out.update(
            threshold=summary["student"]["metric_threshold"],
            operating_point={"target_recall": None, "max_false_reject": chosen.get("false_reject_limit")},
            calibration_split=(chosen.get("calibration") or {}).get("split"),
        )
    return out
