"""The user's own boards teach the planner: `edgerun bench --json` files (and `deploy`'s per-board bench results)
become rows of a local calibration table in the user's cache (``edgedistill plan --calibrate``), which join their
board's fit; the report says which estimates stand on the user's own measurements.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Sequence

from edgedistill.errors import EdgedistillError
from edgedistill.plan.calibration import (
    CalibrationPoint,
    factors_for,
    point_ms,
    user_file,
    user_rows,
)
from edgerun.profiles import get_target

COLUMNS = (
    "board",
    "model",
    "framework",
    "precision",
    "image_size",
    "batch",
    "fps",
    "latency_ms",
    "source",
    "conditions",
    "classes",
    "timing",
    "memory_mb",
)


def model_latency_ms(bench_result: dict) -> float:
    """The model's share of an `edgerun bench` frame (host->device, compute, device->host): what the planner
    estimates, without the camera-frame preprocessing and postprocessing around it."""
    stages = bench_result.get("stages_ms") or {}
    return sum(stages.get(k) or 0.0 for k in ("h2d", "compute", "d2h"))


def read_bench(path: str | Path) -> dict:
    """The facts the planner needs from an `edgerun bench --json` file."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"--calibrate {path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise EdgedistillError(f"--calibrate {path}: a bench result is a JSON object, not {type(data).__name__}")
    result, bundle = data.get("result") or {}, data.get("bundle") or {}
    missing = [k for k in ("model", "input_shape") if not bundle.get(k)] + [
        k for k in ("stages_ms", "batch") if k not in result
    ]
    if missing:
        raise EdgedistillError(
            f"--calibrate {path}: missing {missing}; write it with `edgerun bench BUNDLE --engine "
            "E --json FILE` from this version of edgerun"
        )
    precision = (data.get("engine") or {}).get("precision")
    if not precision:
        raise EdgedistillError(f"--calibrate {path}: not a TensorRT run (no engine precision); bench with --engine")
    latency = model_latency_ms(result)
    if not latency > 0:
        raise EdgedistillError(f"--calibrate {path}: no model time in stages_ms (h2d, compute, d2h)")
    memory = (result.get("memory") or {}).get("total_mb")
    return {
        "path": str(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16],
        "model": bundle["model"],
        "image_size": int(bundle["input_shape"][-1]),
        "classes": int(bundle.get("num_classes") or 1000),
        "batch": int(result["batch"]),
        "precision": precision,
        "latency_ms": latency,
        "memory_mb": memory,
        "board": data.get("board"),
    }


def _point(target_name: str, m: dict) -> CalibrationPoint:
    return CalibrationPoint(
        target_name,
        m["model"],
        "auto",
        m["precision"],
        m["image_size"],
        m["batch"],
        m["batch"] * 1000.0 / m["latency_ms"],
        m["latency_ms"],
        f"yours: {m['path']} (sha256 {m['sha256']})",
        f"edgerun bench on {m['board'] or 'your board'}: h2d + compute + d2h of the engine",
        m["classes"],
        "engine",
        True,
        m["memory_mb"],
    )


def add_measurements(target_name: str, paths: Sequence[str | Path]) -> list[CalibrationPoint]:
    """Append the bench files as rows of the user's calibration table (a file already there is not added twice)."""
    get_target(target_name)
    points = [_point(target_name, read_bench(p)) for p in paths]
    seen = {p.source for p in user_rows()}
    fresh = [p for p in points if p.source not in seen]
    path = user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new_file:
            fh.write(
                "# your own edgerun bench measurements (edgedistill plan --calibrate): joined to their board's fit\n"
            )
            writer.writerow(COLUMNS)
        for p in fresh:
            writer.writerow(
                [
                    p.board,
                    p.model,
                    p.framework,
                    p.precision,
                    p.image_size,
                    p.batch,
                    f"{p.fps:.6g}",
                    f"{p.latency_ms:.6g}",
                    p.source,
                    p.conditions,
                    p.classes,
                    p.timing,
                    "" if p.memory_mb is None else f"{p.memory_mb:.6g}",
                ]
            )
    return points


def refit_from_measured(target_name: str, paths: Sequence[str | Path]) -> dict:
    """Add the bench files to the user's table and refit the board: each measurement against the estimate before
    and after. Returns {rows, source, saved}."""
    target = get_target(target_name)
    before = factors_for(target_name)
    points = add_measurements(target_name, paths)
    after = factors_for(target_name)
    rows = [
        {
            "path": p.source,
            "model": p.model,
            "precision": p.precision,
            "latency_ms": p.latency_ms,
            "before_ms": point_ms(p, target, before),
            "after_ms": point_ms(p, target, after),
        }
        for p in points
    ]
    return {"rows": rows, "source": after.source, "saved": str(user_file()), "board": target_name}


def format_measured(refit: dict) -> str:
    lines = [f"{'model':22} {'prec':5} {'measured ms':>11} {'est. before':>11} {'est. after':>10}"]
    for r in refit["rows"]:
        lines.append(
            f"{r['model'][:22]:22} {r['precision']:5} {r['latency_ms']:11.2f} {r['before_ms']:11.2f} "
            f"{r['after_ms']:10.2f}"
        )
    lines.append(f"{refit['board']}: factors {refit['source']}")
    return "\n".join(lines)
