"""The planner's factors: fitted per board to the published TensorRT figures of ``planner_calibration.csv`` (each row
with its source, conditions, class count and what its latency covers), within each factor's physical bounds; a
board without rows borrows from the nearest architecture and says so; the user's own ``edgerun bench --json``
measurements (``edgedistill plan --calibrate``, kept in the user's cache, never in the package) join the fit of
their board. Held-out errors and the intervals built from them are ``plan.heldout``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from edgedistill.errors import EdgedistillError
from edgedistill.plan.profile import profile_model
from edgedistill.plan.roofline import Factors, _arrays, layer_times_ms
from edgerun.profiles import get_target

log = logging.getLogger(__name__)


CALIBRATION_FILE = Path(__file__).with_name("planner_calibration.csv")

# The nearest architectures of each board, nearest first: the same GPU generation, then the closest one. A board
# without rows of its own borrows the factors of the first that has rows (factors are fractions of each board's own
# data-sheet peaks, so they travel between boards of one architecture).
NEAREST = {
    "jetson-nano-jp4": ("jetson-tx2-jp4",),  # Maxwell sm_53 -> Pascal sm_62: CUDA cores only, no tensor cores
    "jetson-nano-2gb-jp4": ("jetson-nano-jp4", "jetson-tx2-jp4"),
    "jetson-tx2-jp4": ("jetson-nano-jp4",),
    "xavier-nx-jp5": ("agx-xavier-jp5", "agx-orin-jp6"),  # Volta sm_72, tensor cores
    "agx-xavier-jp5": ("xavier-nx-jp5", "agx-orin-jp6"),
    "jetson-orin-nano-jp6": ("agx-orin-jp6", "xavier-nx-jp5"),  # Ampere sm_87
    "orin-nx-jp6": ("agx-orin-jp6", "xavier-nx-jp5"),
    "agx-orin-jp6": ("xavier-nx-jp5", "agx-xavier-jp5"),
}

# Physical bounds of each factor: efficiencies are fractions of the data sheet's peak FLOPs (dense: tensor cores
# where the board has them; depthwise: the CUDA cores') and bandwidth, never above 1; a kernel's fixed cost is
# between 1 us and 100 us; torch2trt's Python module call between 1 us and 10 ms.
BOUNDS = {
    "compute": (0.02, 1.0),
    "memory": (0.05, 1.0),
    "overhead_ms": (0.001, 0.1),
    "depthwise": (0.005, 1.0),
    "depthwise_overhead_ms": (0.001, 0.1),
    "python_ms": (0.001, 10.0),
}
# Weak priors (value, spread as a factor): what a TensorRT kernel's fixed cost and torch2trt's Python call usually
# are (a kernel launch and its tail: ~10 us on a Jetson; a PyTorch module call into a binding: ~0.5 ms). They only
# decide what the rows cannot tell apart (a per-call constant from a per-kernel cost on a board with few rows);
# each is one residual of log(value / prior) / log(spread) in the least squares.
PRIORS = {"overhead_ms": (0.01, 4.0), "depthwise_overhead_ms": (0.01, 4.0), "python_ms": (0.5, 4.0)}
USER_WEIGHT = 4.0  # a row measured on the user's own board counts as four published rows in its board's fit


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
    classes: int = 1000
    timing: str = "engine"  # engine: the model's computation; module: torch2trt's Python call around it
    user: bool = False  # measured on the user's own board (edgedistill plan --calibrate)
    memory_mb: Optional[float] = None  # the process's measured memory (the user's rows)


def load_calibration(path: Path = CALIBRATION_FILE, user: bool = False) -> list[CalibrationPoint]:
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
                int(r.get("classes") or 1000),
                r.get("timing") or "engine",
                user,
                float(r["memory_mb"]) if r.get("memory_mb") else None,
            )
            for r in rows
        ]


def profile_of(p: CalibrationPoint):
    return profile_model(p.model, p.image_size, p.framework, p.classes)


def is_depthwise(p: CalibrationPoint) -> bool:
    return bool(_arrays(profile_of(p))["dw"].any())


def point_ms(p: CalibrationPoint, target: dict, f: Factors) -> float:
    """The estimate of what the row's latency covers: the engine, plus torch2trt's Python call for module rows."""
    return layer_times_ms(profile_of(p), target, p.precision, p.batch, f) + (f.python_ms if p.timing == "module" else 0)


def fit_factors(points: Sequence[CalibrationPoint], board: str) -> Factors:
    """Least squares on log latency (relative error) over one board's points, every factor inside ``BOUNDS``; the
    depthwise factors only with depthwise rows, the Python term only with torch2trt rows (so it never inflates the
    per-kernel cost); the fixed costs held by weak ``PRIORS``; the user's rows weigh ``USER_WEIGHT``."""
    from scipy.optimize import least_squares

    target = get_target(board)
    points = list(points)
    if len(points) < 3:
        raise EdgedistillError(f"{board}: {len(points)} calibration points; three factors need at least 3")
    names = ["compute", "memory", "overhead_ms"]
    if any(is_depthwise(p) for p in points):
        names += ["depthwise", "depthwise_overhead_ms"]
    if any(p.timing == "module" for p in points):
        names.append("python_ms")
    weights = np.sqrt([USER_WEIGHT if p.user else 1.0 for p in points])
    lo = np.log([BOUNDS[n][0] for n in names])
    hi = np.log([BOUNDS[n][1] for n in names])

    def factors(x) -> Factors:
        v = dict(zip(names, (float(c) for c in np.exp(x))))
        return Factors(
            board,
            v["compute"],
            v["memory"],
            v["overhead_ms"],
            depthwise=v.get("depthwise"),
            depthwise_overhead_ms=v.get("depthwise_overhead_ms"),
            python_ms=v.get("python_ms", 0.0),
        )

    priors = [(i, math.log(PRIORS[n][0]), math.log(PRIORS[n][1])) for i, n in enumerate(names) if n in PRIORS]

    def residuals(x):
        f = factors(x)
        fit = weights * np.array([math.log(point_ms(p, target, f) / p.latency_ms) for p in points])
        return np.concatenate([fit, [(x[i] - mu) / spread for i, mu, spread in priors]])

    start = {
        "compute": (0.3, 0.1, 0.8),
        "memory": (0.5, 0.8, 0.2),
        "overhead_ms": (0.01, 0.003, 0.03),
        "depthwise": (0.1, 0.03, 0.4),
        "depthwise_overhead_ms": (0.01, 0.003, 0.03),
        "python_ms": (0.5, 0.05, 2.0),
    }
    best = None
    for i in range(3):
        x0 = np.clip(np.log([start[n][i] for n in names]), lo + 1e-9, hi - 1e-9)
        fit = least_squares(residuals, x0, bounds=(lo, hi), method="trf")
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
    "mixnet",
    "efficientformer",
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


def _cache_dir() -> Path:
    from edgedistill.data.images import cache_root

    return cache_root() / "planner"


def cache_key() -> str:
    """The content of the table and of the modules that decide the fit (profile, roofline, calibration, heldout)
    and the torch version: a fit or a band cached under another key is stale."""
    import hashlib

    here = Path(__file__).parent
    sources = b"".join((here / m).read_bytes() for m in ("profile.py", "roofline.py", "calibration.py", "heldout.py"))
    return hashlib.sha256(CALIBRATION_FILE.read_bytes() + sources + torch.__version__.encode()).hexdigest()[:16]


def cached_json(name: str, compute):
    """``compute()`` (JSON-able), kept on disk under the cache key: the fits profile every calibration network."""
    cached = _cache_dir() / f"{name}-{cache_key()}.json"
    if cached.exists():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            log.warning("planner: ignoring an unreadable cache %s", cached)
    value = compute()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{id(value)}")
    tmp.write_text(json.dumps(value))
    tmp.replace(cached)
    return value


@lru_cache(maxsize=16)
def _published_factors(board: str) -> Factors:
    """The fit on the board's published rows (cached on disk)."""
    data = cached_json(f"fit-{board}", lambda: asdict(fit_factors(published_rows(board), board)))
    return Factors(**data)


def published_rows(board: str) -> list[CalibrationPoint]:
    return [p for p in load_calibration() if p.board == board]


def user_file() -> Path:
    """The user's own measurements (``edgedistill plan --calibrate``): a calibration table in the user's cache."""
    return _cache_dir() / "user_calibration.csv"


def user_rows(board: Optional[str] = None) -> list[CalibrationPoint]:
    path = user_file()
    if not path.exists():
        return []
    return [p for p in load_calibration(path, user=True) if board is None or p.board == board]


def nearest_calibrated(board: str, exclude: Sequence[str] = ()) -> Optional[str]:
    """The nearest architecture with published rows (``NEAREST``), none of ``exclude``."""
    calibrated = {p.board for p in load_calibration()} - set(exclude)
    return next((b for b in NEAREST.get(board, ()) if b in calibrated), None)


def factors_for(board: str, use_measured: bool = True) -> Factors:
    """The board's factors: fitted on its published rows, or borrowed from the nearest calibrated architecture
    (said in ``source``); with ``use_measured``, the user's own rows of this board join the fit (or, under three
    and no published rows, rescale the borrowed factors by their geometric mean)."""
    get_target(board)  # an unknown name fails here, with the closest profile named
    own = bool(published_rows(board))
    donor = board if own else nearest_calibrated(board)
    if donor is None:
        raise EdgedistillError(
            f"no calibration for '{board}' or a board of its architecture; add published rows to "
            f"{CALIBRATION_FILE.name} or measure it: edgedistill plan --target {board} --calibrate BENCH.json"
        )
    f = Factors(**asdict(_published_factors(donor)))
    f.board = board
    f.source = (
        f"published: {len(published_rows(board))} rows of {board}"
        if own
        else f"BORROWED from {donor} (nearest architecture with published rows; {board} has none)"
    )
    mine = user_rows(board) if use_measured else []
    if mine:
        target = get_target(board)
        if own or len(mine) >= 3:
            fitted = fit_factors(published_rows(board) + mine, board)
            fitted.source = f.source + f"; refit with {len(mine)} measurement(s) of yours ({user_file()})"
            f = fitted
        else:
            ratios = [p.latency_ms / point_ms(p, target, f) for p in mine]
            f.scale = float(np.exp(np.mean(np.log(ratios))))
            f.source += f"; rescaled x{f.scale:.2f} by {len(mine)} measurement(s) of yours ({user_file()})"
        f.user_rows = len(mine)
        bases = [p for p in mine if p.memory_mb]
        if bases:
            from edgedistill.plan.roofline import model_memory_mb

            f.runtime_base_mb = float(
                np.median([p.memory_mb - sum(model_memory_mb(profile_of(p), p.precision, p.batch)) for p in bases])
            )
    return f
