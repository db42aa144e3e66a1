"""The planner's own error, held out, and the interval every estimate prints.

- **Leave one model out**: each board's rows of one model estimated by factors fitted on the board's other rows
  (what a calibrated board's estimate of a new model is worth).
- **Leave one board out**: each board's engine-timed rows estimated by the factors of its nearest architecture,
  fitted without it (what a board without rows, which borrows, gets). torch2trt rows (timed through Python) are
  left out of it: their Python term belongs to the board's own CPU.

The residuals ``log(published / estimated)`` give the interval: an estimate from a board's own rows takes the 5th
to 95th percentiles of the leave-one-model-out residuals of its family (dense or depthwise), a borrowed one those
of leave-one-board-out. They are computed by ``benchmarks/planner.py`` and shipped in ``planner_bands.json`` with
the hash of the table they came from; a table changed since is refitted here (and cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgedistill.plan.calibration import (
    CALIBRATION_FILE,
    CalibrationPoint,
    _published_factors,
    cached_json,
    family,
    fit_factors,
    is_depthwise,
    load_calibration,
    nearest_calibrated,
    point_ms,
)
from edgedistill.plan.roofline import Factors
from edgerun.profiles import get_target

log = logging.getLogger(__name__)

BANDS_FILE = Path(__file__).with_name("planner_bands.json")
LEVEL = (0.05, 0.95)  # the interval's percentiles of the held-out residuals: 90% nominal


def _row(p: CalibrationPoint, estimated: float, how: str) -> dict:
    return {
        "board": p.board,
        "model": p.model,
        "family": family(p.model),
        "depthwise": is_depthwise(p),
        "timing": p.timing,
        "precision": p.precision,
        "published_ms": p.latency_ms,
        "estimated_ms": estimated,
        "relative_error": (estimated - p.latency_ms) / p.latency_ms,
        "log_ratio": math.log(p.latency_ms / estimated),
        "held_out": how,
    }


def leave_one_model_out(points: Optional[Sequence[CalibrationPoint]] = None) -> list[dict]:
    """For each board and each model on it: the model's rows estimated by factors fitted on the board's others."""
    points = list(points if points is not None else load_calibration())
    out = []
    for board in sorted({p.board for p in points}):
        mine = [p for p in points if p.board == board]
        target = get_target(board)
        for model in dict.fromkeys(p.model for p in mine):
            f = fit_factors([p for p in mine if p.model != model], board)
            out += [_row(p, point_ms(p, target, f), "model") for p in mine if p.model == model]
    return out


def leave_one_board_out(points: Optional[Sequence[CalibrationPoint]] = None) -> list[dict]:
    """For each board: its engine-timed rows estimated by its nearest calibrated architecture's factors."""
    points = list(points if points is not None else load_calibration())
    out = []
    for board in sorted({p.board for p in points}):
        donor = nearest_calibrated(board, exclude=[board])
        if donor is None:
            continue
        f: Factors = _published_factors(donor)
        target = get_target(board)
        out += [
            dict(_row(p, point_ms(p, target, f), "board"), donor=donor)
            for p in points
            if p.board == board and p.timing == "engine"
        ]
    return out


def table_hash() -> str:
    return hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest()[:16]


def compute_bands() -> dict:
    """Both held-out tables and, per (own | borrowed, dense | depthwise), the residuals' percentiles."""
    lomo, lobo = leave_one_model_out(), leave_one_board_out()
    bands = {}
    for kind, rows in (("own", lomo), ("borrowed", lobo)):
        for fam in ("dense", "depthwise"):
            r = [x["log_ratio"] for x in rows if x["depthwise"] == (fam == "depthwise")]
            if r:
                bands[f"{kind}/{fam}"] = {
                    "lo": float(np.quantile(r, LEVEL[0])),
                    "hi": float(np.quantile(r, LEVEL[1])),
                    "points": len(r),
                    "mean_abs_error": float(np.mean([abs(math.exp(-x) - 1) for x in r])),
                }
    return {"table": table_hash(), "level": list(LEVEL), "bands": bands, "lomo": lomo, "lobo": lobo}


def bands() -> dict:
    """The shipped bands when they belong to this table, else computed here (and cached)."""
    if BANDS_FILE.exists():
        data = json.loads(BANDS_FILE.read_text())
        if data.get("table") == table_hash():
            return data
        log.warning("planner: %s is from another calibration table; refitting the held-out errors", BANDS_FILE.name)
    return cached_json("bands", compute_bands)


def interval(estimated_ms: float, factors: Factors, depthwise: bool) -> tuple[float, float, str]:
    """(low, high) latency in ms around ``estimated_ms`` from the held-out residuals of estimates like it, and what
    they are: an estimate from the board's own rows, or a borrowed one."""
    kind = "own" if factors.source.startswith("published") or factors.user_rows >= 3 else "borrowed"
    fam = "depthwise" if depthwise else "dense"
    band = bands()["bands"].get(f"{kind}/{fam}") or bands()["bands"][f"own/{fam}"]
    lo, hi = estimated_ms * math.exp(band["lo"]), estimated_ms * math.exp(band["hi"])
    return min(lo, estimated_ms), max(hi, estimated_ms), f"{kind} {fam}"
