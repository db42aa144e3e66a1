"""What a run's stages share beside its folder: the data (loaded once), the unlabeled images, the evaluation plan and
its splits, the device, and the models (fresh with the recipe's seed, or as a finished step saved them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from edgedistill.data.folders import load_unlabeled
from edgedistill.data.images import training_side
from edgedistill.data.sources import load_data, load_datafree
from edgedistill.data.splits import DataBundle, Split
from edgedistill.errors import StageMissingError
from edgedistill.files import atomic_write_text
from edgedistill.judge.metrics import EvalPlan, OperatingPoint, plan_evaluation
from edgedistill.judge.thresholds import promise_text, threshold_promise
from edgedistill.models.checkpoint import load_model
from edgedistill.models.factory import create_model, zero_head
from edgedistill.recipe.schema import Recipe
from edgedistill.run.folder import RunFolder, Step, plan_steps
from edgedistill.run.tracking import Tracker
from edgedistill.train import distributed
from edgedistill.train.loop import resolve_device

log = logging.getLogger(__name__)


class RunContext(RunFolder):
    """A run folder and what its stages share: the data, the device, the --force flag, the models."""

    def __init__(self, recipe: Recipe, force: bool = False):
        super().__init__(recipe)
        self.force = force
        self.device = resolve_device(recipe.device)
        self._data: Optional[DataBundle] = None
        self._unlabeled: Optional[Split] = None
        self._classes: Optional[list[str]] = None  # data.source: datafree, before the synthetic set exists
        self._evaluation: Optional[EvalPlan] = None
        self.tracker: Tracker = Tracker()  # MLflow when the command opened one (edgedistill.run.tracking)
        self.epoch_hooks: list[Callable[[str, dict], None]] = []  # (step key, epoch record): a search's pruner
        if distributed.world().is_main:
            atomic_write_text(self.run_dir / "recipe.yaml", recipe.to_yaml())

    def epoch_hook(self, key: str) -> Callable[[dict], None]:
        """What a step's training calls after each epoch (rank 0): the tracker, then the other hooks."""

        def hook(record: dict) -> None:
            self.tracker.log_epoch(key, record)
            for other in self.epoch_hooks:
                other(key, record)

        return hook

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
        _ = self.data  # load once, share
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
        from edgedistill.train.datafree import SyntheticSet

        folder = self.stage_dir("datafree")
        if not self.is_done("datafree"):
            raise StageMissingError(
                f"data.source: datafree: the synthetic training set of this recipe is not in "
                f"'{folder}' yet: run `edgedistill datafree RECIPE` (or `edgedistill run`) first"
            )
        synthetic = SyntheticSet.load(folder)
        return load_datafree(
            self.recipe.data, self.recipe.seed, folder, synthetic.files, synthetic.labels, self.datafree_classes()
        )

    def datafree_classes(self) -> list[str]:
        """The classes a data-free run synthesizes: the real validation folder's, else datafree.classes, else
        the teacher checkpoint's."""
        from edgedistill.data.folders import folder_classes
        from edgedistill.models.checkpoint import read_metadata

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
            raise StageMissingError(
                "data.source: datafree needs the class names: give real validation images "
                "(data.root), list them in datafree.classes, or use a teacher checkpoint written "
                "by edgedistill (it records them)"
            )
        self._classes = list(classes)
        return self._classes

    @property
    def unlabeled(self) -> Optional[Split]:
        if self.recipe.data.unlabeled and self._unlabeled is None:
            self._unlabeled = load_unlabeled(
                self.recipe.data.unlabeled, self.data, self.recipe.data.cache, max_side=training_side(self.recipe.data)
            )
            log.info(
                "data.unlabeled: %d images for distillation (the teacher labels them; CE skips them)",
                len(self._unlabeled),
            )
        return self._unlabeled

    @property
    def evaluation(self) -> Optional[EvalPlan]:
        """What the run is judged on (metric, positive class, operating point), from the recipe and the training
        labels; None for regression."""
        if self.recipe.task == "regression":
            return None
        if self._evaluation is None:
            from edgedistill.errors import RecipeError

            ev = self.recipe.evaluate
            point = OperatingPoint(**ev.operating_point.model_dump()) if ev.operating_point else None
            try:
                self._evaluation = plan_evaluation(
                    ev.metric,
                    ev.positive_class,
                    point,
                    self.data.classes,
                    self.data.train.labels,
                    confidence=ev.threshold_confidence,
                )
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
            log.info(
                "evaluate: thresholds picked on split '%s' (%d images), reported on '%s'",
                split.name,
                len(split),
                self.eval_split.name,
            )
            for point in (plan.operating_point, plan.metric_point()):
                if point is not None and point.confidence:
                    promise = threshold_promise(split.labels == plan.positive_index, point)
                    if not promise["holds"]:
                        log.warning("evaluate: %s", promise_text(promise, split.name))
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
        raise StageMissingError(
            "evaluate.operating_point needs labelled images apart from the evaluated ones: set "
            "data.calib_dir, data.calib_fraction or data.test_dir"
        )

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
        model = create_model(
            cfg.model_copy(update={"pretrained": False, "pretrained_path": None}), num_classes=len(self.data.classes)
        )
        load_model(path, model)
        return model.eval()
