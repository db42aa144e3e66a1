"""The whole recipe: its sections, the rules that span sections (regression keeps to what applies, a calibration
split for an operating point, one form of assistant, ...), and the fingerprint of the sections a stage depends
on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator

from edgedistill.recipe.outputs import EvaluateConfig, ExportConfig, TrackingConfig
from edgedistill.recipe.sections import (
    AnomalyConfig,
    BaselineConfig,
    DataConfig,
    DataFreeConfig,
    DistillConfig,
    ModelConfig,
    SelfDistillConfig,
    Strict,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

# Top-level sections added after the first release: at their defaults they stay out of stage fingerprints, so
# finished stages of older runs are not redone.
LATER_SECTIONS = ("baseline", "train", "datafree", "task", "anomaly")

# Keys that decide how fast a stage runs, never what it learns: outside every fingerprint.
HARDWARE_KEYS = ("data.workers",)


class Recipe(Strict):
    name: str
    output: Optional[str] = Field(None, description="run folder; default runs/<name>")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task: Literal["classification", "regression", "anomaly"] = Field(
        "classification",
        description="regression: each split folder holds its images and a targets.csv "
        "(file,target[,target2...]); models get a linear head per target. anomaly: train/good/ only, a detector "
        "learns good parts from the pretrained teacher (the `anomaly` section); val/ and test/ defect kinds measure",
    )
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    assistant: Optional[ModelConfig] = Field(
        None,
        description="teacher assistant (Mirzadeh et al. 2020): distilled from the teacher first, then "
        "distilled into the student; for large teacher/student gaps",
    )
    distill: DistillConfig = DistillConfig()
    self_distill: SelfDistillConfig = SelfDistillConfig()
    datafree: DataFreeConfig = DataFreeConfig()
    baseline: BaselineConfig = BaselineConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _anomaly_reads_folders_and_rejects_on_good_images(self) -> "Recipe":
        if self.task != "anomaly":
            return self
        if self.data.source != "folder" or not self.data.root:
            raise ValueError(
                "task: anomaly reads data.root/train/good/ (good parts), val/ and test/: set data.source: folder "
                "and data.root"
            )
        if self.evaluate.operating_point is None:  # written into the resolved recipe: where the line rejects
            from edgedistill.recipe.outputs import OperatingPointConfig

            self.evaluate.operating_point = OperatingPointConfig(max_false_reject=0.01)
        return self

    @model_validator(mode="after")
    def _regression_uses_what_applies(self) -> "Recipe":
        if self.task != "regression":
            return self
        if self.data.source != "folder":
            raise ValueError(
                "task: regression reads image folders with a targets.csv per split: set data.source: "
                "folder (digits, idx and datafree are classification sources)"
            )
        for key, value, ok in (
            ("data.unlabeled", self.data.unlabeled, None),
            ("distill.method", self.distill.method, "kd"),
            ("distill.features", self.distill.features, "none"),
            ("distill.soft_labels", self.distill.soft_labels, "online"),
        ):
            if value != ok:
                raise ValueError(
                    f"task: regression: {key} ({value}) applies to classification only; the student "
                    "learns the teacher's predictions with alpha * MSE(student, teacher) + (1 - alpha) * "
                    "loss(student, y); remove the key"
                )
        return self

    def needs_calibration(self) -> bool:
        """Whether evaluation picks a threshold on a calibration split (an operating point, or recall at a
        false-reject limit as the metric)."""
        return self.evaluate.operating_point is not None or self.evaluate.metric == "recall_at_false_reject"

    @model_validator(mode="after")
    def _classification_keys_stay_with_classification(self) -> "Recipe":
        if self.task != "regression":
            return self
        ev = self.evaluate
        used = [
            k
            for k, v in (
                ("evaluate.metric", ev.metric),
                ("evaluate.positive_class", ev.positive_class),
                ("evaluate.operating_point", ev.operating_point),
            )
            if v is not None
        ]
        used += [
            f"{role}.{k}"
            for role in ("teacher", "student")
            for k, v in (
                ("class_weights", getattr(self, role).class_weights != "none"),
                ("logit_adjustment", getattr(self, role).logit_adjustment),
            )
            if v
        ]
        used += [
            k
            for k, v in (
                ("data.sampler", self.data.sampler != "uniform"),
                ("distill.balance", self.distill.balance != "none"),
            )
            if v
        ]
        if used:
            raise ValueError(
                f"task: regression: {', '.join(used)} apply to classes; regression is judged by MAE and "
                "R² (remove the key)"
            )
        return self

    @model_validator(mode="after")
    def _a_calibration_split_for_the_operating_point(self) -> "Recipe":
        data = self.data
        if self.task == "anomaly":  # its calibration is good images of val/ (anomaly.calib_fraction)
            return self
        if not self.needs_calibration() or data.calib_dir or data.test_dir or data.calib_fraction:
            return self
        if data.source == "datafree":
            raise ValueError(
                "evaluate.operating_point on data.source: datafree picks its threshold on real labelled "
                "images: set data.calib_dir (or data.test_dir, so that val/ serves)"
            )
        data.calib_fraction = 0.1  # written into the resolved recipe: the held-out share is part of the data
        return self

    @model_validator(mode="after")
    def _balance_sampler_needs_labels(self) -> "Recipe":
        if self.distill.balance == "sampler" and self.data.unlabeled:
            raise ValueError(
                "distill.balance: sampler draws batches by class and data.unlabeled images have none: "
                "use distill.balance: reweight (it weighs the teacher's soft labels, labelled or not)"
            )
        return self

    @model_validator(mode="after")
    def _one_correction_for_imbalance(self) -> "Recipe":
        """Each model's scores live in one space: raw (cross-entropy on the stream) or balanced (one correction).
        Two corrections of the same term over-correct, and an adjustment on a balanced stream does nothing."""
        models = [("teacher", self.teacher), ("student", self.student)]
        models += [("assistant", self.assistant)] if self.assistant is not None else []
        for role, cfg in models:
            if cfg.logit_adjustment and cfg.class_weights != "none":
                raise ValueError(
                    f"{role}.logit_adjustment and {role}.class_weights both correct the cross-entropy for the class "
                    f"prior: together they correct it twice; keep one (logit_adjustment is the consistent one, "
                    "Menon et al. 2021)"
                )
            if cfg.logit_adjustment and self.data.sampler == "balanced":
                raise ValueError(
                    f"{role}.logit_adjustment on data.sampler: balanced does nothing (the stream's prior is "
                    "uniform, so the adjustment is a constant): use one of them"
                )
        if self.teacher.logit_adjustment and self.distill.balance == "reweight":
            raise ValueError(
                "teacher.logit_adjustment with distill.balance: reweight corrects the soft labels twice: the "
                "logit-adjusted teacher already teaches balanced scores; use distill.balance: none (or sampler)"
            )
        return self

    @model_validator(mode="after")
    def _datafree_needs_a_trained_teacher(self) -> "Recipe":
        if self.data.source == "datafree" and (
            self.teacher.epochs or not (self.teacher.pretrained_path or self.teacher.pretrained)
        ):
            raise ValueError(
                "data.source: datafree has no real training images: give the trained teacher's weights "
                "(teacher.pretrained_path: FILE) and set teacher.epochs: 0"
            )
        return self

    @model_validator(mode="after")
    def _one_form_of_assistant(self) -> "Recipe":
        if self.assistant is not None and self.distill.chain:
            raise ValueError(
                "the recipe has both an 'assistant' section and 'distill.chain': use one (the "
                "assistant section is the one-step chain; move it into distill.chain: [MODEL, ...])"
            )
        return self

    def chain_configs(self) -> list[ModelConfig]:
        """The assistants, teacher side first: the 'assistant' section, or each distill.chain step on top of
        the student's training settings."""
        if self.assistant is not None:
            return [self.assistant]
        steps = []
        for step in self.distill.chain:
            update: dict[str, Any] = {
                "model": step.model,
                "model_kwargs": dict(step.model_kwargs),
                "pretrained": False,
                "pretrained_path": None,
            }
            update.update({k: v for k, v in (("epochs", step.epochs), ("lr", step.lr)) if v is not None})
            steps.append(ModelConfig(**{**self.student.model_dump(), **update}))
        return steps

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v in (".", ".."):
            raise ValueError("name must be a plain folder name (no slashes)")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    def fingerprint(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """Hash of the named top-level sections: what decides one stage's output.

        Only values that differ from their defaults count, so a key written out at its default value, or a
        new optional key added by a later edgedistill release, does not invalidate finished stages.
        ``exclude`` drops dotted keys (``data.unlabeled`` does not concern the teacher or the baseline).
        """
        dumped = self.model_dump(mode="json", exclude_defaults=True)
        for dotted in exclude + HARDWARE_KEYS:
            section, _, key = dotted.partition(".")
            if isinstance(dumped.get(section), dict):
                dumped[section].pop(key, None)
        chosen = {key: dumped.get(key) for key in sections if not (key in LATER_SECTIONS and dumped.get(key) is None)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
