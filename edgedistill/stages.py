"""The stages of a run: teacher -> (assistants) -> distill -> (self-distill) -> baseline -> evaluate (-> export).

A stage trains one or more *steps* (one model each: the teacher, each teacher assistant of the chain, the
student, each born-again generation, the baseline). Every step writes into its own folder of the run next
to the resolved recipe and finishes by writing ``done.json`` with the fingerprint of the recipe sections
it depends on. A step whose ``done.json`` matches the current recipe is skipped; one that was killed
resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import atomic_write_text, load_model, save_model
from .data import DataBundle, Split, load_data, load_datafree, load_unlabeled, training_side, with_unlabeled
from .loaders import eval_loader
from .errors import StageMissingError, TeacherTooWeakError
from .cost import cost_comparison
from .evaluate import (Prediction, classification_report, compare_models, measure_latency, measure_ort_latency,
                       predict, regression_markdown, regression_report, report_markdown)
from .features import FeatureMatcher, mapping_lines, resolve_pairs
from .models import count_params, create_model, weight_bytes, zero_head
from .planner import device_check, recipe_estimate
from .recipe import ModelConfig, Recipe
from .metrics import EvalPlan, OperatingPoint, plan_evaluation
from .summary import advice, summary_markdown, verdict
from .train import Teaching, TrainJob, balance_for, resolve_device, train_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
FEATURE_MAP_FILE = "feature_map.json"
UNLABELED_KEY = ("data.unlabeled",)  # the teacher and the baseline never see unlabeled images
TEACHER_SECTIONS = ("seed", "task", "data", "teacher", "train", "datafree")
ASSISTANT_SECTIONS = ("seed", "task", "data", "teacher", "assistant", "distill", "train", "datafree")
STUDENT_SECTIONS = ("seed", "task", "data", "teacher", "assistant", "student", "distill", "train", "datafree")
BASELINE_SECTIONS = ("seed", "task", "data", "student", "baseline", "train", "datafree")
# What the datafree, evaluate and export stages depend on (top-level recipe sections).
DEPENDS_ON = {
    "datafree": ("seed", "task", "data", "teacher", "datafree"),
    "evaluate": STUDENT_SECTIONS + ("self_distill", "evaluate"),
    "export": STUDENT_SECTIONS + ("self_distill", "evaluate", "export"),  # evaluate: the manifest's decision
}
COMPRESSION_WARNING = 50  # teacher/student parameter ratio above which quality rarely survives
TITLES = {"teacher": "Teacher", "assistant": "Teacher assistant", "student": "Distilled student",
          "baseline": "Baseline student (no KD)"}


@dataclass(frozen=True)
class Step:
    """One model a run trains: its folder, its recipe section, whom it learns from, what decides it."""

    key: str  # teacher, assistant, assistant-2, ..., distill, generation-1, ..., baseline
    folder: str
    role: str  # teacher | assistant | student | baseline
    cfg: ModelConfig
    teacher: Optional[str]  # key of the step it is distilled from; None: cross-entropy only
    sections: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    seed_offset: int = 0  # a born-again generation starts from fresh weights

    @property
    def uses_unlabeled(self) -> bool:
        return self.teacher is not None


def plan_steps(recipe: Recipe) -> dict[str, Step]:
    """Every step of a recipe, in training order."""
    steps = [Step("teacher", "teacher", "teacher", recipe.teacher, None, TEACHER_SECTIONS, UNLABELED_KEY)]
    source = "teacher"
    for i, cfg in enumerate(recipe.chain_configs()):
        key = "assistant" if i == 0 else f"assistant-{i + 1}"
        steps.append(Step(key, key, "assistant", cfg, source, ASSISTANT_SECTIONS))
        source = key
    steps.append(Step("distill", "student", "student", recipe.student, source, STUDENT_SECTIONS))
    for g in range(1, recipe.self_distill.generations + 1):
        previous = "distill" if g == 1 else f"generation-{g - 1}"
        steps.append(Step(f"generation-{g}", f"student-gen{g}", "student", recipe.student, previous,
                          STUDENT_SECTIONS, seed_offset=1000 * g))
    # with match_steps the baseline's schedule depends on how many unlabeled images the student sees
    baseline_exclude = () if recipe.baseline.epochs == "match_steps" else UNLABELED_KEY
    steps.append(Step("baseline", "baseline", "student", recipe.student, None, BASELINE_SECTIONS, baseline_exclude))
    return {step.key: step for step in steps}


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


class RunContext:
    """One run folder and what its stages share (data, device, the --force flag)."""

    def __init__(self, recipe: Recipe, force: bool = False):
        self.recipe = recipe
        self.force = force
        self.run_dir = recipe.run_dir
        if self.run_dir.exists() and not self.run_dir.is_dir():
            from .errors import RecipeError

            raise RecipeError(f"output '{self.run_dir}' is a file: the run needs a folder there; choose another "
                              "output (or name)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(recipe.device)
        self.steps = plan_steps(recipe)
        self._data: Optional[DataBundle] = None
        self._unlabeled: Optional[Split] = None
        self._classes: Optional[list[str]] = None  # data.source: datafree, before the synthetic set exists
        self._evaluation: Optional[EvalPlan] = None
        if distributed.world().is_main:
            atomic_write_text(self.run_dir / "recipe.yaml", recipe.to_yaml())

    def load_data_in_turn(self) -> None:
        """Under torchrun: rank 0 loads (and caches) the data first, then the others read its caches."""
        world = distributed.world()
        if self.recipe.data.source == "datafree" and not self.is_done("datafree"):
            return  # the synthetic set is made by rank 0 first
        for turn in (True, False):
            if world.is_main == turn:
                _ = (self.data, self.unlabeled)  # loaded (and cached) here
            distributed.barrier()

    def derive(self, recipe: Recipe) -> "RunContext":
        """A variant of this recipe in the same run folder (a sweep cell): it shares the loaded data, and the
        run's recipe.yaml stays this recipe's."""
        self.data  # load once, share
        other = RunContext.__new__(RunContext)
        other.__dict__.update(self.__dict__)
        other.recipe = recipe
        other.steps = plan_steps(recipe)
        return other

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            if self.recipe.data.source == "datafree":
                self._data = self._synthetic_data()
            else:
                self._data = load_data(self.recipe.data, self.recipe.seed, self.recipe.task)
        return self._data

    def _synthetic_data(self) -> DataBundle:
        from .datafree import SyntheticSet

        folder = self.stage_dir("datafree")
        if not self.is_done("datafree"):
            raise StageMissingError(f"data.source: datafree: the synthetic training set of this recipe is not in "
                                    f"'{folder}' yet: run `edgedistill datafree RECIPE` (or `edgedistill run`) first")
        synthetic = SyntheticSet.load(folder)
        return load_datafree(self.recipe.data, self.recipe.seed, folder, synthetic.files, synthetic.labels,
                             self.datafree_classes())

    def datafree_classes(self) -> list[str]:
        """The classes a data-free run synthesizes: the real validation folder's, else datafree.classes, else
        the teacher checkpoint's."""
        from .checkpoint import read_metadata
        from .data import folder_classes

        if self._classes is not None:
            return self._classes
        recipe = self.recipe
        path = recipe.teacher.pretrained_path
        if recipe.data.root:
            classes = folder_classes(recipe.data, recipe.seed)  # scanned only: load_datafree decodes them once
        elif recipe.datafree.classes:
            classes = list(recipe.datafree.classes)
        else:
            classes = read_metadata(Path(path)).get("classes") if path and str(path).endswith(".safetensors") else None
        if not classes:
            raise StageMissingError("data.source: datafree needs the class names: give real validation images "
                                    "(data.root), list them in datafree.classes, or use a teacher checkpoint written "
                                    "by edgedistill (it records them)")
        self._classes = list(classes)
        return self._classes

    @property
    def unlabeled(self) -> Optional[Split]:
        if self.recipe.data.unlabeled and self._unlabeled is None:
            self._unlabeled = load_unlabeled(self.recipe.data.unlabeled, self.data, self.recipe.data.cache,
                                             max_side=training_side(self.recipe.data))
            log.info("data.unlabeled: %d images for distillation (the teacher labels them; CE skips them)",
                     len(self._unlabeled))
        return self._unlabeled

    @property
    def evaluation(self) -> Optional[EvalPlan]:
        """What the run is judged on (metric, positive class, operating point), from the recipe and the training
        labels; None for regression."""
        if self.recipe.task == "regression":
            return None
        if self._evaluation is None:
            from .errors import RecipeError

            ev = self.recipe.evaluate
            point = OperatingPoint(**ev.operating_point.model_dump()) if ev.operating_point else None
            try:
                self._evaluation = plan_evaluation(ev.metric, ev.positive_class, point, self.data.classes,
                                                   self.data.train.labels)
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
        return self._evaluation

    def announce_evaluation(self) -> None:
        """Before training: the metric the run is judged on and why, the positive class, and any warning."""
        plan = self.evaluation
        if plan is None:
            return
        log.info("evaluate: judged on %s (%s)", plan.metric_title, plan.metric_reason)
        if plan.positive is not None:
            log.info("evaluate: positive class %s (%s)", plan.positive, plan.positive_reason)
        if plan.operating_point is not None or plan.metric == "recall_at_false_reject":
            split = self.calib_split
            log.info("evaluate: thresholds picked on split '%s' (%d images), reported on '%s'", split.name,
                     len(split), self.eval_split.name)
        for warning in plan.warnings:
            log.warning("evaluate: %s", warning)

    @property
    def calib_split(self) -> Optional[Split]:
        """Where thresholds are picked: data.calib_dir or the held-out share of train, else val/ when the test
        split is the one reported; None when nothing needs a threshold."""
        if not self.recipe.needs_calibration():
            return None
        if self.data.calib is not None:
            return self.data.calib
        if self.data.test is not None:
            return self.data.val
        raise StageMissingError("evaluate.operating_point needs labelled images apart from the evaluated ones: set "
                                "data.calib_dir, data.calib_fraction or data.test_dir")

    def step_data(self, step: "Step"):
        """The data settings a step trains with: the recipe's, with a class-balanced sampler for distillation
        steps under distill.balance: sampler."""
        if step.teacher is not None and self.recipe.distill.balance == "sampler" and self.recipe.task != "regression":
            return self.recipe.data.model_copy(update={"sampler": "balanced"})
        return self.recipe.data

    @property
    def eval_split(self) -> Split:
        """Where models are compared: the test split when the recipe has one, else validation."""
        return self.data.test if self.data.test is not None else self.data.val

    def chain_keys(self) -> list[str]:
        return [k for k, s in self.steps.items() if s.role == "assistant"]

    def generation_keys(self) -> list[str]:
        return [k for k in self.steps if k.startswith("generation-")]

    def stage_dir(self, key: str) -> Path:
        if key in self.steps:
            return self.run_dir / self.steps[key].folder
        return self.run_dir / {"evaluate": ".", "export": "bundle"}.get(key, key)  # datafree: datafree/

    def fingerprint(self, key: str) -> str:
        if key in self.steps:
            step = self.steps[key]
            return self.recipe.fingerprint(*step.sections, exclude=step.exclude)
        return self.recipe.fingerprint(*DEPENDS_ON[key])

    def done_path(self, key: str) -> Path:
        if key in ("evaluate", "export"):  # outputs that are not a folder of their own
            return self.run_dir / f"{key}.done.json"
        return self.stage_dir(key) / "done.json"

    def done_record(self, key: str) -> Optional[dict[str, Any]]:
        path = self.done_path(key)
        if not path.exists():
            return None
        try:
            done = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        ok = done.get("fingerprint") == self.fingerprint(key) and all(
            (self.stage_dir(key) / name).exists() for name in done.get("outputs", []))
        return done if ok else None

    def is_done(self, key: str) -> bool:
        return self.done_record(key) is not None

    def mark_done(self, key: str, outputs: list[str], extra: Optional[dict[str, Any]] = None) -> None:
        if not distributed.world().is_main:
            return
        folder = self.stage_dir(key)
        if key != "export":  # a bundle carries its recipe inside, covered by the manifest's sha256 list
            atomic_write_text(folder / "recipe.yaml", self.recipe.to_yaml())
        atomic_write_text(self.done_path(key), json.dumps(
            {"stage": key, "fingerprint": self.fingerprint(key), "outputs": outputs, **(extra or {})}, indent=2))

    def require(self, key: str, what: str) -> Path:
        path = self.stage_dir(key) / MODEL_FILE
        if not self.is_done(key) or not path.exists():
            stage = "assistant" if key.startswith("assistant") else (
                "self-distill" if key.startswith("generation") else key)
            raise StageMissingError(f"{what} needs the '{key}' stage of this recipe, which has not finished in "
                                    f"'{self.run_dir}': run `edgedistill {stage} RECIPE` (or `edgedistill run`) first")
        return path

    # models ------------------------------------------------------------------------------------------------
    def new_model(self, key: str) -> nn.Module:
        step = self.steps[key]
        torch.manual_seed(self.recipe.seed + step.seed_offset)  # the student and its baseline: same weights
        model = create_model(step.cfg, num_classes=len(self.data.classes))
        if self.recipe.task == "regression" and not step.cfg.pretrained_path:
            zero_head(model)
        return model

    def trained_model(self, key: str, needed_by: str = "this stage") -> nn.Module:
        """The model a finished step saved (its initial weights are not fetched again)."""
        path = self.require(key, needed_by)
        cfg = self.steps[key].cfg
        model = create_model(cfg.model_copy(update={"pretrained": False, "pretrained_path": None}),
                             num_classes=len(self.data.classes))
        load_model(path, model)
        return model.eval()

    def best_student(self) -> str:
        """The student step kept: the born-again generation (or the first student) with the best validation
        score (the run's metric: top-1, balanced accuracy, ...); the earlier one on a tie."""
        self.require("distill", "choosing the student")
        keys = ["distill"] + [k for k in self.generation_keys() if self.is_done(k)]
        scores = [self.done_record(k).get("score", self.done_record(k).get("top1")) for k in keys]
        return keys[scores.index(max(scores))]  # the first of equals: fewer generations


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
        log.warning("%s: the %s (%s) has %.0fx fewer parameters than the model it learns from (%s): compression this "
                    "aggressive rarely keeps quality; consider a larger student or distill.chain with an assistant",
                    step.key, step.role, step.cfg.model, ratio, ctx.steps[step.teacher].cfg.model)
    distill = ctx.recipe.distill
    features = None
    if distill.features != "none":
        pairs = resolve_pairs(distill.features, model, teacher, ctx.recipe.data.image_size)
        features = FeatureMatcher(pairs, distill.feature_loss)
        description = {"student_model": step.cfg.model, "teacher_model": ctx.steps[step.teacher].cfg.model,
                       "mode": distill.features if isinstance(distill.features, str) else "explicit",
                       "image_size": ctx.recipe.data.image_size, **features.describe()}
        if distributed.world().is_main:
            atomic_write_text(ctx.stage_dir(step.key) / FEATURE_MAP_FILE, json.dumps(description, indent=2))
        log.info("%s: feature matching (%s), %d pair(s):\n  %s", step.key, distill.feature_loss, len(pairs),
                 "\n  ".join(mapping_lines(description)))
    if distill.temperature == 1.0:
        log.warning("distill.temperature is 1: the soft labels are the teacher's plain probabilities, close to "
                    "hard labels for a confident teacher; 2-5 is usual")
    if distill.soft_labels == "cached":
        from edgerun.manifest import sha256_file

        from .softlabels import cached_soft_labels

        cache = cached_soft_labels(teacher, sha256_file(str(ctx.stage_dir(step.teacher) / MODEL_FILE)), train,
                                   ctx.step_data(step), ctx.recipe.seed + step.seed_offset, distill.cache_draws,
                                   distill.cache_topk, ctx.run_dir / "soft_labels", ctx.device)
        return Teaching(teacher=None, distill=distill, soft_labels=cache)
    return Teaching(teacher=teacher, distill=distill, features=features)


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
        unlabeled = len(ctx.unlabeled) if ctx.recipe.baseline.epochs == "match_steps" and ctx.unlabeled else 0
        epochs = baseline_epochs(ctx.recipe, len(train), unlabeled)
        if epochs != cfg.epochs:
            log.info("baseline: %d epochs over its %d labelled images (baseline.epochs: %s; the student: %d epochs "
                     "over %d images)", epochs, len(train), ctx.recipe.baseline.epochs, cfg.epochs,
                     len(train) + unlabeled)
        # validate as often, in optimizer steps, as the student does
        every = max(cfg.val_every, round(cfg.val_every * epochs / max(cfg.epochs, 1)))
        cfg = cfg.model_copy(update={"epochs": epochs, "val_every": every})
    extra.update({"epochs": cfg.epochs, "train_images": len(train)})
    if cfg.epochs:
        teaching = _teaching(ctx, step, model, train) if step.teacher is not None else None
        data_cfg = ctx.step_data(step)
        balance = None
        if ctx.recipe.task != "regression":
            balance = balance_for(cfg, train, data_cfg, ctx.recipe.distill if step.teacher is not None else None,
                                  original_sampler=ctx.recipe.data.sampler)
        train_model(TrainJob(model=model, train=train, val=ctx.data.val, data=data_cfg, cfg=cfg, folder=folder,
                             seed=ctx.recipe.seed + step.seed_offset, fingerprint=ctx.fingerprint(key),
                             device=ctx.device, label=key, teaching=teaching, hardware=ctx.recipe.train,
                             task=ctx.recipe.task, balance=balance))
    elif not step.cfg.pretrained_path and not step.cfg.pretrained:
        log.warning("%s: %s.epochs is 0 and no weights are given: the model stays untrained", key, step.role)
    if not distributed.world().is_main:  # rank 0 saves, validates and marks the step done
        distributed.barrier()
        return json.loads((folder / "report.json").read_text())
    save_model(folder / MODEL_FILE, model, {"model": step.cfg.model, "classes": ctx.data.classes, "stage": key})
    report = _validate_and_report(ctx, key, model, f"{TITLES[step.role]} ({key}): {step.cfg.model}")
    outputs = [MODEL_FILE, "report.json", "report.md"]
    if (folder / FEATURE_MAP_FILE).exists():
        outputs.append(FEATURE_MAP_FILE)
    scores = ({"r2": report["r2"], "mae": report["mae"]} if ctx.recipe.task == "regression"
              else {"top1": report["top1"], "metric": report.get("metric", "top1")})
    ctx.mark_done(key, outputs, {**scores, "score": report["score"], "model": step.cfg.model, "teacher": step.teacher,
                                 **extra})
    if ctx.recipe.task == "regression":
        log.info("%s: %s MAE %.4g, R² %.4f on %d validation images", key, step.cfg.model, report["mae"],
                 report["r2"], report["samples"])
    else:
        plan = ctx.evaluation
        also = f", {plan.metric_title} {report['score'] * 100:.2f}%" if plan and plan.metric != "top1" else ""
        log.info("%s: %s top-1 %.2f%%%s on %d validation images", key, step.cfg.model, report["top1"] * 100, also,
                 report["samples"])
    distributed.barrier()
    return report


def stage_datafree(ctx: RunContext) -> Optional[dict[str, Any]]:
    """``data.source: datafree``: synthesize the training set from the teacher's weights alone (DeepInversion,
    ``edgedistill.datafree``); resumes by batch."""
    recipe = ctx.recipe
    if recipe.data.source != "datafree":
        return None
    from edgerun.manifest import sha256_file

    from .datafree import synthesize
    from .train import _progress

    classes = ctx.datafree_classes()
    torch.manual_seed(recipe.seed)
    teacher = create_model(recipe.teacher, num_classes=len(classes))  # the given weights (teacher.pretrained_path)
    student = None
    if recipe.datafree.competition > 0:
        student = (ctx.trained_model("distill", "datafree") if ctx.is_done("distill")
                   else create_model(recipe.student, num_classes=len(classes)))
    weights = recipe.teacher.pretrained_path
    cfg = recipe.datafree
    log.info("datafree: synthesizing %d images per class x %d classes from %s (DeepInversion, %d steps per batch "
             "of %d)", cfg.images_per_class, len(classes), recipe.teacher.model, cfg.steps, cfg.batch_size)
    with _progress() as progress:
        task = progress.add_task("datafree", total=1, stats="")
        synthetic = synthesize(teacher, sha256_file(str(weights)) if weights else recipe.teacher.model, classes,
                               recipe.data, cfg, ctx.stage_dir("datafree"), recipe.seed, ctx.device,
                               teacher_name=recipe.teacher.model, student=student,
                               progress=lambda done, total: progress.update(task, completed=done, total=total))
    ctx.mark_done("datafree", ["soft_labels.npz", "synthesis.json"], {"images": len(synthetic.files)})
    ctx._data = None  # the stages after this one train on the synthetic set
    facts = json.loads((ctx.stage_dir("datafree") / "synthesis.json").read_text())
    log.info("datafree: %d images in %s (BN-statistics loss %.3f -> %.3f, teacher confidence %.2f)",
             facts["images"], ctx.stage_dir("datafree") / "images", facts["bn_loss_first"], facts["bn_loss_last"],
             facts["teacher_confidence"])
    return facts


def stage_teacher(ctx: RunContext) -> dict[str, Any]:
    report = train_step(ctx, "teacher")
    floor = ctx.recipe.teacher.min_top1
    if ctx.recipe.task == "classification" and report["top1"] < floor:
        log.warning("teacher top-1 %.2f%% is under teacher.min_top1 = %.2f%%: distill will refuse it unless --force",
                    report["top1"] * 100, floor * 100)
    return report


def check_teacher_floor(ctx: RunContext, needed_by: str) -> float:
    ctx.require("teacher", needed_by)
    report = json.loads((ctx.stage_dir("teacher") / "report.json").read_text())
    if ctx.recipe.task == "regression":  # teacher.min_top1 is a classification floor
        return report["score"]
    floor = ctx.recipe.teacher.min_top1
    if report["top1"] < floor:
        message = (f"teacher top-1 is {report['top1'] * 100:.2f}%, under teacher.min_top1 = {floor * 100:.2f}%: "
                   f"a student inherits its teacher's mistakes. Train the teacher longer (teacher.epochs), give "
                   f"it better weights (teacher.pretrained_path), lower teacher.min_top1, or pass --force")
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
        log.info("distill: the student learns from the last teacher assistant (%s, %s)", source,
                 ctx.steps[source].cfg.model)
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
            log.info("%s: %s %.2f vs %.2f for the generation before (%+.2f)", key, what, report["score"] * scale,
                     previous["score"] * scale, (report["score"] - previous["score"]) * scale)
        previous = report
        reports.append(report)
    log.info("self-distill: the student kept is %s", ctx.best_student())
    return reports


def stage_baseline(ctx: RunContext) -> dict[str, Any]:
    return train_step(ctx, "baseline")


def _model_facts(model: nn.Module, top1: float, name: str) -> dict[str, Any]:
    return {"model": name, "top1": top1, "params": count_params(model), "size_mb": weight_bytes(model) / 1e6}


def _evaluated_models(ctx: RunContext) -> tuple[Split, Any, str, dict[str, str], dict[str, nn.Module]]:
    """What the evaluate stage compares: its split and loader, the student kept, each role's step and model."""
    split = ctx.eval_split
    ctx.require("teacher", "evaluate")
    student_key = ctx.best_student()
    roles = {"teacher": "teacher", **{key: key for key in ctx.chain_keys()}, "student": student_key,
             "baseline": "baseline"}
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
    summary: dict[str, Any] = {"name": recipe.name, "seed": recipe.seed, "fingerprint": ctx.fingerprint("evaluate"),
                               "latency_batch": ev.latency_batch,
                               "eval_split": split.name, "eval_samples": len(split), "classes": data.classes}
    preds: dict[str, Prediction] = {}
    for role, model in models.items():
        preds[role] = predict(model.to(ctx.device), loader, ctx.device)
        summary[role] = _model_facts(model, preds[role].top1, ctx.steps[roles[role]].cfg.model)
    calib = None
    if ctx.calib_split is not None:
        calib_loader = eval_loader(ctx.calib_split, recipe.data)
        calib = {role: predict(model.to(ctx.device), calib_loader, ctx.device) for role, model in models.items()}
    judged = compare_models(preds, plan, calib, ctx.calib_split.name if calib else "", seed=recipe.seed,
                            classes=data.classes)
    for role, facts in judged.pop("models").items():
        summary[role].update(facts)
    summary.update(judged)
    summary["top1_retention"] = summary["student"]["top1"] / summary["teacher"]["top1"] if summary["teacher"]["top1"] \
        else 0.0
    summary["top1_kd_gain"] = summary["student"]["top1"] - summary["baseline"]["top1"]
    summary["chain"] = [{"role": key, "model": ctx.steps[key].cfg.model} for key in ctx.chain_keys()]
    summary["student"]["step"] = student_key
    if ctx.generation_keys():
        summary["student"]["generation"] = 0 if student_key == "distill" else int(student_key.split("-")[1])
        summary["generations"] = []
        for g, key in enumerate(["distill"] + ctx.generation_keys()):
            report = classification_report(preds["student"] if key == student_key else predict(
                ctx.trained_model(key, "evaluate").to(ctx.device), loader, ctx.device), data.classes, plan)
            summary["generations"].append({"generation": g, "top1": report["top1"], "score": report["score"],
                                           "kept": key == student_key, "val_score": ctx.done_record(key)["score"]})
    summary["unlabeled_images"] = (ctx.done_record("distill") or {}).get("unlabeled_images", 0)
    if recipe.data.source == "datafree":
        facts = json.loads((ctx.stage_dir("datafree") / "synthesis.json").read_text())
        summary["data_free"] = {"synthetic_images": facts["images"], "teacher_confidence": facts["teacher_confidence"],
                                "bn_loss": [facts["bn_loss_first"], facts["bn_loss_last"]],
                                "real_evaluation": recipe.data.root is not None}
        if recipe.datafree.compare_run:
            from .evaluate import load_summary

            other = load_summary(recipe.datafree.compare_run)
            summary["data_free"]["data_driven"] = {"run": recipe.datafree.compare_run,
                                                   "student_top1": other["student"]["top1"],
                                                   "baseline_top1": other["baseline"]["top1"]}
    summary["schedule"] = {role: {k: (ctx.done_record(key) or {}).get(k) for k in ("epochs", "train_images")}
                           for role, key in (("student", student_key), ("baseline", "baseline"))}
    _host_latency(ctx, models, summary)
    summary["device_estimate"] = recipe_estimate(recipe, len(data.classes))
    summary["device_check"] = device_check(summary["device_estimate"], recipe, len(data.classes))
    _speed_and_cost(ctx, summary)
    summary["verdict"], helped = verdict(summary, ev.min_kd_gain)
    summary["kd_gain_flag"] = not helped
    summary["advice"] = advice(summary, recipe.student.epochs)
    return _write_summary(ctx, summary)


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
            ort_lat = measure_ort_latency(models[role].cpu(), size, batches, ev.latency_repeats, ev.latency_warmup,
                                          threads, tmp)
            for batch in batches:
                summary[role][f"latency_ms_b{batch}"] = ort_lat[batch]["median_s"] * 1e3
                summary[role][f"throughput_b{batch}"] = batch / ort_lat[batch]["median_s"]
    torch.set_num_threads(threads)
    try:
        for role in ("teacher", "student"):
            for batch in batches:
                lat = measure_latency(models[role], (batch, 3, size, size), ev.latency_repeats, ev.latency_warmup,
                                      ctx.device)
                summary[role][f"torch_latency_ms_b{batch}"] = lat["median_s"] * 1e3
    finally:
        torch.set_num_threads(threads_before)
    import onnxruntime

    summary["host"] = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": threads,
                       "runtime": f"ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)",
                       "torch": torch.__version__, "torch_device": str(ctx.device),
                       "note": f"median of {ev.latency_repeats} runs after {ev.latency_warmup} warm-up, same "
                               "process; PyTorch eager figures are the second column; device figures come from "
                               "edgerun bench"}


def _speed_and_cost(ctx: RunContext, summary: dict[str, Any]) -> None:
    ev = ctx.recipe.evaluate
    t, s = summary["teacher"], summary["student"]
    summary["param_reduction"] = t["params"] / s["params"]
    summary["size_reduction"] = t["size_mb"] / s["size_mb"]
    summary["speedup"] = t["latency_ms_b1"] / s["latency_ms_b1"]
    summary[f"speedup_b{ev.latency_batch}"] = t[f"latency_ms_b{ev.latency_batch}"] / s[f"latency_ms_b{ev.latency_batch}"]
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
    summary: dict[str, Any] = {"name": recipe.name, "seed": recipe.seed, "task": "regression",
                               "fingerprint": ctx.fingerprint("evaluate"), "latency_batch": recipe.evaluate.latency_batch,
                               "eval_split": split.name, "eval_samples": len(split), "classes": data.classes,
                               "targets": data.scaling.as_dict()}
    errors = {}
    for role, model in models.items():
        pred = predict(model.to(ctx.device), loader, ctx.device)
        report = regression_report(pred, data.scaling)
        errors[role] = np.abs(data.scaling.restore(pred.logits) - data.scaling.restore(pred.labels)).mean(1)
        summary[role] = {**_model_facts(model, report["r2"], ctx.steps[roles[role]].cfg.model),
                         **{k: report[k] for k in ("mae", "rmse", "r2", "per_target")}}
        summary[role].pop("top1")
    summary["chain"] = [{"role": key, "model": ctx.steps[key].cfg.model} for key in ctx.chain_keys()]
    summary["student"]["step"] = student_key
    summary["schedule"] = {role: {k: (ctx.done_record(key) or {}).get(k) for k in ("epochs", "train_images")}
                           for role, key in (("student", student_key), ("baseline", "baseline"))}
    _host_latency(ctx, models, summary)
    summary["device_estimate"] = recipe_estimate(recipe, len(data.classes))
    t, s, b = summary["teacher"], summary["student"], summary["baseline"]
    summary["retention"] = s["r2"] / t["r2"] if t["r2"] > 0 else 0.0
    summary["kd_gain"] = b["mae"] - s["mae"]  # target units: positive = the student's error is smaller
    rng = np.random.default_rng(recipe.seed)
    gains = [float((errors["baseline"][idx] - errors["student"][idx]).mean())
             for idx in (rng.integers(0, len(split), len(split)) for _ in range(1000))]
    summary["intervals"] = {"kd_gain": [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]}
    _speed_and_cost(ctx, summary)
    helped = summary["kd_gain"] > 0 and summary["intervals"]["kd_gain"][0] > 0
    summary["kd_gain_flag"] = not helped
    summary["verdict"] = (
        f"student R² {s['r2']:.3f} = {summary['retention'] * 100:.1f}% of the teacher's ({t['r2']:.3f}); MAE "
        f"{s['mae']:.4g} vs {b['mae']:.4g} for the baseline: "
        + ("distillation helped (the 95% interval of the MAE gain is above 0)" if helped else
           "distillation did not clearly help (the 95% interval of the MAE gain includes 0 or is below it)")
        + f"; {summary['speedup']:.1f}x faster on this host")
    summary["advice"] = []
    return _write_summary(ctx, summary)


def stage_export(ctx: RunContext) -> dict[str, Any]:
    from .export import build_bundle

    recipe, data = ctx.recipe, ctx.data
    student_key = ctx.best_student()
    student = ctx.trained_model(student_key, "export")
    teacher = ctx.trained_model("teacher", "export") if recipe.export.teacher else None
    summary_path = ctx.run_dir / "summary.json"
    host: dict[str, Any] = {}
    decision = None
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        quality = ("r2", "mae") if recipe.task == "regression" else ("top1",)
        host = {f"{role}_{k}": s[role][k] for role in ("teacher", "student", "baseline") for k in quality}
        host.update({"retention": s["retention"], "kd_gain": s["kd_gain"], "eval_split": s["eval_split"],
                     "eval_samples": s["eval_samples"]})
        if s.get("metric"):
            host["metric"] = s["metric"]["name"]
            host.update({f"{role}_score": s[role]["score"] for role in ("teacher", "student", "baseline")})
            if s.get("fingerprint") == ctx.fingerprint("evaluate"):
                decision = _decision(s)
            else:
                log.warning("export: %s is from another recipe: the bundle gets no reject threshold; run `edgedistill "
                            "evaluate RECIPE` first", summary_path)
    else:
        log.warning("export: no summary.json yet (run evaluate first to carry host metrics into the manifest)")
    manifest = build_bundle(
        qad=lambda input_amax: quantization_aware_distillation(ctx, student, student_key, input_amax),
        model=student, out_dir=ctx.stage_dir("export"), name=recipe.name, classes=data.classes, train=data.train,
        val=data.val, data_cfg=recipe.data, cfg=recipe.export, seed=recipe.seed,
        checkpoint=ctx.stage_dir(student_key) / MODEL_FILE, recipe_yaml=recipe.to_yaml(), teacher=teacher,
        source={"student_model": recipe.student.model, "teacher_model": recipe.teacher.model,
                "recipe_fingerprint": ctx.fingerprint("export")},
        host_metrics=host, targets=data.scaling.as_dict() if data.scaling is not None else None, decision=decision)
    ctx.mark_done("export", ["manifest.json", "model.onnx"])
    int8 = manifest["metrics"].get("int8") or {}
    ds = manifest["metrics"].get("deepstream")
    if summary_path.exists() and (int8.get("attempts") or ds):
        s = json.loads(summary_path.read_text())  # the gate speaks where the user reads the verdict
        if int8.get("attempts"):
            s["int8"] = {k: int8.get(k) for k in ("fp32_top1", "fp32_r2", "attempts", "chosen", "status", "drop",
                                                  "kept_fp16", "advice", "layers", "calibration")}
        if ds:
            s["deepstream"] = dict(ds, note=manifest["deepstream"]["note"])
        atomic_write_text(summary_path, json.dumps(s, indent=2))
        atomic_write_text(ctx.run_dir / "summary.md", summary_markdown(s))
    par = manifest["metrics"]["parity"]
    log.info("export: bundle for %s in %s (parity max abs error %.1e%s); pack it with `edgedistill pack %s -o "
             "%s.edb`", recipe.export.target, ctx.stage_dir("export"), par["max_abs_error"],
             "" if data.scaling is not None else f", top-1 agreement {par['top1_agreement'] * 100:.2f}%",
             ctx.stage_dir("export"), recipe.name)
    return manifest


def quantization_aware_distillation(ctx: RunContext, student: nn.Module, student_key: str,
                                    input_amax: dict[str, float]) -> tuple[nn.Module, dict[str, Any]]:
    """``export.int8`` reaching QAD: the trained student with fake quantization on the layers the INT8 model
    quantizes (``input_amax``: their calibrated input ranges), fine-tuned with the distill stage's loss against the
    FP32 teacher (``export.qad_teacher``: the run's teacher, or the FP32 student itself) for ``export.qad_epochs`` at
    ``export.qad_lr``, BatchNorm statistics frozen; resumable in ``<run>/qad/`` like every step. Returns the float
    model with the fine-tuned weights and the facts the manifest records."""
    import hashlib

    from .checkpoint import read_metadata
    from .quantize import add_fake_quant, remove_fake_quant

    recipe = ctx.recipe
    export = recipe.export
    folder = ctx.run_dir / "qad"
    fingerprint = hashlib.sha256(json.dumps({
        "student": ctx.fingerprint(student_key), "export": recipe.fingerprint("export"),
        "amax": sorted(input_amax.items())}, sort_keys=True).encode()).hexdigest()[:16]
    step = ctx.steps[student_key]
    if export.qad_teacher == "teacher":
        teacher = ctx.trained_model(ctx.steps["distill"].teacher, "export (quantization-aware distillation)")
    else:
        teacher = ctx.trained_model(student_key, "export (quantization-aware distillation)")
    model = add_fake_quant(student, input_amax)
    cfg = recipe.student.model_copy(update={"epochs": export.qad_epochs, "lr": export.qad_lr, "warmup_epochs": 0.0,
                                            "val_every": 1, "layer_decay": None})
    train = ctx.data.train if ctx.unlabeled is None else with_unlabeled(ctx.data.train, ctx.unlabeled)
    balance = None
    if recipe.task != "regression":
        balance = balance_for(cfg, train, recipe.data, recipe.distill)
    log.info("export: quantization-aware distillation of %s against the FP32 %s (%d epoch(s), lr %.1e, %d fake-"
             "quantized layers) in %s", step.cfg.model, export.qad_teacher, cfg.epochs, cfg.lr, len(input_amax), folder)
    history = train_model(TrainJob(model=model, train=train, val=ctx.data.val, data=recipe.data, cfg=cfg, folder=folder,
                                   seed=recipe.seed, fingerprint=fingerprint, device=ctx.device, label="qad",
                                   teaching=Teaching(teacher=teacher, distill=recipe.distill), hardware=recipe.train,
                                   task=recipe.task, balance=balance, freeze_bn=True))
    seconds = sum(r.get("seconds", 0.0) for r in history)
    student_seconds = sum(json.loads(line).get("seconds", 0.0)
                          for line in (ctx.stage_dir(student_key) / "metrics.jsonl").read_text().splitlines()
                          if '"kind": "epoch"' in line) if (ctx.stage_dir(student_key) / "metrics.jsonl").exists() else 0
    facts = {"epochs": cfg.epochs, "lr": cfg.lr, "teacher": export.qad_teacher, "train_seconds": round(seconds, 1),
             "student_train_seconds": round(student_seconds, 1),
             "val_top1_fake_quant": (history[-1] if history else {}).get("val_top1"),
             "checkpoint": str(folder / "last.safetensors"),
             "fingerprint": read_metadata(folder / "last.safetensors").get("fingerprint")}
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
        out.update(threshold=mine["threshold"], operating_point=chosen["operating_point"],
                   calibration_split=op["calibration_split"],
                   host={"split": summary["eval_split"], "recall": mine["recall"], "false_reject": mine["false_reject"]})
    elif summary["student"].get("metric_threshold") is not None:
        out.update(threshold=summary["student"]["metric_threshold"],
                   operating_point={"target_recall": None, "max_false_reject": chosen.get("false_reject_limit")},
                   calibration_split=(chosen.get("calibration") or {}).get("split"))
    return out


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], Any]] = {
    "datafree": stage_datafree,
    "teacher": stage_teacher,
    "assistant": stage_assistant,
    "distill": stage_distill,
    "self-distill": stage_self_distill,
    "baseline": stage_baseline,
    "evaluate": stage_evaluate,
    "export": stage_export,
}
PIPELINE = ["datafree", "teacher", "assistant", "distill", "self-distill", "baseline", "evaluate", "export"]
TRAINING_STAGES = ("teacher", "assistant", "distill", "self-distill", "baseline")  # skip per step, inside


def run_stage(ctx: RunContext, stage: str) -> Any:
    """Run one stage. Under torchrun every process trains; the stages after training run on rank 0 while the
    others wait."""
    if stage not in TRAINING_STAGES and not distributed.world().is_main:
        distributed.barrier()
        return None
    try:
        return _run_stage(ctx, stage)
    finally:
        if stage not in TRAINING_STAGES:
            distributed.barrier()


def _run_stage(ctx: RunContext, stage: str) -> Any:
    if stage == "datafree" and ctx.recipe.data.source != "datafree":
        return None
    if stage not in TRAINING_STAGES and ctx.is_done(stage):
        log.info("%s: outputs in '%s' match this recipe; skipped (delete %s to redo)", stage,
                 ctx.stage_dir(stage), ctx.done_path(stage).name)
        return None
    log.info("%s: starting", stage)
    return STAGE_FUNCTIONS[stage](ctx)
