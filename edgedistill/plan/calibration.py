"""The planner's factors: fitted per board to the published TensorRT figures of ``planner_calibration.csv`` (each row
with its source and conditions), held-out errors (leave one out, leave one family out), a calibrated relative's
factors for a board without points, and the user's own ``edgerun bench --json`` measurements rescaling a board
(saved in the user's cache, never in the package).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgedistill.errors import EdgedistillError
from edgedistill.plan.profile import profile_model
from edgedistill.plan.roofline import Factors, _arrays, layer_times_ms, model_memory_mb
from edgerun.profiles import get_target

log = logging.getLogger(__name__)


CALIBRATION_FILE = Path(__file__).with_name("planner_calibration.csv")

# Boards without published points use the factors of a calibrated relative (same GPU generation or family).
BORROW = {
    "jetson-nano-2gb-jp4": "jetson-nano-jp4",
    "jetson-tx2-jp4": "jetson-nano-jp4",
    "xavier-nx-jp5": "agx-xavier-jp5",
    "jetson-orin-nano-jp6": "agx-xavier-jp5",
    "orin-nx-jp6": "agx-xavier-jp5",
    "agx-orin-jp6": "agx-xavier-jp5",
}


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
        return [
            CalibrationPoint(
                r["board"],
                r["model"],
                r["framework"],
                r["precision"],
                int(r["image_size"]),
                int(r["batch"]),
                float(r["fps"]),
                float(r["latency_ms"]),
                r["source"],
                r["conditions"],
            )
            for r in rows
        ]


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
        return Factors(
            board, *v[:3], depthwise=v[3] if depthwise else None, depthwise_overhead_ms=v[4] if depthwise else None
        )

    def residuals(x):
        f = factors(x)
        return [math.log(layer_times_ms(prof, target, p.precision, p.batch, f) / p.latency_ms) for prof, p in profiles]

    best = None
    for start in ([0.5, 0.5, 0.05, 0.3, 0.02], [0.2, 0.8, 0.01, 0.1, 0.005], [0.8, 0.2, 0.2, 0.6, 0.05]):
        fit = least_squares(residuals, np.log(start[: 5 if depthwise else 3]), method="trf")
        if best is None or fit.cost < best.cost:
            best = fit
    return factors(best.x)


FAMILIES = (
    "alexnet",
    "squeezenet",
    "resnet",
    "densenet",
    "vgg",
    "mobilenet",
    "shufflenet",
    "mnasnet",
    "efficientnet",
    "ghostnet",
    "lcnet",
)


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
                out.append(
                    {
                        "board": board,
                        "family": family(p.model),
                        "model": p.model,
                        "precision": p.precision,
                        "depthwise": bool(_arrays(prof)["dw"].any()),
                        "published_ms": p.latency_ms,
                        "estimated_ms": est,
                        "relative_error": (est - p.latency_ms) / p.latency_ms,
                    }
                )
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
    from edgedistill.data.images import cache_root

    return cache_root() / "planner"


@lru_cache(maxsize=16)
def _published_factors(board: str) -> Factors:
    """The fit on the board's published points; cached on disk by the content of the table and of the modules that
    decide the fit (profile, roofline, calibration) and the torch version (the fit profiles every calibration
    network, ~10 s)."""
    import hashlib

    from edgedistill.plan import profile, roofline

    sources = b"".join(Path(m).read_bytes() for m in (profile.__file__, roofline.__file__, __file__))
    key = hashlib.sha256(CALIBRATION_FILE.read_bytes() + sources + torch.__version__.encode()).hexdigest()[:16]
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
        raise EdgedistillError(
            f"no calibration for '{board}' or a relative of it; add published points to "
            f"{CALIBRATION_FILE.name} or pass --measured bench files"
        )
    f = _published_factors(source_board)
    f = Factors(
        **{
            **asdict(f),
            "source": "published"
            if source_board == board
            else f"borrowed from {source_board} (uncalibrated for this board)",
        }
    )
    if f.depthwise is None:  # no published depthwise model on this board: a calibrated board's dw/dense ratio
        donor = next((b for b in sorted(calibrated) if _published_factors(b).depthwise is not None), None)
        if donor is not None:
            d = _published_factors(donor)
            f.depthwise = f.compute * d.depthwise / d.compute
            f.depthwise_overhead_ms = f.overhead_ms * d.depthwise_overhead_ms / d.overhead_ms
            f.source += (
                f"; depthwise factors from {donor}'s ratios to its dense ones (efficiency "
                f"{d.depthwise / d.compute:.2f}x, per-kernel cost {d.depthwise_overhead_ms / d.overhead_ms:.2f}x)"
            )
    saved = _cache_dir() / f"{board}.json"
    if use_measured and saved.exists():
        data = json.loads(saved.read_text())
        f.scale, f.runtime_base_mb = float(data["scale"]), float(data["runtime_base_mb"])
        f.source += f"; rescaled by {data['points']} measurement(s) of yours ({saved})"
    return f


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
        raise EdgedistillError(f"--measured {path}: not a readable JSON file ({exc})") from exc
    result, bundle = data.get("result") or {}, data.get("bundle") or {}
    missing = [k for k in ("model", "input_shape") if k not in bundle] + [
        k for k in ("stages_ms", "batch") if k not in result
    ]
    if missing:
        raise EdgedistillError(
            f"--measured {path}: missing {missing}; write it with `edgerun bench BUNDLE --engine "
            "E --json FILE` from this version of edgerun"
        )
    precision = (data.get("engine") or {}).get("precision")
    if not precision:
        raise EdgedistillError(f"--measured {path}: not a TensorRT run (no engine precision); bench with --engine")
    memory = (result.get("memory") or {}).get("total_mb")
    return {
        "path": str(path),
        "model": bundle["model"],
        "image_size": int(bundle["input_shape"][-1]),
        "batch": int(result["batch"]),
        "precision": precision,
        "latency_ms": model_latency_ms(result),
        "memory_mb": memory,
        "board": data.get("board"),
    }


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
        saved.write_text(
            json.dumps(
                {
                    "scale": scale,
                    "runtime_base_mb": runtime_base,
                    "points": len(rows),
                    "files": [r["path"] for r in rows],
                },
                indent=2,
            )
        )
    return {"rows": rows, "scale": scale, "runtime_base_mb": runtime_base, "saved": str(saved) if save else None}


def format_measured(refit: dict) -> str:
    lines = [f"{'bench file':32} {'model':22} {'prec':5} {'measured ms':>11} {'estimated ms':>12} {'ratio':>6}"]
    for r in refit["rows"]:
        lines.append(
            f"{Path(r['path']).name[:32]:32} {r['model'][:22]:22} {r['precision']:5} {r['latency_ms']:11.2f} "
            f"{r['estimated_ms']:12.2f} {r['ratio']:6.2f}"
        )
    lines.append(
        f"latency scale for this board: x{refit['scale']:.2f} (geometric mean); runtime base "
        f"{refit['runtime_base_mb']:.0f} MB" + (f"; saved to {refit['saved']}" if refit["saved"] else "")
    )
    return "\n".join(lines)
