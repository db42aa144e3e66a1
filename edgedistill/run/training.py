"""The training stages: one step per model (train or resume or skip, validate, mark done), the teacher's floor,
teacher assistants, the student, born-again generations, the baseline on a matched schedule, and the data-free
synthesis.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

import torch
from torch import nn

from edgedistill.data.loaders import eval_loader
from edgedistill.data.splits import Split, with_unlabeled
from edgedistill.errors import TeacherTooWeakError
from edgedistill.files import atomic_write_text
from edgedistill.judge.evaluate import classification_report, regression_markdown, regression_report, report_markdown
from edgedistill.models.checkpoint import save_model
from edgedistill.models.factory import count_params, create_model
from edgedistill.models.predict import predict
from edgedistill.recipe.schema import Recipe
from edgedistill.run.context import RunContext
from edgedistill.run.folder import MODEL_FILE, Step
from edgedistill.train import distributed
from edgedistill.train.features import FeatureMatcher, mapping_lines, resolve_pairs
from edgedistill.train.job import Teaching, TrainJob, balance_for
from edgedistill.train.loop import train_model

log = logging.getLogger(__name__)


FEATURE_MAP_FILE = "feature_map.json"

COMPRESSION_WARNING = 50  # teacher/student parameter ratio above which quality rarely survives

TITLES = {
    "teacher": "Teacher",
    "assistant": "Teacher assistant",
    "student": "Distilled student",
    "baseline": "Baseline student (no KD)",
}


def baseline_epochs(recipe: Recipe, labelled: int, unlabeled: int) -> int:
    """The baseline's epochs: the student's, a number, or (match_steps) enough passes over its labelled images
    to take as many optimizer steps as the student takes over labelled + unlabeled images."""
    choice = recipe.baseline.epochs
    if choice == "student":
        return recipe.student.epochs
    if choice == "match_steps":
        batch = recipe.data.batch_size
        student_steps = recipe.student.epochs * math.ceil((labelled + unlabeled) / batch)
        return max(1, math.ceil(student_steps / math.ceil(labelled / batch)))
    return int(choice)


def _validate_and_report(ctx: RunContext, key: str, model: nn.Module, title: str) -> dict[str, Any]:
    """The step's validation report; ``report["score"]`` decides between steps (top-1, or R^2 for regression)."""
    data = ctx.data
    pred = predict(model.to(ctx.device), eval_loader(data.val, ctx.recipe.data), ctx.device)
    folder = ctx.stage_dir(key)
    if ctx.recipe.task == "regression":
        report = regression_report(pred, data.scaling)
        report["skipped_images"] = {"train": data.train.skipped, "val": data.val.skipped}
        atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
        atomic_write_text(folder / "report.md", regression_markdown(title, report))
        return report
    report = classification_report(pred, data.classes, ctx.evaluation)
    report["skipped_images"] = {"train": data.train.skipped, "val": data.val.skipped}
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    atomic_write_text(folder / "report.md", report_markdown(title, report, data.classes))
    return report


def _teaching(ctx: RunContext, step: Step, model: nn.Module, train: Split) -> Teaching:
    """The frozen teacher of a distillation step, and its feature matcher when the recipe asks for one."""
    teacher = ctx.trained_model(step.teacher, step.key)
    ratio = count_params(teacher) / max(count_params(model), 1)
    if ratio > COMPRESSION_WARNING:
        log.warning(
            "%s: the %s (%s) has %.0fx fewer parameters than the model it learns from (%s): compression this "
            "aggressive rarely keeps quality; consider a larger student or distill.chain with an assistant",
            step.key,
            step.role,
            step.cfg.model,
            ratio,
            ctx.steps[step.teacher].cfg.model,
        )
    distill = ctx.recipe.distill
    features = None
    if distill.features != "none":
        pairs = resolve_pairs(distill.features, model, teacher, ctx.recipe.data.image_size)
        features = FeatureMatcher(pairs, distill.feature_loss)
        description = {
            "student_model": step.cfg.model,
            "teacher_model": ctx.steps[step.teacher].cfg.model,
            "mode": distill.features if isinstance(distill.features, str) else "explicit",
            "image_size": ctx.recipe.data.image_size,
            **features.describe(),
        }
        if distributed.world().is_main:
            atomic_write_text(ctx.stage_dir(step.key) / FEATURE_MAP_FILE, json.dumps(description, indent=2))
        log.info(
            "%s: feature matching (%s), %d pair(s):\n  %s",
            step.key,
            distill.feature_loss,
            len(pairs),
            "\n  ".join(mapping_lines(description)),
        )
    if distill.temperature == 1.0:
        log.warning(
            "distill.temperature is 1: the soft labels are the teacher's plain probabilities, close to "
            "hard labels for a confident teacher; 2-5 is usual"
        )
    if distill.soft_labels == "cached":
        from edgedistill.train.softlabels import SoftLabelJob, cached_soft_labels
        from edgerun.bundle.manifest import sha256_file

        cache = cached_soft_labels(
            SoftLabelJob(
                teacher=teacher,
                teacher_sha256=sha256_file(str(ctx.stage_dir(step.teacher) / MODEL_FILE)),
                split=train,
                data_cfg=ctx.step_data(step),
                seed=ctx.recipe.seed + step.seed_offset,
                draws=distill.cache_draws,
                topk=distill.cache_topk,
                folder=ctx.run_dir / "soft_labels",
                device=ctx.device,
            )
        )
        return Teaching(teacher=None, distill=distill, soft_labels=cache)
    return Teaching(teacher=teacher, distill=distill, features=features)


def _baseline_schedule(ctx: RunContext, cfg, train: Split):
    """The baseline's settings: ``baseline.epochs`` over its labelled images, validated as often, in optimizer
    steps, as the student."""
    unlabeled = len(ctx.unlabeled) if ctx.recipe.baseline.epochs == "match_steps" and ctx.unlabeled else 0
    epochs = baseline_epochs(ctx.recipe, len(train), unlabeled)
    if epochs != cfg.epochs:
        log.info(
            "baseline: %d epochs over its %d labelled images (baseline.epochs: %s; the student: %d epochs "
            "over %d images)",
            epochs,
            len(train),
            ctx.recipe.baseline.epochs,
            cfg.epochs,
            len(train) + unlabeled,
        )
    every = max(cfg.val_every, round(cfg.val_every * epochs / max(cfg.epochs, 1)))
    return cfg.model_copy(update={"epochs": epochs, "val_every": every})


def _train(ctx: RunContext, step: Step, model: nn.Module, train: Split, cfg) -> None:
    """One step's ``train_model``: its teacher (for distillation), data settings and class balance."""
    teaching = _teaching(ctx, step, model, train) if step.teacher is not None else None
    data_cfg = ctx.step_data(step)
    balance = None
    if ctx.recipe.task != "regression":
        balance = balance_for(
            cfg,
            train,
            data_cfg,
            ctx.recipe.distill if step.teacher is not None else None,
            original_sampler=ctx.recipe.data.sampler,
        )
    train_model(
        TrainJob(
            model=model,
            train=train,
            val=ctx.data.val,
            data=data_cfg,
            cfg=cfg,
            folder=ctx.stage_dir(step.key),
            seed=ctx.recipe.seed + step.seed_offset,
            fingerprint=ctx.fingerprint(step.key),
            device=ctx.device,
            label=step.key,
            teaching=teaching,
            hardware=ctx.recipe.train,
            task=ctx.recipe.task,
            balance=balance,
            on_epoch=ctx.epoch_hook(step.key),
        )
    )


def _record(ctx: RunContext, step: Step, model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: save the trained model, validate it, mark the step done with its scores, and say so."""
    key, folder = step.key, ctx.stage_dir(step.key)
    save_model(folder / MODEL_FILE, model, {"model": step.cfg.model, "classes": ctx.data.classes, "stage": key})
    report = _validate_and_report(ctx, key, model, f"{TITLES[step.role]} ({key}): {step.cfg.model}")
    outputs = [MODEL_FILE, "report.json", "report.md"]
    if (folder / FEATURE_MAP_FILE).exists():
        outputs.append(FEATURE_MAP_FILE)
    regression = ctx.recipe.task == "regression"
    scores = (
        {"r2": report["r2"], "mae": report["mae"]}
        if regression
        else {"top1": report["top1"], "metric": report.get("metric", "top1")}
    )
    ctx.mark_done(
        key, outputs, {**scores, "score": report["score"], "model": step.cfg.model, "teacher": step.teacher, **extra}
    )
    if regression:
        log.info(
            "%s: %s MAE %.4g, R² %.4f on %d validation images",
            key,
            step.cfg.model,
            report["mae"],
            report["r2"],
            report["samples"],
        )
    else:
        plan = ctx.evaluation
        also = f", {plan.metric_title} {report['score'] * 100:.2f}%" if plan and plan.metric != "top1" else ""
        log.info(
            "%s: %s top-1 %.2f%%%s on %d validation images",
            key,
            step.cfg.model,
            report["top1"] * 100,
            also,
            report["samples"],
        )
    return report


def train_step(ctx: RunContext, key: str) -> dict[str, Any]:
    """Train (or resume, or skip when done) one step and validate it."""
    step = ctx.steps[key]
    if ctx.is_done(key):
        log.info("%s: outputs in '%s' match this recipe; skipped", key, ctx.stage_dir(key))
        return json.loads((ctx.stage_dir(key) / "report.json").read_text())
    model = ctx.new_model(key)
    folder = ctx.stage_dir(key)
    folder.mkdir(parents=True, exist_ok=True)
    if distributed.world().is_main:
        (folder / FEATURE_MAP_FILE).unlink(missing_ok=True)  # written again below when this recipe matches features
    train, extra, cfg = ctx.data.train, {}, step.cfg
    if step.teacher is not None and ctx.unlabeled is not None:
        train = with_unlabeled(train, ctx.unlabeled)
        extra["unlabeled_images"] = len(ctx.unlabeled)
    if key == "baseline":
        cfg = _baseline_schedule(ctx, cfg, train)
    extra.update({"epochs": cfg.epochs, "train_images": len(train)})
    if cfg.epochs:
        try:
            _train(ctx, step, model, train, cfg)
        except BaseException:
            ctx.tracker.end_stage(key, ok=False)
            raise
    elif not step.cfg.pretrained_path and not step.cfg.pretrained:
        log.warning("%s: %s.epochs is 0 and no weights are given: the model stays untrained", key, step.role)
    if not distributed.world().is_main:  # rank 0 saves, validates and marks the step done
        distributed.barrier()
        return json.loads((folder / "report.json").read_text())
    report = _record(ctx, step, model, extra)
    ctx.tracker.end_stage(key, ok=True)
    distributed.barrier()
    return report


def stage_datafree(ctx: RunContext) -> Optional[dict[str, Any]]:
    """``data.source: datafree``: synthesize the training set from the teacher's weights alone (DeepInversion,
    ``edgedistill.train.datafree``); resumes by batch."""
    recipe = ctx.recipe
    if recipe.data.source != "datafree":
        return None
    from edgedistill.train.datafree import SynthesisJob, synthesize
    from edgedistill.train.loop import progress_bar
    from edgerun.bundle.manifest import sha256_file

    classes = ctx.datafree_classes()
    torch.manual_seed(recipe.seed)
    teacher = create_model(recipe.teacher, num_classes=len(classes))  # the given weights (teacher.pretrained_path)
    student = None
    if recipe.datafree.competition > 0:
        student = (
            ctx.trained_model("distill", "datafree")
            if ctx.is_done("distill")
            else create_model(recipe.student, num_classes=len(classes))
        )
    weights = recipe.teacher.pretrained_path
    cfg = recipe.datafree
    log.info(
        "datafree: synthesizing %d images per class x %d classes from %s (DeepInversion, %d steps per batch of %d)",
        cfg.images_per_class,
        len(classes),
        recipe.teacher.model,
        cfg.steps,
        cfg.batch_size,
    )
    with progress_bar() as progress:
        task = progress.add_task("datafree", total=1, stats="")
        synthetic = synthesize(
            SynthesisJob(
                teacher=teacher,
                teacher_sha256=sha256_file(str(weights)) if weights else recipe.teacher.model,
                classes=classes,
                data_cfg=recipe.data,
                cfg=cfg,
                folder=ctx.stage_dir("datafree"),
                seed=recipe.seed,
                device=ctx.device,
                teacher_name=recipe.teacher.model,
                student=student,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        )
    ctx.mark_done("datafree", ["soft_labels.npz", "synthesis.json"], {"images": len(synthetic.files)})
    ctx._data = None  # the stages after this one train on the synthetic set
    facts = json.loads((ctx.stage_dir("datafree") / "synthesis.json").read_text())
    log.info(
        "datafree: %d images in %s (BN-statistics loss %.3f -> %.3f, teacher confidence %.2f)",
        facts["images"],
        ctx.stage_dir("datafree") / "images",
        facts["bn_loss_first"],
        facts["bn_loss_last"],
        facts["teacher_confidence"],
    )
    return facts


def stage_teacher(ctx: RunContext) -> dict[str, Any]:
    report = train_step(ctx, "teacher")
    floor = ctx.recipe.teacher.min_top1
    if ctx.recipe.task == "classification" and report["top1"] < floor:
        log.warning(
            "teacher top-1 %.2f%% is under teacher.min_top1 = %.2f%%: distill will refuse it unless --force",
            report["top1"] * 100,
            floor * 100,
        )
    return report


def check_teacher_floor(ctx: RunContext, needed_by: str) -> float:
    ctx.require("teacher", needed_by)
    report = json.loads((ctx.stage_dir("teacher") / "report.json").read_text())
    if ctx.recipe.task == "regression":  # teacher.min_top1 is a classification floor
        return report["score"]
    floor = ctx.recipe.teacher.min_top1
    if report["top1"] < floor:
        message = (
            f"teacher top-1 is {report['top1'] * 100:.2f}%, under teacher.min_top1 = {floor * 100:.2f}%: "
            f"a student inherits its teacher's mistakes. Train the teacher longer (teacher.epochs), give "
            f"it better weights (teacher.pretrained_path), lower teacher.min_top1, or pass --force"
        )
        if not ctx.force:
            raise TeacherTooWeakError(message)
        log.warning("--force: %s", message)
    return report["top1"]


def stage_assistant(ctx: RunContext) -> Optional[list[dict[str, Any]]]:
    """Progressive distillation through teacher assistants (Mirzadeh et al., "Improved Knowledge Distillation
    via Teacher Assistant", AAAI 2020, arXiv:1902.03393): teacher -> chain[0] -> ... -> student, each step
    distilled from the one before, evaluated and kept in the run (assistant/, assistant-2/, ...)."""
    keys = ctx.chain_keys()
    if not keys:
        return None
    check_teacher_floor(ctx, "assistant")
    reports = []
    for key in keys:
        step = ctx.steps[key]
        log.info("%s: %s learns from %s (%s)", key, step.cfg.model, step.teacher, ctx.steps[step.teacher].cfg.model)
        reports.append(train_step(ctx, key))
    return reports


def stage_distill(ctx: RunContext) -> dict[str, Any]:
    check_teacher_floor(ctx, "distill")
    source = ctx.steps["distill"].teacher
    if source != "teacher":
        log.info(
            "distill: the student learns from the last teacher assistant (%s, %s)", source, ctx.steps[source].cfg.model
        )
    return train_step(ctx, "distill")


def stage_self_distill(ctx: RunContext) -> Optional[list[dict[str, Any]]]:
    """Born-again networks (Furlanello et al., "Born-Again Neural Networks", ICML 2018, arXiv:1805.04770): the
    trained student teaches a fresh copy of itself, generation after generation; each is compared with the
    one before, and the best on the validation split is kept as the student."""
    keys = ctx.generation_keys()
    if not keys:
        return None
    reports = []
    previous = json.loads((ctx.stage_dir("distill") / "report.json").read_text()) if ctx.is_done("distill") else None
    for key in keys:
        report = train_step(ctx, key)
        if previous is not None:
            what, scale = ("R²", 1) if ctx.recipe.task == "regression" else ("top-1", 100)
            log.info(
                "%s: %s %.2f vs %.2f for the generation before (%+.2f)",
                key,
                what,
                report["score"] * scale,
                previous["score"] * scale,
                (report["score"] - previous["score"]) * scale,
            )
        previous = report
        reports.append(report)
    log.info("self-distill: the student kept is %s", ctx.best_student())
    return reports


def stage_baseline(ctx: RunContext) -> dict[str, Any]:
    return train_step(ctx, "baseline")
