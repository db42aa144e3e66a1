"""A run folder's bookkeeping: the steps a recipe trains, their folders, the fingerprint of the recipe sections each
depends on, and the ``done.json`` records that let a re-run skip what is finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgedistill.errors import RecipeError, StageMissingError
from edgedistill.files import atomic_write_text
from edgedistill.recipe.schema import Recipe
from edgedistill.recipe.sections import ModelConfig
from edgedistill.train import distributed

MODEL_FILE = "model.safetensors"

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
        steps.append(
            Step(
                f"generation-{g}",
                f"student-gen{g}",
                "student",
                recipe.student,
                previous,
                STUDENT_SECTIONS,
                seed_offset=1000 * g,
            )
        )
    # with match_steps the baseline's schedule depends on how many unlabeled images the student sees
    baseline_exclude = () if recipe.baseline.epochs == "match_steps" else UNLABELED_KEY
    steps.append(Step("baseline", "baseline", "student", recipe.student, None, BASELINE_SECTIONS, baseline_exclude))
    return {step.key: step for step in steps}


class RunFolder:
    """One run folder: where each step and stage writes, what its outputs depend on, what is finished."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RecipeError(
                f"output '{self.run_dir}' is a file: the run needs a folder there; choose another output (or name)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.steps = plan_steps(recipe)

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
            (self.stage_dir(key) / name).exists() for name in done.get("outputs", [])
        )
        return done if ok else None

    def is_done(self, key: str) -> bool:
        return self.done_record(key) is not None

    def mark_done(self, key: str, outputs: list[str], extra: Optional[dict[str, Any]] = None) -> None:
        if not distributed.world().is_main:
            return
        folder = self.stage_dir(key)
        if key != "export":  # a bundle carries its recipe inside, covered by the manifest's sha256 list
            atomic_write_text(folder / "recipe.yaml", self.recipe.to_yaml())
        atomic_write_text(
            self.done_path(key),
            json.dumps(
                {"stage": key, "fingerprint": self.fingerprint(key), "outputs": outputs, **(extra or {})}, indent=2
            ),
        )

    def require(self, key: str, what: str) -> Path:
        path = self.stage_dir(key) / MODEL_FILE
        if not self.is_done(key) or not path.exists():
            stage = (
                "assistant"
                if key.startswith("assistant")
                else ("self-distill" if key.startswith("generation") else key)
            )
            raise StageMissingError(
                f"{what} needs the '{key}' stage of this recipe, which has not finished in "
                f"'{self.run_dir}': run `edgedistill {stage} RECIPE` (or `edgedistill run`) first"
            )
        return path

    def best_student(self) -> str:
        """The student step kept: the born-again generation (or the first student) with the best validation
        score (the run's metric: top-1, balanced accuracy, ...); the earlier one on a tie."""
        self.require("distill", "choosing the student")
        keys = ["distill"] + [k for k in self.generation_keys() if self.is_done(k)]
        scores = [self.done_record(k).get("score", self.done_record(k).get("top1")) for k in keys]
        return keys[scores.index(max(scores))]  # the first of equals: fewer generations
