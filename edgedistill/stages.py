"""The stages of a run: teacher -> distill -> baseline -> evaluate (-> export).

Each stage writes into its own folder of the run, next to the resolved recipe, and finishes by writing
``done.json`` with the fingerprint of the recipe sections it depends on. A stage whose ``done.json``
matches the current recipe is skipped; one that was killed resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .checkpoint import atomic_write_text, load_model, save_model
from .data import DataBundle, eval_loader, load_data
from .errors import StageMissingError, TeacherTooWeakError
from .evaluate import (classification_report, cost_comparison, measure_latency, predict, report_markdown)
from .models import count_params, create_model, weight_bytes
from .recipe import ModelConfig, Recipe
from .train import resolve_device, train_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
# What each stage's output depends on (top-level recipe sections).
DEPENDS_ON = {
    "teacher": ("seed", "data", "teacher"),
    "assistant": ("seed", "data", "teacher", "assistant", "distill"),
    "distill": ("seed", "data", "teacher", "assistant", "student", "distill"),
    "baseline": ("seed", "data", "student"),
    "evaluate": ("seed", "data", "teacher", "assistant", "student", "distill", "evaluate"),
    "export": ("seed", "data", "teacher", "assistant", "student", "distill", "export"),
}
STAGE_DIRS = {"teacher": "teacher", "assistant": "assistant", "distill": "student", "baseline": "baseline",
              "evaluate": ".", "export": "bundle"}
# which recipe section describes the model each training stage produces
STAGE_MODEL = {"teacher": "teacher", "assistant": "assistant", "distill": "student", "baseline": "student"}


class RunContext:
    """One run folder and what its stages share (data, device, the --force flag)."""

    def __init__(self, recipe: Recipe, force: bool = False):
        self.recipe = recipe
        self.force = force
        self.run_dir = recipe.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(recipe.device)
        self._data: Optional[DataBundle] = None
        atomic_write_text(self.run_dir / "recipe.yaml", recipe.to_yaml())

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            self._data = load_data(self.recipe.data, self.recipe.seed)
        return self._data

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / STAGE_DIRS[stage]

    def fingerprint(self, stage: str) -> str:
        return self.recipe.fingerprint(*DEPENDS_ON[stage])

    def done_path(self, stage: str) -> Path:
        if stage in ("evaluate", "export"):  # outputs that are not a folder of their own
            return self.run_dir / f"{stage}.done.json"
        return self.stage_dir(stage) / "done.json"

    def is_done(self, stage: str) -> bool:
        path = self.done_path(stage)
        if not path.exists():
            return False
        try:
            done = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        return done.get("fingerprint") == self.fingerprint(stage) and all(
            (self.stage_dir(stage) / name).exists() for name in done.get("outputs", []))

    def mark_done(self, stage: str, outputs: list[str], extra: Optional[dict[str, Any]] = None) -> None:
        folder = self.stage_dir(stage)
        if stage != "export":  # a bundle carries its recipe inside, covered by the manifest's sha256 list
            atomic_write_text(folder / "recipe.yaml", self.recipe.to_yaml())
        atomic_write_text(self.done_path(stage), json.dumps(
            {"stage": stage, "fingerprint": self.fingerprint(stage), "outputs": outputs, **(extra or {})}, indent=2))

    def require(self, stage: str, what: str) -> Path:
        path = self.stage_dir(stage) / MODEL_FILE
        if not self.is_done(stage) or not path.exists():
            raise StageMissingError(f"{what} needs the '{stage}' stage of this recipe, which has not finished in "
                                    f"'{self.run_dir}': run `edgedistill {stage} RECIPE` (or `edgedistill run`) first")
        return path

    # models ------------------------------------------------------------------------------------------------
    def model_cfg(self, stage: str) -> ModelConfig:
        return getattr(self.recipe, STAGE_MODEL[stage])

    def new_model(self, stage: str) -> nn.Module:
        torch.manual_seed(self.recipe.seed)  # the student and its baseline start from the same weights
        return create_model(self.model_cfg(stage), num_classes=len(self.data.classes))

    def trained_model(self, stage: str, needed_by: str = "this stage") -> nn.Module:
        """The model a finished stage saved (its initial weights are not fetched again)."""
        path = self.require(stage, needed_by)
        cfg = self.model_cfg(stage)
        model = create_model(cfg.model_copy(update={"pretrained": False, "pretrained_path": None}),
                             num_classes=len(self.data.classes))
        load_model(path, model)
        return model.eval()


def _validate_and_report(ctx: RunContext, stage: str, model: nn.Module, title: str) -> dict[str, Any]:
    data = ctx.data
    pred = predict(model.to(ctx.device), eval_loader(data.val, ctx.recipe.data), ctx.device)
    report = classification_report(pred, data.classes)
    report["skipped_images"] = {"train": data.train.skipped, "val": data.val.skipped}
    folder = ctx.stage_dir(stage)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    atomic_write_text(folder / "report.md", report_markdown(title, report, data.classes))
    return report


def _train_stage(ctx: RunContext, stage: str, teacher: Optional[nn.Module]) -> dict[str, Any]:
    recipe = ctx.recipe
    role = STAGE_MODEL[stage]
    cfg = ctx.model_cfg(stage)
    model = ctx.new_model(stage)
    folder = ctx.stage_dir(stage)
    if cfg.epochs:
        train_model(model, ctx.data.train, ctx.data.val, recipe.data, cfg, folder, recipe.seed,
                    ctx.fingerprint(stage), ctx.device, label=stage, teacher=teacher,
                    distill=recipe.distill if teacher is not None else None)
    elif not cfg.pretrained_path and not cfg.pretrained:
        log.warning("%s: %s.epochs is 0 and no weights are given: the model stays untrained", stage, role)
    save_model(folder / MODEL_FILE, model, {"model": cfg.model, "classes": ctx.data.classes, "stage": stage})
    titles = {"teacher": "Teacher", "assistant": "Teacher assistant", "distill": "Distilled student",
              "baseline": "Baseline student (no KD)"}
    report = _validate_and_report(ctx, stage, model, f"{titles[stage]}: {cfg.model}")
    ctx.mark_done(stage, [MODEL_FILE, "report.json", "report.md"], {"top1": report["top1"]})
    log.info("%s: %s top-1 %.2f%% on %d validation images", stage, cfg.model, report["top1"] * 100, report["samples"])
    return report


def stage_teacher(ctx: RunContext) -> dict[str, Any]:
    report = _train_stage(ctx, "teacher", teacher=None)
    floor = ctx.recipe.teacher.min_top1
    if report["top1"] < floor:
        log.warning("teacher top-1 %.2f%% is under teacher.min_top1 = %.2f%%: distill will refuse it unless --force",
                    report["top1"] * 100, floor * 100)
    return report


def check_teacher_floor(ctx: RunContext, needed_by: str) -> float:
    ctx.require("teacher", needed_by)
    report = json.loads((ctx.stage_dir("teacher") / "report.json").read_text())
    floor = ctx.recipe.teacher.min_top1
    if report["top1"] < floor:
        message = (f"teacher top-1 is {report['top1'] * 100:.2f}%, under teacher.min_top1 = {floor * 100:.2f}%: "
                   f"a student inherits its teacher's mistakes. Train the teacher longer (teacher.epochs), give "
                   f"it better weights (teacher.pretrained_path), lower teacher.min_top1, or pass --force")
        if not ctx.force:
            raise TeacherTooWeakError(message)
        log.warning("--force: %s", message)
    return report["top1"]


def stage_assistant(ctx: RunContext) -> Optional[dict[str, Any]]:
    """Teacher-assistant distillation (Mirzadeh et al., "Improved Knowledge Distillation via Teacher
    Assistant", AAAI 2020, arXiv:1902.03393): an intermediate-size model bridges a large capacity gap."""
    if ctx.recipe.assistant is None:
        return None
    check_teacher_floor(ctx, "assistant")
    return _train_stage(ctx, "assistant", teacher=ctx.trained_model("teacher", "assistant"))


def stage_distill(ctx: RunContext) -> dict[str, Any]:
    check_teacher_floor(ctx, "distill")
    source = "assistant" if ctx.recipe.assistant is not None else "teacher"
    if source == "assistant":
        log.info("distill: the student learns from the teacher assistant (%s)", ctx.recipe.assistant.model)
    return _train_stage(ctx, "distill", teacher=ctx.trained_model(source, "distill"))


def stage_baseline(ctx: RunContext) -> dict[str, Any]:
    return _train_stage(ctx, "baseline", teacher=None)


def _model_facts(model: nn.Module, top1: float, name: str) -> dict[str, Any]:
    return {"model": name, "top1": top1, "params": count_params(model), "size_mb": weight_bytes(model) / 1e6}


def stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    recipe, data = ctx.recipe, ctx.data
    ev = recipe.evaluate
    split = data.test if data.test is not None else data.val
    loader = eval_loader(split, recipe.data)
    roles = [("teacher", "teacher"), ("student", "distill"), ("baseline", "baseline")]
    if recipe.assistant is not None:
        roles.insert(1, ("assistant", "assistant"))
    models = {role: ctx.trained_model(stage, "evaluate") for role, stage in roles}
    names = {role: ctx.model_cfg(stage).model for role, stage in roles}
    summary: dict[str, Any] = {"name": recipe.name, "fingerprint": ctx.fingerprint("evaluate"),
                               "latency_batch": ev.latency_batch,
                               "eval_split": split.name, "eval_samples": len(split), "classes": data.classes}
    for role, model in models.items():
        pred = predict(model.to(ctx.device), loader, ctx.device)
        summary[role] = _model_facts(model, pred.top1, names[role])
    threads_before = torch.get_num_threads()
    if ev.threads:
        torch.set_num_threads(ev.threads)
    try:
        size = recipe.data.image_size
        for role in ("teacher", "student"):
            for batch in (1, ev.latency_batch):
                lat = measure_latency(models[role], (batch, 3, size, size), ev.latency_repeats, ev.latency_warmup,
                                      ctx.device)
                summary[role][f"latency_ms_b{batch}"] = lat["median_s"] * 1e3
                summary[role][f"throughput_b{batch}"] = batch / lat["median_s"]
    finally:
        torch.set_num_threads(threads_before)
    t, s, b = summary["teacher"], summary["student"], summary["baseline"]
    summary["retention"] = s["top1"] / t["top1"] if t["top1"] else 0.0
    summary["kd_gain"] = s["top1"] - b["top1"]
    summary["kd_gain_flag"] = summary["kd_gain"] < ev.min_kd_gain
    summary["param_reduction"] = t["params"] / s["params"]
    summary["size_reduction"] = t["size_mb"] / s["size_mb"]
    summary["speedup"] = t["latency_ms_b1"] / s["latency_ms_b1"]
    summary[f"speedup_b{ev.latency_batch}"] = t[f"latency_ms_b{ev.latency_batch}"] / s[f"latency_ms_b{ev.latency_batch}"]
    summary["cost"] = cost_comparison(t["latency_ms_b1"] / 1e3, s["latency_ms_b1"] / 1e3, ev.cost)
    summary["verdict"] = verdict(summary, ev.min_kd_gain)
    summary["host"] = {"device": str(ctx.device), "cpu": platform.processor() or platform.machine(),
                       "threads": ev.threads or threads_before, "torch": torch.__version__,
                       "note": "host latency of PyTorch eager; the device figures come from edgerun bench"}
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(ctx.run_dir / "summary.md", summary_markdown(summary))
    ctx.mark_done("evaluate", ["summary.json", "summary.md"])
    return summary


def verdict(summary: dict[str, Any], min_gain: float) -> str:
    gain = summary["kd_gain"] * 100
    if gain < 0:
        return (f"distillation hurt: the KD student is {-gain:.2f} points below its baseline trained without KD; "
                f"ship the baseline or revisit temperature/alpha/teacher")
    if summary["kd_gain_flag"]:
        return (f"distillation may not be worth it: KD gain is only {gain:.2f} points over the baseline "
                f"(threshold {min_gain * 100:.2f})")
    return f"distillation helped: +{gain:.2f} points over the baseline, retention {summary['retention'] * 100:.1f}%"


def summary_rows(summary: dict[str, Any], batch: int) -> list[tuple[str, ...]]:
    rows = [("model", "role", "top-1", "params", "size MB", "latency b1 ms", f"latency b{batch} ms")]
    for role in ("teacher", "assistant", "student", "baseline"):
        if role not in summary:
            continue
        m = summary[role]
        rows.append((m["model"], role if role != "student" else "student (KD)", f"{m['top1'] * 100:.2f}%",
                     f"{m['params'] / 1e6:.2f}M", f"{m['size_mb']:.2f}",
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
    facts = [f"retention (student / teacher top-1): {summary['retention'] * 100:.1f}%",
             f"KD gain (student − baseline): {summary['kd_gain'] * 100:+.2f} points",
             f"parameters: {summary['param_reduction']:.1f}x fewer; weights: {summary['size_reduction']:.1f}x smaller",
             f"host speedup (teacher / student latency): {summary['speedup']:.2f}x at batch 1, "
             f"{summary[f'speedup_b{batch}']:.2f}x at batch {batch} ({summary['host']['device']}, "
             f"{summary['host']['threads']} threads)"]
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


def stage_export(ctx: RunContext) -> dict[str, Any]:
    from .export import build_bundle

    recipe, data = ctx.recipe, ctx.data
    student = ctx.trained_model("distill", "export")
    teacher = ctx.trained_model("teacher", "export") if recipe.export.teacher else None
    summary_path = ctx.run_dir / "summary.json"
    host: dict[str, Any] = {}
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        host = {"teacher_top1": s["teacher"]["top1"], "student_top1": s["student"]["top1"],
                "baseline_top1": s["baseline"]["top1"], "retention": s["retention"], "kd_gain": s["kd_gain"],
                "eval_split": s["eval_split"], "eval_samples": s["eval_samples"]}
    else:
        log.warning("export: no summary.json yet (run evaluate first to carry host metrics into the manifest)")
    manifest = build_bundle(
        model=student, out_dir=ctx.stage_dir("export"), name=recipe.name, classes=data.classes, train=data.train,
        val=data.val, data_cfg=recipe.data, cfg=recipe.export, seed=recipe.seed,
        checkpoint=ctx.stage_dir("distill") / MODEL_FILE, recipe_yaml=recipe.to_yaml(), teacher=teacher,
        source={"student_model": recipe.student.model, "teacher_model": recipe.teacher.model,
                "recipe_fingerprint": ctx.fingerprint("export")},
        host_metrics=host)
    ctx.mark_done("export", ["manifest.json", "model.onnx"])
    par = manifest["metrics"]["parity"]
    log.info("export: bundle for %s in %s (parity max abs error %.1e, top-1 agreement %.2f%%); pack it with "
             "`edgedistill pack %s -o %s.edb`", recipe.export.target, ctx.stage_dir("export"),
             par["max_abs_error"], par["top1_agreement"] * 100, ctx.stage_dir("export"), recipe.name)
    return manifest


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], Any]] = {
    "teacher": stage_teacher,
    "assistant": stage_assistant,
    "distill": stage_distill,
    "baseline": stage_baseline,
    "evaluate": stage_evaluate,
    "export": stage_export,
}
PIPELINE = ["teacher", "assistant", "distill", "baseline", "evaluate", "export"]


def run_stage(ctx: RunContext, stage: str) -> Any:
    if stage == "assistant" and ctx.recipe.assistant is None:
        return None  # no teacher assistant in this recipe: the student learns from the teacher directly
    if ctx.is_done(stage):
        log.info("%s: outputs in '%s' match this recipe; skipped (delete done.json to redo)", stage,
                 ctx.stage_dir(stage))
        return None
    log.info("%s: starting", stage)
    return STAGE_FUNCTIONS[stage](ctx)
