"""Choose the student before training: estimated device latency, FPS, memory and engine size per candidate.

Every device figure here is an **estimate**. The model is a per-layer roofline: each convolution / linear /
pooling kernel takes ``max(FLOPs / (a * peak), bytes / (b * bandwidth))`` plus a fixed launch overhead ``c``,
summed over the network. Peaks and bandwidth are the board's data-sheet figures (``edgerun.profiles``,
``gpu``); the three efficiency factors ``a, b, c`` are fitted per board to published TensorRT measurements of
real boards (``planner_calibration.csv``, each row with its source and conditions). A board without published
points borrows the factors of its nearest calibrated relative and says so. ``--measured`` bench files from a
real device rescale the factors for that board, saved in the user's cache (never in the package).

FLOPs come from PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``), which counts a
multiply-accumulate as 2 FLOPs; tables print MACs (= FLOPs / 2), the unit most papers mean by "FLOPs".
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from edgerun.profiles import get_target

from .errors import EdgedistillError
from .models import count_params, create_model

log = logging.getLogger(__name__)

CALIBRATION_FILE = Path(__file__).with_name("planner_calibration.csv")
# Edge-friendly timm models and torchvision's SqueezeNets, smallest first.
DEFAULT_CANDIDATES = (
    "mobilenetv3_small_050", "mobilenetv3_small_075", "lcnet_100", "squeezenet1_1", "mobilenetv3_small_100",
    "mobilenetv2_050", "mobilenetv2_100", "ghostnet_100", "mnasnet_100", "mobilenetv3_large_100",
    "efficientnet_lite0", "mobilenetv2_140", "resnet10t", "efficientnet_b0", "resnet18", "resnet34",
    "efficientnet_b1", "resnet50",
)
# ImageNet-1k top-1 (%) published by timm, results/results-imagenet.csv of huggingface/pytorch-image-models
# (commit 0173a139), for the weights named; the planner ranks by it and says when a model has none.
TIMM_TOP1 = {
    "mobilenetv3_small_050": (57.910, "lamb_in1k"), "mobilenetv3_small_075": (65.234, "lamb_in1k"),
    "mobilenetv3_small_100": (67.656, "lamb_in1k"), "mobilenetv3_large_100": (75.766, "ra_in1k"),
    "mobilenetv2_050": (65.950, "lamb_in1k"), "mobilenetv2_100": (72.976, "ra_in1k"),
    "mobilenetv2_140": (76.520, "ra_in1k"), "lcnet_100": (72.096, "ra2_in1k"), "ghostnet_100": (73.982, "in1k"),
    "mnasnet_100": (74.650, "rmsp_in1k"), "efficientnet_lite0": (75.480, "ra_in1k"),
    "efficientnet_b0": (77.694, "ra_in1k"), "efficientnet_b1": (78.800, "ft_in1k"),
    "resnet10t": (68.358, "c3_in1k"), "resnet18": (69.760, "tv_in1k"), "resnet34": (74.578, "gluon_in1k"),
    "resnet50": (76.130, "tv_in1k"), "resnet101": (77.376, "tv_in1k"), "resnet152": (78.322, "tv_in1k"),
    "densenet121": (74.764, "tv_in1k"),
}
# Boards without published points use the factors of a calibrated relative (same GPU generation or family).
BORROW = {"jetson-nano-2gb-jp4": "jetson-nano-jp4", "jetson-tx2-jp4": "jetson-nano-jp4",
          "xavier-nx-jp5": "agx-xavier-jp5", "jetson-orin-nano-jp6": "agx-xavier-jp5",
          "orin-nx-jp6": "agx-xavier-jp5", "agx-orin-jp6": "agx-xavier-jp5"}
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
# What a TensorRT process holds before any model: CUDA context, TensorRT and its kernels. An ASSUMPTION, not a
# measurement (no published per-board figure was found); `--measured` bench files replace it per board.
RUNTIME_BASE_MB = 300.0
MARGIN = 0.2  # the recommendation keeps 20% headroom on FPS and memory


@dataclass
class Layer:
    kind: str  # conv | dwconv (grouped) | linear | pool | other
    flops: float
    in_elems: int
    out_elems: int
    weight_elems: int


@dataclass
class ModelProfile:
    model: str
    image_size: int
    params: int
    flops: float  # per image, FLOPs (2 x MACs), PyTorch's FlopCounterMode
    layers: list = field(default_factory=list)
    activation_peak_elems: int = 0

    @property
    def macs(self) -> float:
        return self.flops / 2


def build_architecture(name: str, num_classes: int = 1000, framework: str = "auto") -> nn.Module:
    """An untrained network of that name (nothing downloaded): torchvision for the calibration rows and the
    SqueezeNets, timm otherwise."""
    import torchvision

    if framework == "torchvision" or (framework == "auto" and name.startswith("squeezenet")):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    from .recipe import ModelConfig

    return create_model(ModelConfig(model=name), num_classes)


@lru_cache(maxsize=128)
def profile_model(name: str, image_size: int = 224, framework: str = "auto", num_classes: int = 1000) -> ModelProfile:
    """Parameters, FLOPs and the per-kernel costs the roofline needs, from one forward pass at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_architecture(name, num_classes, framework).eval()
    records = []

    def hook(module, inputs, output):
        out = output if torch.is_tensor(output) else output[0]
        records.append((module, int(inputs[0].numel()), int(out.numel())))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                 nn.AdaptiveMaxPool2d))]
    names = {m: n for n, m in model.named_modules()}
    root = type(model).__name__
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    total = float(counter.get_total_flops())
    layers, counted = [], 0.0
    for module, n_in, n_out in records:
        key = f"{root}.{names[module]}" if names[module] else root
        flops = float(sum(counts.get(key, {}).values())) if isinstance(module, (nn.Conv2d, nn.Linear)) else 0.0
        if isinstance(module, nn.Conv2d):
            kind = "dwconv" if module.groups > 1 else "conv"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        else:
            kind, flops = "pool", float(n_in)  # one add or compare per input element
        weight = sum(p.numel() for p in module.parameters(recurse=False))
        counted += flops if kind != "pool" else 0.0
        layers.append(Layer(kind, flops, n_in, n_out, int(weight)))
    rest = max(total - counted, 0.0)  # attention matmuls and other ops outside conv/linear modules
    if rest > 0.01 * total:
        layers.append(Layer("other", rest, 0, 0, 0))
    peak = max((lay.in_elems + lay.out_elems for lay in layers), default=0)
    return ModelProfile(name, image_size, count_params(model), total, layers, peak)


@dataclass
class Factors:
    board: str  # the board whose points were fitted
    compute: float  # a: fraction of peak FLOPs reached by dense kernels
    memory: float  # b: fraction of peak bandwidth reached
    overhead_ms: float  # c: fixed cost per kernel
    scale: float = 1.0  # measured / estimated latency on the user's own board (--measured), geometric mean
    runtime_base_mb: float = RUNTIME_BASE_MB
    source: str = "published"
    # a_dw: fraction of the CUDA-core peak reached by depthwise (grouped) convolutions, fitted where the board has
    # published depthwise models; None: the dense factor ``compute`` stands in (the planner before depthwise points)
    depthwise: Optional[float] = None
    # c_dw: the fixed cost of a depthwise kernel (TensorRT fuses them with their pointwise neighbours differently
    # from dense convolutions); None: ``overhead_ms``
    depthwise_overhead_ms: Optional[float] = None


def _peaks(target: dict, precision: str) -> tuple[float, float, float]:
    """(dense GFLOPS, grouped-conv GFLOPS, GB/s) of the board at a precision."""
    gpu = target.get("gpu")
    if not gpu:
        raise EdgedistillError(f"target '{target['name']}' is not a Jetson profile with GPU facts; the planner "
                               "estimates TensorRT on Jetson boards (see edgerun/profiles.py)")
    if precision == "fp32":
        return gpu["fp32_gflops"], gpu["fp32_gflops"], gpu["memory_gbps"]
    cuda16 = gpu["fp16_cuda_gflops"]
    if precision == "fp16":
        return gpu["fp16_tensor_gflops"] or cuda16, cuda16, gpu["memory_gbps"]
    if precision == "int8":
        if not target.get("fast_int8"):
            raise EdgedistillError(f"{target['device']} has no fast INT8 path (TensorRT runs INT8 slower than FP16 "
                                   "there); plan with --precision fp16")
        return gpu["int8_tensor_gops"], cuda16, gpu["memory_gbps"]
    raise EdgedistillError(f"precision '{precision}': choose fp32, fp16 or int8")


def _arrays(profile: ModelProfile) -> dict:
    """The profile's layers as numpy columns (cached on the profile): the fit evaluates them thousands of times."""
    cached = getattr(profile, "_arrays", None)
    if cached is None:
        lay = profile.layers
        cached = {"flops": np.array([x.flops for x in lay]), "act": np.array([x.in_elems + x.out_elems for x in lay],
                                                                              dtype=float),
                  "weights": np.array([x.weight_elems for x in lay], dtype=float),
                  "grouped": np.array([x.kind in ("dwconv", "pool") for x in lay]),
                  "dw": np.array([x.kind == "dwconv" for x in lay]),
                  "kernels": sum(x.kind not in ("other", "dwconv") for x in lay),
                  "dw_kernels": sum(x.kind == "dwconv" for x in lay)}
        object.__setattr__(profile, "_arrays", cached)
    return cached


def layer_times_ms(profile: ModelProfile, target: dict, precision: str, batch: int, factors: Factors) -> float:
    """Estimated model latency (ms per batch): per-kernel roofline plus launch overhead, times the user's scale."""
    dense, grouped, bandwidth = _peaks(target, precision)
    a = _arrays(profile)
    nbytes = BYTES[precision]
    peak = np.where(a["grouped"], grouped, dense)
    efficiency = np.where(a["dw"], factors.depthwise or factors.compute, factors.compute)
    compute_ms = a["flops"] * batch / (efficiency * peak * 1e9) * 1e3
    memory_ms = (a["act"] * batch + a["weights"]) * nbytes / (factors.memory * bandwidth * 1e9) * 1e3
    dw_overhead = factors.overhead_ms if factors.depthwise_overhead_ms is None else factors.depthwise_overhead_ms
    total = (float(np.maximum(compute_ms, memory_ms).sum()) + factors.overhead_ms * a["kernels"]
             + dw_overhead * a["dw_kernels"])
    return total * factors.scale


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class CalibrationPoint:
    board: str
    model: str
    framework: str
    precision: str
    image_size: int
    batch: int
    fps: float
    latency_ms: float
    source: str
    conditions: str


def load_calibration(path: Path = CALIBRATION_FILE) -> list[CalibrationPoint]:
    with open(path, newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        return [CalibrationPoint(r["board"], r["model"], r["framework"], r["precision"], int(r["image_size"]),
                                 int(r["batch"]), float(r["fps"]), float(r["latency_ms"]), r["source"],
                                 r["conditions"]) for r in rows]


def fit_factors(points: Sequence[CalibrationPoint], board: str) -> Factors:
    """Least squares on log latency (relative error) over one board's published points."""
    from scipy.optimize import least_squares

    target = get_target(board)
    profiles = [(profile_model(p.model, p.image_size, p.framework), p) for p in points]
    if len(profiles) < 3:
        raise EdgedistillError(f"{board}: {len(profiles)} calibration points; three factors need at least 3")

    depthwise = any(_arrays(prof)["dw"].any() for prof, _ in profiles)  # a fourth factor only with its evidence

    def factors(x):
        v = [float(c) for c in np.exp(x)]
        return Factors(board, *v[:3], depthwise=v[3] if depthwise else None,
                       depthwise_overhead_ms=v[4] if depthwise else None)

    def residuals(x):
        f = factors(x)
        return [math.log(layer_times_ms(prof, target, p.precision, p.batch, f) / p.latency_ms) for prof, p in profiles]

    best = None
    for start in ([0.5, 0.5, 0.05, 0.3, 0.02], [0.2, 0.8, 0.01, 0.1, 0.005], [0.8, 0.2, 0.2, 0.6, 0.05]):
        fit = least_squares(residuals, np.log(start[:5 if depthwise else 3]), method="trf")
        if best is None or fit.cost < best.cost:
            best = fit
    return factors(best.x)


FAMILIES = ("alexnet", "squeezenet", "resnet", "densenet", "vgg", "mobilenet", "shufflenet", "mnasnet",
            "efficientnet", "ghostnet", "lcnet")


def family(model: str) -> str:
    """The architecture family of a calibration model (resnet50 -> resnet, vgg16_bn -> vgg, mnasnet0_5 -> mnasnet):
    what leave-one-family-out holds out together, since a family's members share their kernels' shapes."""
    for name in FAMILIES:
        if model.startswith(name):
            return name
    return model


def _held_out(points: Sequence[CalibrationPoint], group, dense_only: bool = False, sort: bool = False) -> list[dict]:
    """For each board and each group of its points (``group(point)``): the group's points estimated by factors
    fitted on the board's other points (``dense_only``: only those without depthwise convolutions), with the
    relative error."""
    out = []
    for board in sorted({p.board for p in points}):
        mine = [p for p in points if p.board == board]
        target = get_target(board)
        keys = list(dict.fromkeys(group(p) for p in mine))
        for key in sorted(keys) if sort else keys:
            train = [p for p in mine if group(p) != key]
            if dense_only:
                train = [p for p in train if not _arrays(profile_model(p.model, p.image_size, p.framework))["dw"].any()]
            f = fit_factors(train, board)
            for p in (p for p in mine if group(p) == key):
                prof = profile_model(p.model, p.image_size, p.framework)
                est = layer_times_ms(prof, target, p.precision, p.batch, f)
                out.append({"board": board, "family": family(p.model), "model": p.model, "precision": p.precision,
                            "depthwise": bool(_arrays(prof)["dw"].any()), "published_ms": p.latency_ms,
                            "estimated_ms": est, "relative_error": (est - p.latency_ms) / p.latency_ms})
    return out


def leave_one_out(points: Sequence[CalibrationPoint]) -> list[dict]:
    """For each published point: the estimate from factors fitted without it, and the relative error."""
    return _held_out(points, id)


def leave_one_family_out(points: Sequence[CalibrationPoint], dense_only: bool = False) -> list[dict]:
    """For each board and architecture family: the family's points estimated by factors fitted on the other
    families alone (``dense_only``: on the families without depthwise convolutions, as the planner was calibrated
    before depthwise points), with the relative error."""
    return _held_out(points, lambda p: family(p.model), dense_only, sort=True)


def _cache_dir() -> Path:
    from .data import cache_root

    return cache_root() / "planner"


@lru_cache(maxsize=16)
def _published_factors(board: str) -> Factors:
    """The fit on the board's published points; cached on disk by the table's and this module's content and the
    torch version (the fit profiles every calibration network, ~10 s)."""
    import hashlib

    key = hashlib.sha256(CALIBRATION_FILE.read_bytes() + Path(__file__).read_bytes()
                         + torch.__version__.encode()).hexdigest()[:16]
    cached = _cache_dir() / f"fit-{board}-{key}.json"
    if cached.exists():
        try:
            return Factors(**json.loads(cached.read_text()))
        except (ValueError, TypeError):
            log.warning("planner: ignoring an unreadable fit cache %s", cached)
    factors = fit_factors([p for p in load_calibration() if p.board == board], board)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(factors)))
    tmp.replace(cached)
    return factors


def factors_for(board: str, use_measured: bool = True) -> Factors:
    """The board's fitted factors (or a calibrated relative's), with the user's measured rescaling if saved."""
    get_target(board)  # an unknown name fails here, with the closest profile named
    calibrated = {p.board for p in load_calibration()}
    source_board = board if board in calibrated else BORROW.get(board)
    if source_board not in calibrated:
        raise EdgedistillError(f"no calibration for '{board}' or a relative of it; add published points to "
                               f"{CALIBRATION_FILE.name} or pass --measured bench files")
    f = _published_factors(source_board)
    f = Factors(**{**asdict(f), "source": "published" if source_board == board else
                   f"borrowed from {source_board} (uncalibrated for this board)"})
    if f.depthwise is None:  # no published depthwise model on this board: a calibrated board's dw/dense ratio
        donor = next((b for b in sorted(calibrated) if _published_factors(b).depthwise is not None), None)
        if donor is not None:
            d = _published_factors(donor)
            f.depthwise = f.compute * d.depthwise / d.compute
            f.depthwise_overhead_ms = f.overhead_ms * d.depthwise_overhead_ms / d.overhead_ms
            f.source += (f"; depthwise factors from {donor}'s ratios to its dense ones (efficiency "
                         f"{d.depthwise / d.compute:.2f}x, per-kernel cost {d.depthwise_overhead_ms / d.overhead_ms:.2f}x)")
    saved = _cache_dir() / f"{board}.json"
    if use_measured and saved.exists():
        data = json.loads(saved.read_text())
        f.scale, f.runtime_base_mb = float(data["scale"]), float(data["runtime_base_mb"])
        f.source += f"; rescaled by {data['points']} measurement(s) of yours ({saved})"
    return f


# ------------------------------------------------------------------------------------------------ estimates
@dataclass
class Estimate:
    model: str
    role: str
    params: int
    flops: float
    macs: float
    top1: Optional[float]
    top1_source: str
    est_latency_ms: float
    est_fps: float
    est_memory_mb: float
    est_engine_mb: float
    fits: bool
    reason: str
    with_margin: bool = False


def model_memory_mb(prof: ModelProfile, precision: str, batch: int) -> tuple[float, float]:
    """(engine, activations) in MB, ESTIMATES: the weights plus ~5% engine metadata; the largest layer's input and
    output at the batch, double-buffered. The process adds the runtime's base memory on top."""
    engine_mb = prof.params * BYTES[precision] * 1.05 / 2 ** 20
    activations_mb = prof.activation_peak_elems * batch * BYTES[precision] * 2 / 2 ** 20
    return engine_mb, activations_mb


def top1_of(name: str) -> tuple[Optional[float], str]:
    if name in TIMM_TOP1:
        value, tag = TIMM_TOP1[name]
        return value, f"timm results-imagenet.csv ({name}.{tag})"
    if name.startswith("squeezenet"):
        import torchvision

        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        return weights.meta["_metrics"]["ImageNet-1K"]["acc@1"], "torchvision weights metadata"
    return None, "none published here: ranked by parameters"


def estimate(name: str, target_name: str, precision: str = "fp16", image_size: int = 224, batch: int = 1,
             fps_target: Optional[float] = None, budget_mb: Optional[float] = None, role: str = "candidate",
             factors: Optional[Factors] = None, num_classes: int = 1000) -> Estimate:
    target = get_target(target_name)
    factors = factors or factors_for(target_name)
    prof = profile_model(name, image_size, num_classes=num_classes)
    latency = layer_times_ms(prof, target, precision, batch, factors)
    fps = batch * 1000.0 / latency
    engine_mb, activations_mb = model_memory_mb(prof, precision, batch)
    memory = factors.runtime_base_mb + engine_mb + activations_mb
    problems, tight = [], []
    if fps_target:
        if fps < fps_target:
            problems.append(f"FPS {fps:.1f} < {fps_target:g}")
        elif fps < fps_target * (1 + MARGIN):
            tight.append("FPS within 20% of target")
    if budget_mb:
        if memory > budget_mb:
            problems.append(f"memory {memory:.0f} MB > {budget_mb:g} MB")
        elif memory > budget_mb / (1 + MARGIN):
            tight.append("memory within 20% of budget")
    if target.get("memory_mb") and memory > target["memory_mb"]:
        problems.append(f"memory {memory:.0f} MB > the board's {target['memory_mb']} MB")
    top1, source = top1_of(name)
    reason = "; ".join(problems) if problems else ("fits, but " + ", ".join(tight) if tight else "fits with margin")
    return Estimate(name, role, prof.params, prof.flops, prof.macs, top1, source, latency, fps, memory, engine_mb,
                    not problems, reason, with_margin=not problems and not tight)


def plan(target_name: str, candidates: Iterable[str] = DEFAULT_CANDIDATES, precision: str = "fp16",
         image_size: int = 224, batch: int = 1, fps_target: Optional[float] = None, budget_mb: Optional[float] = None,
         teacher: Optional[str] = None) -> dict:
    factors = factors_for(target_name)
    rows = [estimate(c, target_name, precision, image_size, batch, fps_target, budget_mb, factors=factors)
            for c in dict.fromkeys(candidates)]
    rows.sort(key=lambda e: (e.top1 if e.top1 is not None else -1, e.params), reverse=True)
    recommended = next((e for e in rows if e.with_margin), None)
    teacher_row = (estimate(teacher, target_name, precision, image_size, batch, fps_target, budget_mb, role="teacher",
                            factors=factors) if teacher else None)
    return {"target": target_name, "device": get_target(target_name)["device"], "precision": precision,
            "image_size": image_size, "batch": batch, "fps_target": fps_target, "budget_mb": budget_mb,
            "factors": asdict(factors), "rows": rows, "teacher": teacher_row,
            "recommended": recommended.model if recommended else None}


def _has_grouped(e, image_size: int) -> bool:
    e = e if isinstance(e, dict) else asdict(e)
    return any(lay.kind == "dwconv" for lay in profile_model(e["model"], image_size).layers)


def format_plan(result: dict, loo: Optional[list] = None) -> str:
    head = (f"plan for {result['device']} ({result['target']}), {result['precision'].upper()}, "
            f"{result['image_size']} px, batch {result['batch']}"
            + (f", target {result['fps_target']:g} FPS" if result["fps_target"] else "")
            + (f", budget {result['budget_mb']:g} MB" if result["budget_mb"] else ""))
    f = result["factors"]
    lines = [head, "every device figure is an ESTIMATE (roofline fitted to published measurements; "
             f"factors {f['source']}; runtime base {f['runtime_base_mb']:.0f} MB"
             + (" assumed" if f["runtime_base_mb"] == RUNTIME_BASE_MB else "") + ")", ""]
    header = f"{'model':24} {'top-1':>6} {'params':>7} {'GMACs':>6} {'est ms':>7} {'est FPS':>8} {'est MB':>7} " \
             f"{'engine MB':>9}  verdict"
    lines += [header, "-" * len(header)]
    rows = list(result["rows"]) + ([result["teacher"]] if result["teacher"] else [])
    for e in rows:
        e = e if isinstance(e, dict) else asdict(e)
        mark = "*" if e["model"] == result["recommended"] else " "
        top1 = f"{e['top1']:.1f}" if e["top1"] is not None else "-"
        label = e["model"] + (" (teacher)" if e["role"] == "teacher" else "")
        lines.append(f"{mark}{label:23} {top1:>6} {e['params'] / 1e6:6.2f}M {e['macs'] / 1e9:6.2f} "
                     f"{e['est_latency_ms']:7.2f} {e['est_fps']:8.1f} {e['est_memory_mb']:7.0f} "
                     f"{e['est_engine_mb']:9.1f}  {e['reason']}")
    lines.append("")
    if result["recommended"]:
        lines.append(f"recommended student: {result['recommended']} (the most accurate candidate that keeps 20% "
                     "headroom on FPS and memory; a much smaller student loses more than distillation recovers)")
    else:
        lines.append("no candidate keeps 20% headroom: lower the image size, use a faster precision, or raise the "
                     "budget")
    if loo:
        errors = [abs(r["relative_error"]) for r in loo if r["board"] == f["board"]]
        if errors:
            lines.append(f"planner error on {f['board']}'s {len(errors)} published points (leave-one-out): median "
                         f"{np.median(errors) * 100:.0f}%, max {max(errors) * 100:.0f}%")
    if any(_has_grouped(e, result["image_size"]) for e in rows):
        lines.append("the published points are dense CNNs (ResNet, DenseNet, VGG, SqueezeNet, AlexNet): figures for "
                     "depthwise-separable models (MobileNet, EfficientNet, ...) are extrapolated; check the chosen one "
                     "with `edgerun bench --json` and `edgedistill plan --measured`")
    lines.append("top-1: ImageNet-1k as published (timm's results table, torchvision's weights metadata), not on "
                 "your data nor on your metric (an inspection line judges recall at a false-reject rate or balanced "
                 "accuracy: distill the shortlisted students and compare them on it); MACs = FLOPs / 2")
    return "\n".join(lines)


def recipe_estimate(recipe, num_classes: int) -> Optional[dict[str, Any]]:
    """The planner's ESTIMATE of teacher and student on the export target (Jetson targets only), or None."""
    target = get_target(recipe.export.target)
    if not target.get("gpu"):
        return None
    try:
        out = {"target": recipe.export.target, "device": target["device"], "precision": "fp16",
               "image_size": recipe.data.image_size, "label": "estimate (edgedistill plan), not a measurement"}
        for role, cfg in (("teacher", recipe.teacher), ("student", recipe.student)):
            e = estimate(cfg.model, recipe.export.target, "fp16", recipe.data.image_size, num_classes=num_classes)
            out[role] = {"model": cfg.model, "est_latency_ms": e.est_latency_ms, "est_fps": e.est_fps,
                         "est_memory_mb": e.est_memory_mb}
        return out
    except EdgedistillError as exc:
        log.warning("evaluate: no device estimate for %s: %s", recipe.export.target, exc)
        return None


def device_check(est: Optional[dict[str, Any]], recipe, num_classes: int, keep: int = 3) -> Optional[dict[str, Any]]:
    """Is the student faster than its teacher on the export target (by the planner's ESTIMATE)? When it is not, the
    planner's candidates estimated at least 20% faster than the teacher there, by published top-1 (the models a
    user could distill into instead). None without a device estimate."""
    if not est:
        return None
    teacher_fps, student_fps = est["teacher"]["est_fps"], est["student"]["est_fps"]
    out = {"device": est["device"], "target": est["target"], "teacher_fps": teacher_fps, "student_fps": student_fps,
           "speedup": student_fps / teacher_fps, "student_faster": student_fps > teacher_fps,
           "label": "estimate (edgedistill plan), not a measurement"}
    if student_fps <= teacher_fps:
        factors = factors_for(recipe.export.target)
        rows = []
        for name in DEFAULT_CANDIDATES:
            if name in (recipe.teacher.model, recipe.student.model):
                continue
            try:
                e = estimate(name, recipe.export.target, "fp16", recipe.data.image_size, factors=factors,
                             num_classes=num_classes)
            except RuntimeError as exc:  # a model whose pooling cannot take an image this small
                log.debug("device check: %s skipped at %d px (%s)", name, recipe.data.image_size, exc)
                continue
            if e.est_fps >= teacher_fps * (1 + MARGIN):
                rows.append(e)
        rows.sort(key=lambda e: (e.top1 if e.top1 is not None else -1, -e.params), reverse=True)
        out["faster_candidates"] = [{"model": e.model, "est_fps": e.est_fps, "top1": e.top1} for e in rows[:keep]]
    return out


# ---------------------------------------------------------------------------------------------- measured
def model_latency_ms(bench_result: dict) -> float:
    """The model's share of an `edgerun bench` frame (host->device, compute, device->host): what the planner
    estimates, without the camera-frame preprocessing and postprocessing around it."""
    stages = bench_result.get("stages_ms") or {}
    return sum(stages.get(k) or 0.0 for k in ("h2d", "compute", "d2h"))


def read_bench(path: str | Path) -> dict:
    """The facts the planner needs from an `edgerun bench --json` file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"--measured {path}: not a readable JSON file ({exc})")
    result, bundle = data.get("result") or {}, data.get("bundle") or {}
    missing = [k for k in ("model", "input_shape") if k not in bundle] + \
              [k for k in ("stages_ms", "batch") if k not in result]
    if missing:
        raise EdgedistillError(f"--measured {path}: missing {missing}; write it with `edgerun bench BUNDLE --engine "
                               "E --json FILE` from this version of edgerun")
    precision = (data.get("engine") or {}).get("precision")
    if not precision:
        raise EdgedistillError(f"--measured {path}: not a TensorRT run (no engine precision); bench with --engine")
    memory = (result.get("memory") or {}).get("total_mb")
    return {"path": str(path), "model": bundle["model"], "image_size": int(bundle["input_shape"][-1]),
            "batch": int(result["batch"]), "precision": precision, "latency_ms": model_latency_ms(result),
            "memory_mb": memory,
            "board": data.get("board")}


def refit_from_measured(target_name: str, paths: Sequence[str | Path], save: bool = True) -> dict:
    """Scale the board's latency factors by the geometric mean of measured / estimated, and set the runtime
    base from measured memory; saved in the user's cache. Returns measured-vs-estimated rows."""
    base = factors_for(target_name, use_measured=False)
    target = get_target(target_name)
    rows, ratios, bases = [], [], []
    for path in paths:
        m = read_bench(path)
        prof = profile_model(m["model"], m["image_size"])
        est = layer_times_ms(prof, target, m["precision"], m["batch"], base)
        ratios.append(m["latency_ms"] / est)
        if m["memory_mb"]:
            bases.append(m["memory_mb"] - sum(model_memory_mb(prof, m["precision"], m["batch"])))
        rows.append(dict(m, estimated_ms=est, ratio=m["latency_ms"] / est))
    scale = float(np.exp(np.mean(np.log(ratios))))
    runtime_base = float(np.median(bases)) if bases else base.runtime_base_mb
    saved = _cache_dir() / f"{target_name}.json"
    if save:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"scale": scale, "runtime_base_mb": runtime_base, "points": len(rows),
                                     "files": [r["path"] for r in rows]}, indent=2))
    return {"rows": rows, "scale": scale, "runtime_base_mb": runtime_base, "saved": str(saved) if save else None}


def format_measured(refit: dict) -> str:
    lines = [f"{'bench file':32} {'model':22} {'prec':5} {'measured ms':>11} {'estimated ms':>12} {'ratio':>6}"]
    for r in refit["rows"]:
        lines.append(f"{Path(r['path']).name[:32]:32} {r['model'][:22]:22} {r['precision']:5} {r['latency_ms']:11.2f} "
                     f"{r['estimated_ms']:12.2f} {r['ratio']:6.2f}")
    lines.append(f"latency scale for this board: x{refit['scale']:.2f} (geometric mean); runtime base "
                 f"{refit['runtime_base_mb']:.0f} MB" + (f"; saved to {refit['saved']}" if refit["saved"] else ""))
    return "\n".join(lines)


def check_names(names: Sequence[str]) -> None:
    """Every name must be a timm model or a torchvision SqueezeNet, before any slow work starts."""
    from .errors import RecipeError
    from .models import check_model_name

    for name in names:
        try:
            check_model_name(name)
        except RecipeError as exc:
            raise EdgedistillError(f"--candidates/--teacher: {exc}") from exc


def plan_command(args) -> int:
    """`edgedistill plan`: the table, the recommendation, the planner's own error; --json and --measured."""
    if args.image_size < 32 or args.batch < 1:
        raise EdgedistillError("--image-size must be at least 32 and --batch at least 1")
    if args.measured:
        print(format_measured(refit_from_measured(args.target, args.measured)))
        print()
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else DEFAULT_CANDIDATES
    check_names(list(candidates) + ([args.teacher] if args.teacher else []))
    result = plan(args.target, candidates, args.precision, args.image_size, args.batch, args.fps_target,
                  args.budget_mb, args.teacher)
    board = result["factors"]["board"]
    loo = leave_one_out([p for p in load_calibration() if p.board == board])
    print(format_plan(result, loo))
    if args.json:
        keys = ("model", "role", "params", "flops", "macs", "top1", "est_latency_ms", "est_fps", "est_memory_mb",
                "est_engine_mb", "fits", "reason")
        rows = list(result["rows"]) + ([result["teacher"]] if result["teacher"] else [])
        Path(args.json).write_text(json.dumps([{k: asdict(e)[k] for k in keys} for e in rows], indent=2))
    return 0
