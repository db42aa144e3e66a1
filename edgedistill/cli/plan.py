"""``edgedistill plan``: which student fits the board before training (estimated FPS, memory and engine size of
candidate models with intervals from the planner's held-out error), and ``--calibrate`` bench files from the user's
own board, which join that board's fit."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from edgedistill.cli.console import setup_logging
from edgedistill.errors import EdgedistillError, RecipeError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="choose the student before training: estimated device FPS, memory and engine "
        "size of candidate models (estimates, fitted to published Jetson figures)",
    )
    p.add_argument("--target", required=True, help="device profile, e.g. jetson-nano-jp4 (see edgerun/profiles.py)")
    p.add_argument("--fps-target", type=float)
    p.add_argument("--budget-mb", type=float, help="memory budget of the whole TensorRT process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--candidates",
        help="comma-separated timm or torchvision SqueezeNet names (default: a curated list of edge models)",
    )
    p.add_argument("--teacher", help="also estimate the teacher, e.g. resnet152")
    p.add_argument(
        "--json", help="write [{model, params, flops, est_latency_ms, est_fps, est_memory_mb, fits, reason}, ...] here"
    )
    p.add_argument(
        "--calibrate",
        "--measured",
        dest="measured",
        nargs="+",
        default=[],
        metavar="BENCH.json",
        help="`edgerun bench --json` files from your board (deploy's devices/<board>/bench.json too): added to "
        "your calibration table (in your cache) and fitted with this board's published rows",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(None, args.verbose)
    return plan_command(args)


def check_names(names: Sequence[str]) -> None:
    """Every name must be a timm model or a torchvision SqueezeNet, before any slow work starts."""
    from edgedistill.models.factory import check_model_name

    for name in names:
        try:
            check_model_name(name)
        except RecipeError as exc:
            raise EdgedistillError(f"--candidates/--teacher: {exc}") from exc


def plan_command(args: argparse.Namespace) -> int:
    """`edgedistill plan`: the table, the recommendation, the planner's own error; --json and --calibrate."""
    from edgedistill.plan.estimate import DEFAULT_CANDIDATES, PlanSpec, format_plan, plan
    from edgedistill.plan.measured import format_measured, refit_from_measured

    if args.image_size < 32 or args.batch < 1:
        raise EdgedistillError("--image-size must be at least 32 and --batch at least 1")
    if args.measured:
        print(format_measured(refit_from_measured(args.target, args.measured)))
        print()
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else DEFAULT_CANDIDATES
    check_names(list(candidates) + ([args.teacher] if args.teacher else []))
    spec = PlanSpec(args.target, args.precision, args.image_size, args.batch, args.fps_target, args.budget_mb)
    result = plan(spec, candidates, args.teacher)
    print(format_plan(result))
    if args.json:
        keys = (
            "model",
            "role",
            "params",
            "flops",
            "macs",
            "top1",
            "est_latency_ms",
            "est_fps",
            "est_fps_lo",
            "est_fps_hi",
            "basis",
            "est_memory_mb",
            "est_engine_mb",
            "fits",
            "reason",
        )
        rows = list(result["rows"]) + ([result["teacher"]] if result["teacher"] else [])
        Path(args.json).write_text(json.dumps([{k: asdict(e)[k] for k in keys} for e in rows], indent=2))
    return 0
