"""The recipe's sections for how a run is judged and shipped: the metric and operating point, host latency and
serving cost (``evaluate``), and the bundle (``export``: target, ONNX, INT8, DeepStream)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from edgedistill.recipe.sections import Strict


def check_deepstream_source(source: str) -> str:
    """export.deepstream_source as deepstream-app's [source0] can take it: no line break or control character (it
    would inject groups into the app config), and csi://N, usb://N, /dev/videoN with a whole number N."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in source):
        raise ValueError(f"{source!r} holds a line break or control character: give one camera or file")
    for prefix in ("csi://", "usb://", "/dev/video"):
        number = source[len(prefix) :] if source.startswith(prefix) else None
        if number is not None and number != "" and not (number.isascii() and number.isdigit()):
            raise ValueError(f"{source!r}: the camera number must be a whole number (csi://0, usb://1, /dev/video0)")
    return source


class CostConfig(Strict):
    """Serving cost per month: instances needed for the request volume, times their hourly price."""

    requests_per_month: float = Field(gt=0)
    price_per_hour: float = Field(gt=0, description="hourly price of the instance serving the teacher")
    student_price_per_hour: Optional[float] = Field(None, gt=0, description="default: price_per_hour")
    utilization: float = Field(0.5, gt=0, le=1, description="target busy fraction of each instance")
    distillation_cost: Optional[float] = Field(
        None, ge=0, description="what the distillation work cost (people, compute), for the payback time"
    )


class OperatingPointConfig(Strict):
    """Where the line rejects: the positive-class score threshold for a recall, or for a false-reject limit."""

    target_recall: Optional[float] = Field(
        None, gt=0, le=1, description="reject at least this share of positive (defective) images"
    )
    max_false_reject: Optional[float] = Field(
        None, ge=0, lt=1, description="reject at most this share of negative (good) images"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "OperatingPointConfig":
        if (self.target_recall is None) == (self.max_false_reject is None):
            raise ValueError(
                "evaluate.operating_point takes exactly one of target_recall (e.g. 0.95) or "
                "max_false_reject (e.g. 0.05)"
            )
        return self


class EvaluateConfig(Strict):
    metric: Optional[Literal["top1", "balanced_accuracy", "macro_f1", "recall_at_false_reject"]] = Field(
        None,
        description="what retention, KD gain and the verdict are measured on; default: balanced_accuracy when "
        "the largest training class has more than 1.5x the images of the smallest, else top1",
    )
    positive_class: Optional[str] = Field(
        None, description="the class whose recall matters (a defect); default for two classes: the minority one"
    )
    operating_point: Optional[OperatingPointConfig] = Field(
        None,
        description="pick the positive-class threshold on held-out images (data.calib_dir, val/ when a test "
        "split is reported, else data.calib_fraction of train) and report recall and false-reject "
        "rate there; carried to the device in the bundle",
    )
    threshold_confidence: Optional[float] = Field(
        0.95,
        gt=0,
        lt=1,
        description="every threshold picked on calibration images holds its target (recall, or the false-reject "
        "limit) on new images with this confidence (a Clopper-Pearson bound on the calibration counts); null: "
        "the calibration images' own quantile, a point estimate that misses about half the time",
    )
    latency_batch: int = Field(8, ge=1)
    latency_repeats: int = Field(20, ge=3)
    latency_warmup: int = Field(3, ge=0)
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads for the latency runs")
    min_kd_gain: float = Field(0.005, description="KD gain under this (a fraction, 0.005 = 0.5 points) is flagged")
    cost: Optional[CostConfig] = None


class ExportConfig(Strict):
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
    val_samples: int = Field(
        300, ge=1, description="check images in the bundle (val.npz), from the evaluation split, apart from the gate's"
    )
    gate_samples: int = Field(
        1000,
        ge=1,
        description="images of the evaluation split the INT8 gate chooses the variant on, apart from the bundle's "
        "check images (a split smaller than both is shared: at most half for the check images)",
    )
    int8: Literal["auto", "ptq", "partial", "qad", "off"] = Field(
        "auto",
        description="the INT8 model (explicit Q/DQ by TensorRT's rules, one for every TensorRT): ptq "
        "(post-training), partial (PTQ, then the most sensitive layers kept in FP16 until the gate "
        "passes), qad (quantization-aware distillation against the FP32 teacher), auto (ptq, then "
        "partial, then qad, until one passes), off; true/false mean auto/off",
    )
    int8_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="activation calibration")
    int8_max_drop: float = Field(
        0.01,
        ge=0,
        description="the INT8 gate (0.01 = 1 point): with the line's reject threshold, the most the upper 95% "
        "bound of the recall drop and of the false-reject rise may reach (each variant at its own threshold); "
        "else the most top-1 (R² for regression) may drop on the gate's images",
    )
    int8_keep_budget: int = Field(8, ge=1, description="partial: at most this many layers kept out of INT8")
    int8_sensitivity_images: int = Field(
        256, ge=16, description="calibration images the layer sensitivity is measured on"
    )
    qad_epochs: int = Field(2, ge=1, description="quantization-aware distillation: epochs of fine-tuning")
    qad_lr: float = Field(
        1e-4, gt=0, description="quantization-aware distillation: learning rate (no warm-up, cosine decay)"
    )
    qad_teacher: Literal["teacher", "student"] = Field(
        "student",
        description="whom the fake-quantized student learns from: the FP32 student itself (its own weights before "
        "quantization: QAD recovers what quantization lost), or the run's FP32 teacher (retraining: the student "
        "may change, reported as such)",
    )
    deepstream: bool = Field(
        True,
        description="also write deepstream/ in the bundle: nvinfer and deepstream-app "
        "configs for DeepStream 6.0 and 7.x, labels, the model with a "
        "Softmax; the host top-1 under DeepStream's preprocessing",
    )
    input: Literal["float", "uint8"] = Field(
        "float",
        description="the DeepStream model's input: float (nvinfer normalizes with net-scale-factor and "
        "offsets, exact only when data.std is one value for all channels) or uint8 (raw pixel "
        "values in, the recipe's normalization folded into the graph: exact for any std; the "
        "tensor stays float32, as nvinfer feeds it)",
    )
    deepstream_source: str = Field(
        "csi://0",
        description="deepstream-app's [source0]: csi://N, usb://N, "
        "/dev/videoN, rtsp://..., or a video file on the device",
    )
    deepstream_camera: str = Field("1280x720@30", description="the camera's WIDTHxHEIGHT@FPS for deepstream-app")

    @field_validator("deepstream_source")
    @classmethod
    def _source(cls, value: str) -> str:
        return check_deepstream_source(value)

    @field_validator("int8", mode="before")
    @classmethod
    def _bool_int8(cls, value: Any) -> Any:
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value


class MlflowConfig(Strict):
    """Where a run is tracked: an MLflow tracking server, database or folder, and the experiment."""

    uri: Optional[str] = Field(
        None,
        description="http(s)://host:port of a tracking server, sqlite:///file.db, or a folder; default "
        "$MLFLOW_TRACKING_URI",
    )
    experiment: Optional[str] = Field(None, description="the MLflow experiment; default the recipe's name")


class TrackingConfig(Strict):
    """Runs a team can find again (the [tracking] extra). Off unless ``tracking.mlflow`` is set or
    $MLFLOW_TRACKING_URI is; a tracking server that is down or refuses a write costs a warning, never the run."""

    mlflow: Optional[MlflowConfig] = Field(
        None, description="one parent MLflow run per run folder, a nested run per stage (edgedistill.run.tracking)"
    )
