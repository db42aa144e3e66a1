"""Typed recipes: YAML (``yaml.safe_load``) validated by pydantic, dotted ``--set`` overrides.

A recipe describes one whole run (data, teacher, student, distillation, evaluation, export). The
resolved recipe is written beside every artifact, and each stage fingerprints the part of it that
decides its output, so a re-run skips a stage whose inputs did not change.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Training augmentation (albumentations). Evaluation always uses resize + centre crop."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.3, ge=0, description="brightness/contrast/saturation strength; 0 turns it off")
    rotate: float = Field(0.0, ge=0, le=180, description="max rotation in degrees; 0 turns it off")


class DataConfig(_Strict):
    source: Literal["folder", "digits", "idx"] = "folder"
    root: Optional[str] = Field(None, description="image folder, or a .tar/.tar.gz of one, or the IDX folder")
    train_dir: str = "train"
    val_dir: str = "val"
    test_dir: Optional[str] = None
    image_size: int = Field(32, ge=8)
    crop_pct: float = Field(1.0, gt=0, le=1)
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0)
    train_per_class: Optional[int] = Field(None, ge=1, description="cap images per class (CPU budgets)")
    val_per_class: Optional[int] = Field(None, ge=1)
    cache: Optional[bool] = Field(None, description="decode images once into memory; default: when small")
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(_Strict):
    model: str
    pretrained: bool = Field(False, description="download timm hub weights (needs the hub)")
    pretrained_path: Optional[str] = Field(None, description="local safetensors or state-dict file")
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(5.0, gt=0)
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm create_model kwargs")


class TeacherConfig(ModelConfig):
    model: str = "resnet18"
    min_top1: float = Field(0.5, ge=0, le=1, description="refuse to distill below this top-1 unless --force")


class StudentConfig(ModelConfig):
    model: str = "mobilenetv3_small_100"
    # The KD literature (Hinton et al. 2015; Beyer et al. 2022, "patient and consistent") trains the student
    # longer and at a lower learning rate than its teacher; these defaults follow it.
    epochs: int = Field(15, ge=0)
    lr: float = Field(5e-4, gt=0)


class DistillConfig(_Strict):
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.6, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs CE")
    feature_weight: float = Field(0.0, ge=0, description="FitNets hint: weight of the MSE between the projected "
                                  "last student feature map and the teacher's (0 turns it off)")


class CostConfig(_Strict):
    """Serving cost per month: instances needed for the request volume, times their hourly price."""

    requests_per_month: float = Field(gt=0)
    price_per_hour: float = Field(gt=0, description="hourly price of the instance serving the teacher")
    student_price_per_hour: Optional[float] = Field(None, gt=0, description="default: price_per_hour")
    utilization: float = Field(0.5, gt=0, le=1, description="target busy fraction of each instance")


class EvaluateConfig(_Strict):
    latency_batch: int = Field(8, ge=1)
    latency_repeats: int = Field(20, ge=3)
    latency_warmup: int = Field(3, ge=0)
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads for the latency runs")
    min_kd_gain: float = Field(0.005, description="KD gain under this (a fraction, 0.005 = 0.5 points) is flagged")
    cost: Optional[CostConfig] = None


class ExportConfig(_Strict):
    target: str = "generic-x86-ort"
    dynamic_batch: bool = False
    batch: int = Field(1, ge=1)
    max_batch: int = Field(8, ge=1)
    opset: Optional[int] = Field(None, ge=7, description="default: the target profile's opset")
    teacher: bool = Field(False, description="also export the teacher, for comparison on the device")
    simplify: bool = True
    parity_atol: float = Field(1e-3, gt=0)
    parity_min_agreement: float = Field(0.99, ge=0, le=1)
    parity_samples: int = Field(256, ge=1)
    calib_samples: int = Field(512, ge=1)
    val_samples: int = Field(300, ge=1)
    int8: bool = True
    int8_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    int8_max_drop: float = Field(0.01, ge=0, description="reject INT8 when top-1 drops more (0.01 = 1 point)")


class Recipe(_Strict):
    name: str
    output: Optional[str] = Field(None, description="run folder; default runs/<name>")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    assistant: Optional[ModelConfig] = Field(
        None, description="teacher assistant (Mirzadeh et al. 2020): distilled from the teacher first, then "
                          "distilled into the student; for large teacher/student gaps")
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v in (".", ".."):
            raise ValueError("name must be a plain folder name (no slashes)")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named top-level sections: what decides one stage's output.

        Only values that differ from their defaults count, so a key written out at its default value, or a
        new optional key added by a later edgedistill release, does not invalidate finished stages.
        """
        dumped = self.model_dump(mode="json", exclude_defaults=True)
        chosen = {key: dumped.get(key) for key in sections}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_at(path: tuple, model: type[BaseModel] = Recipe) -> Optional[type[BaseModel]]:
    """The pydantic model class found at a dotted location, if any."""
    current: Any = model
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        args = getattr(current, "__args__", ())
        if args:  # Optional[X]
            current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            lines.append(f"  unknown key '{key}'{hint} (valid here: {', '.join(known)})")
        else:
            lines.append(f"  {key or '<top>'}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects key=value, got '{text}' (for example --set data.batch_size=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set has an empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value '{raw}' is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_explain(exc, f"'{path}'")) from None
