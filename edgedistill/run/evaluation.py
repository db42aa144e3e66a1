"""The evaluate stage: teacher, assistants, the kept student and the baseline on the evaluation split, judged on the
run's metric, with host latency, the device estimate, cost and the verdict in ``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import json
import platform
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedistill.data.loaders import eval_loader
from edgedistill.data.splits import Split
from edgedistill.files import atomic_write_text
from edgedistill.judge.cost import cost_comparison
from edgedistill.judge.evaluate import classification_report, compare_models, regression_report
from edgedistill.judge.latency import measure_latency, measure_ort_latency
from edgedistill.judge.summary import advice, summary_markdown, verdict
from edgedistill.models.factory import count_params, weight_bytes
from edgedistill.models.predict import Prediction, predict
from edgedistill.plan.estimate import device_check, recipe_estimate
from edgedistill.run.context import RunContext


def _model_facts(model: nn.Module, top1: float, name: str) -> dict[str, Any]:
    return {"model": name, "top1": top1, "params": count_params(model), "size_mb": weight_bytes(model) / 1e6}


def _evaluated_models(ctx: RunContext) -> tuple[Split, Any, str, dict[str, str], dict[str, nn.Module]]:
    """What the evaluate stage compares: its split and loader, the student kept, each role's step and model."""
    split = ctx.eval_split
    ctx.require("teacher", "evaluate")
    student_key = ctx.best_student()
    roles = {
        "teacher": "teacher",
        **{key: key for key in ctx.chain_keys()},
        "student": student_key,
        "baseline": "baseline",
    }
    models = {role: ctx.trained_model(key, "evaluate") for role, key in roles.items()}
    return split, eval_loader(split, ctx.recipe.data), student_key, roles, models


def stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    """Teacher, assistants, the kept student and the baseline on the evaluation split, judged on the run's metric
    (``ctx.evaluation``): retention and KD gain with their paired test and bootstrap intervals, thresholds picked on
    the calibration split with recall and false-reject rate at them, speed, the device estimate, cost, verdict."""
    if ctx.recipe.task == "regression":
        return stage_evaluate_regression(ctx)
    recipe, data = ctx.recipe, ctx.data
    ev = recipe.evaluate
    plan = ctx.evaluation
    split, loader, student_key, roles, models = _evaluated_models(ctx)
    summary: dict[str, Any] = {
        "name": recipe.name,
        "seed": recipe.seed,
        "fingerprint": ctx.fingerprint("evaluate"),
        "latency_batch": ev.latency_batch,
        "eval_split": split.name,
        "eval_samples": len(split),
        "classes": data.classes,
    }
    preds: dict[str, Prediction] = {}
    for role, model in models.items():
        preds[role] = predict(model.to(ctx.device), loader, ctx.device)
        summary[role] = _model_facts(model, preds[role].top1, ctx.steps[roles[role]].cfg.model)
    calib = None
    if ctx.calib_split is not None:
        calib_loader = eval_loader(ctx.calib_split, recipe.data)
        calib = {role: predict(model.to(ctx.device), calib_loader, ctx.device) for role, model in models.items()}
    judged = compare_models(
        preds, plan, calib, ctx.calib_split.name if calib else "", seed=recipe.seed, classes=data.classes
    )
    for role, facts in judged.pop("models").items():
        summary[role].update(facts)
    summary.update(judged)
    summary["top1_retention"] = (
        summary["student"]["top1"] / summary["teacher"]["top1"] if summary["teacher"]["top1"] else 0.0
    )
    summary["top1_kd_gain"] = summary["student"]["top1"] - summary["baseline"]["top1"]
    summary["chain"] = [{"role": key, "model": ctx.steps[key].cfg.model} for key in ctx.chain_keys()]
    summary["student"]["step"] = student_key
    if ctx.generation_keys():
        summary["student"]["generation"] = 0 if student_key == "distill" else int(student_key.split("-")[1])
        summary["generations"] = _generations(ctx, student_key, preds["student"], loader)
    summary["unlabeled_images"] = (ctx.done_record("distill") or {}).get("unlabeled_images", 0)
    if recipe.data.source == "datafree":
        summary["data_free"] = _data_free(ctx)
    summary["schedule"] = {
        role: {k: (ctx.done_record(key) or {}).get(k) for k in ("epochs", "train_images")}
        for role, key in (("student", student_key), ("baseline", "baseline"))
    }
    _host_latency(ctx, models, summary)
    summary["device_estimate"] = recipe_estimate(recipe, len(data.classes))
    summary["device_check"] = device_check(summary["device_estimate"], recipe, len(data.classes))
    _speed_and_cost(ctx, summary)
    summary["verdict"], helped = verdict(summary, ev.min_kd_gain)
    summary["kd_gain_flag"] = not helped
    summary["advice"] = advice(summary, recipe.student.epochs)
    return _write_summary(ctx, summary)


def _generations(ctx: RunContext, student_key: str, kept: Prediction, loader: Any) -> list[dict[str, Any]]:
    """Each born-again generation on the evaluation split (the first student is generation 0), and which was
    kept."""
    rows = []
    for g, key in enumerate(["distill"] + ctx.generation_keys()):
        pred = (
            kept
            if key == student_key
            else predict(ctx.trained_model(key, "evaluate").to(ctx.device), loader, ctx.device)
        )
        report = classification_report(pred, ctx.data.classes, ctx.evaluation)
        rows.append(
            {
                "generation": g,
                "top1": report["top1"],
                "score": report["score"],
                "kept": key == student_key,
                "val_score": ctx.done_record(key)["score"],
            }
        )
    return rows


def _data_free(ctx: RunContext) -> dict[str, Any]:
    """The synthetic set a data-free run trained on, and the data-driven run it is compared with."""
    recipe = ctx.recipe
    facts = json.loads((ctx.stage_dir("datafree") / "synthesis.json").read_text())
    out = {
        "synthetic_images": facts["images"],
        "teacher_confidence": facts["teacher_confidence"],
        "bn_loss": [facts["bn_loss_first"], facts["bn_loss_last"]],
        "real_evaluation": recipe.data.root is not None,
    }
    if recipe.datafree.compare_run:
        from edgedistill.judge.evaluate import load_summary

        other = load_summary(recipe.datafree.compare_run)
        out["data_driven"] = {
            "run": recipe.datafree.compare_run,
            "student_top1": other["student"]["top1"],
            "baseline_top1": other["baseline"]["top1"],
        }
    return out


def _host_latency(ctx: RunContext, models: dict[str, nn.Module], summary: dict[str, Any]) -> None:
    """Teacher and student latency on this host: ONNX Runtime CPU (the runtime that serves the bundle) first,
    PyTorch eager as a second column."""
    ev = ctx.recipe.evaluate
    threads_before = torch.get_num_threads()
    threads = ev.threads or threads_before
    size = ctx.recipe.data.image_size
    batches = tuple(dict.fromkeys((1, ev.latency_batch)))
    # the runtime that serves the bundle (ONNX Runtime, CPU) first; PyTorch eager as a second column
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        for role in ("teacher", "student"):
            ort_lat = measure_ort_latency(
                models[role].cpu(), size, batches, ev.latency_repeats, ev.latency_warmup, threads, tmp
            )
            for batch in batches:
                summary[role][f"latency_ms_b{batch}"] = ort_lat[batch]["median_s"] * 1e3
                summary[role][f"throughput_b{batch}"] = batch / ort_lat[batch]["median_s"]
    torch.set_num_threads(threads)
    try:
        for role in ("teacher", "student"):
            for batch in batches:
                lat = measure_latency(
                    models[role], (batch, 3, size, size), ev.latency_repeats, ev.latency_warmup, ctx.device
                )
                summary[role][f"torch_latency_ms_b{batch}"] = lat["median_s"] * 1e3
    finally:
        torch.set_num_threads(threads_before)
    import onnxruntime

    summary["host"] = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "runtime": f"ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)",
        "torch": torch.__version__,
        "torch_device": str(ctx.device),
        "note": f"median of {ev.latency_repeats} runs after {ev.latency_warmup} warm-up, same "
        "process; PyTorch eager figures are the second column; device figures come from "
        "edgerun bench",
    }


def _speed_and_cost(ctx: RunContext, summary: dict[str, Any]) -> None:
    ev = ctx.recipe.evaluate
    t, s = summary["teacher"], summary["student"]
    summary["param_reduction"] = t["params"] / s["params"]
    summary["size_reduction"] = t["size_mb"] / s["size_mb"]
    summary["speedup"] = t["latency_ms_b1"] / s["latency_ms_b1"]
    summary[f"speedup_b{ev.latency_batch}"] = (
        t[f"latency_ms_b{ev.latency_batch}"] / s[f"latency_ms_b{ev.latency_batch}"]
    )
    summary["speedup_torch"] = t["torch_latency_ms_b1"] / s["torch_latency_ms_b1"]
    summary["cost"] = cost_comparison(t["latency_ms_b1"] / 1e3, s["latency_ms_b1"] / 1e3, ev.cost)


def _write_summary(ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any]:
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(ctx.run_dir / "summary.md", summary_markdown(summary))
    ctx.mark_done("evaluate", ["summary.json", "summary.md"])
    return summary


def stage_evaluate_regression(ctx: RunContext) -> dict[str, Any]:
    """task: regression: MAE, RMSE and R² of teacher, student and baseline in target units; retention = student R²
    / teacher R²; KD gain = baseline MAE - student MAE (positive: the student is closer); a bootstrap interval of
    the gain over images."""
    recipe, data = ctx.recipe, ctx.data
    split, loader, student_key, roles, models = _evaluated_models(ctx)
    summary: dict[str, Any] = {
        "name": recipe.name,
        "seed": recipe.seed,
        "task": "regression",
        "fingerprint": ctx.fingerprint("evaluate"),
        "latency_batch": recipe.evaluate.latency_batch,
        "eval_split": split.name,
        "eval_samples": len(split),
        "classes": data.classes,
        "targets": data.scaling.as_dict(),
    }
    errors = {}
    for role, model in models.items():
        pred = predict(model.to(ctx.device), loader, ctx.device)
        report = regression_report(pred, data.scaling)
        errors[role] = np.abs(data.scaling.restore(pred.logits) - data.scaling.restore(pred.labels)).mean(1)
        summary[role] = {
            **_model_facts(model, report["r2"], ctx.steps[roles[role]].cfg.model),
            **{k: report[k] for k in ("mae", "rmse", "r2", "per_target")},
        }
        summary[role].pop("top1")
    summary["chain"] = [{"role": key, "model": ctx.steps[key].cfg.model} for key in ctx.chain_keys()]
    summary["student"]["step"] = student_key
    summary["schedule"] = {
        role: {k: (ctx.done_record(key) or {}).get(k) for k in ("epochs", "train_images")}
        for role, key in (("student", student_key), ("baseline", "baseline"))
    }
    _host_latency(ctx, models, summary)
    summary["device_estimate"] = recipe_estimate(recipe, len(data.classes))
    t, s, b = summary["teacher"], summary["student"], summary["baseline"]
    summary["retention"] = s["r2"] / t["r2"] if t["r2"] > 0 else 0.0
    summary["kd_gain"] = b["mae"] - s["mae"]  # target units: positive = the student's error is smaller
    rng = np.random.default_rng(recipe.seed)
    gains = [
        float((errors["baseline"][idx] - errors["student"][idx]).mean())
        for idx in (rng.integers(0, len(split), len(split)) for _ in range(1000))
    ]
    summary["intervals"] = {"kd_gain": [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]}
    _speed_and_cost(ctx, summary)
    helped = summary["kd_gain"] > 0 and summary["intervals"]["kd_gain"][0] > 0
    summary["kd_gain_flag"] = not helped
    summary["verdict"] = (
        f"student R² {s['r2']:.3f} = {summary['retention'] * 100:.1f}% of the teacher's ({t['r2']:.3f}); MAE "
        f"{s['mae']:.4g} vs {b['mae']:.4g} for the baseline: "
        + (
            "distillation helped (the 95% interval of the MAE gain is above 0)"
            if helped
            else "distillation did not clearly help (the 95% interval of the MAE gain includes 0 or is below it)"
        )
        + f"; {summary['speedup']:.1f}x faster on this host"
    )
    summary["advice"] = []
    return _write_summary(ctx, summary)
