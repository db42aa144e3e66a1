"""The commands on a recipe: ``run`` (every stage in order), one command per stage, and ``sweep``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from edgedistill.cli.console import print_device_plan, print_summary, setup_logging
from edgedistill.errors import EdgedistillError

log = logging.getLogger("edgedistill")

STAGE_HELP = (
    (
        "datafree",
        "data.source: datafree: synthesize the training set from the teacher's weights alone (DeepInversion); "
        "resumes by batch",
    ),
    ("teacher", "train (or load) and validate the teacher"),
    ("assistant", "distill the teacher into the teacher assistant(s) of the chain (when the recipe has any)"),
    ("distill", "distill the teacher (or the last assistant) into the student"),
    ("self-distill", "born-again generations: the student teaches fresh copies of itself"),
    ("baseline", "train the same student without distillation"),
    ("evaluate", "compare teacher, student and baseline; write summary.json/md"),
    ("export", "export the student to a device bundle (ONNX + manifest + samples)"),
)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, dotted (repeatable): --set data.root=/data --set student.epochs=30",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="distill even from a teacher under teacher.min_top1; export even when INT8 is rejected",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run every stage in order (stages already done for this recipe are skipped)")
    add_recipe_args(p)
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. teacher,distill")
    p.set_defaults(handler=run)
    for stage, text in STAGE_HELP:
        p = sub.add_parser(stage, help=text)
        add_recipe_args(p)
        p.set_defaults(handler=run)
    export = sub.choices["export"]
    export.add_argument("--target", default=None, help="target profile, e.g. jetson-nano-jp4")
    export.add_argument(
        "--register",
        metavar="NAME",
        help="pack the bundle into RUN/NAME.edb and register it as a new version of MLflow model NAME (needs "
        "tracking: tracking.mlflow in the recipe or $MLFLOW_TRACKING_URI)",
    )
    export.add_argument("--sign", metavar="KEY", help="with --register: sign the registered .edb with this key")
    p = sub.add_parser("sweep", help="temperature/alpha search: one student per cell against one teacher")
    add_recipe_args(p)
    p.add_argument("--temperature", default="1,2,3,5,10", help="comma-separated temperatures (default 1,2,3,5,10)")
    p.add_argument("--alpha", default="0.3,0.5,0.7,0.9", help="comma-separated KD weights (default 0.3,0.5,0.7,0.9)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the recipe (with --set and, for export, --target), join torchrun's processes when launched by it, run."""
    from edgedistill.recipe.loading import load_recipe
    from edgedistill.train import distributed

    overrides = list(args.overrides)
    if getattr(args, "target", None):
        overrides.append(f"export.target={args.target}")
    recipe = load_recipe(args.recipe, overrides)
    world = distributed.init(recipe.device)
    try:
        return _run_recipe(args, recipe, world)
    finally:
        distributed.shutdown()


def _first_file(path: Path) -> Optional[Path]:
    """The first part of ``path`` that exists as something other than a folder."""
    for part in reversed(path.parents):
        if part.exists() and not part.is_dir():
            return part
    return None


def _run_recipe(args: argparse.Namespace, recipe, world) -> int:
    """A command on a recipe; under torchrun (``world.active``) rank 0 alone logs to run.log and prints."""
    if recipe.run_dir.exists() and not recipe.run_dir.is_dir():
        raise EdgedistillError(
            f"output '{recipe.run_dir}' is a file: the run needs a folder there; choose another output (or name)"
        )
    try:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way ('output=<a file>/sub'), no permission, a read-only disk
        raise EdgedistillError(
            f"output: the run folder '{recipe.run_dir}' cannot be made ({exc.strerror}"
            + (f": '{_first_file(recipe.run_dir)}' is a file" if _first_file(recipe.run_dir) else "")
            + "); choose another output with --set output=FOLDER"
        ) from None
    setup_logging(recipe.run_dir if world.is_main else None, args.verbose, quiet=not world.is_main)
    from edgedistill.run.tracking import Tracker, open_tracker

    tracker = open_tracker(recipe, recipe.run_dir) if world.is_main else Tracker()
    status = "FAILED"
    try:
        code = _dispatch(args, recipe, world, tracker)
        status = "FINISHED"
        return code
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _dispatch(args: argparse.Namespace, recipe, world, tracker) -> int:
    """The command itself, with the run's tracker (MLflow, or one that does nothing)."""
    if recipe.task == "anomaly":
        return _run_anomaly(args, recipe, world, tracker)
    from edgedistill.run.context import RunContext
    from edgedistill.run.pipeline import run_stage

    if args.command == "sweep" and recipe.task == "regression":
        raise EdgedistillError(
            "sweep searches distill.temperature, which regression does not use (the student "
            "matches the teacher's predictions): vary distill.alpha with --set instead"
        )
    if world.active and args.command == "sweep":
        raise EdgedistillError(
            "sweep runs one process: launch it without torchrun (each of its trainings is "
            "short); `torchrun ... -m edgedistill run` distributes the stages"
        )
    ctx = RunContext(recipe, force=args.force)
    ctx.tracker = tracker
    if world.active:
        ctx.load_data_in_turn()
    if args.command == "sweep":
        return _sweep(args, ctx)
    stages = _stages(args, recipe)
    if args.command == "run" and world.is_main:
        print_device_plan(ctx)
    datafree_pending = recipe.data.source == "datafree" and not ctx.is_done("datafree")
    if (
        world.is_main
        and not datafree_pending
        and set(stages) & {"teacher", "assistant", "distill", "self-distill", "baseline", "evaluate"}
    ):
        ctx.announce_evaluation()  # the metric the run is judged on, and why; the imbalance warning
    for stage in stages:
        run_stage(ctx, stage)
    summary_path = ctx.run_dir / "summary.json"
    if "evaluate" in stages and summary_path.exists() and world.is_main:
        print_summary(json.loads(summary_path.read_text()))
        log.info("summary written to %s and %s", summary_path, ctx.run_dir / "summary.md")
        if args.command == "run":
            from edgedistill.judge.report import write_report

            html_path, _ = write_report(ctx.run_dir)
            log.info("report: %s (one self-contained file) and %s", html_path, ctx.run_dir / "report.md")
    _track_outputs(tracker, ctx.run_dir, summary_path)
    if getattr(args, "register", None) and world.is_main:
        _register(args, recipe, tracker)
    return 0


def _register(args: argparse.Namespace, recipe, tracker) -> None:
    from edgedistill.run.registry import register_bundle

    facts = register_bundle(tracker, recipe.run_dir, args.register, sign_key=args.sign)
    uri = f"models:/{facts['name']}/{facts['version']}"
    print(
        f"registered {uri} ({facts['edb']}, sha256 {facts['sha256'][:12]}..., signed by {facts['signed_by']}); "
        f"deploy it with: edgedistill deploy {uri} --host USER@BOARD"
    )


def _track_outputs(tracker, run_dir: Path, summary_path: Path) -> None:
    """The summary's figures as final metrics, the summary, report and bundle as artifacts (when tracking)."""
    if not tracker.enabled:
        return
    if summary_path.is_file():
        tracker.log_summary(json.loads(summary_path.read_text()))
    tracker.log_outputs(run_dir)


def _run_anomaly(args: argparse.Namespace, recipe, world, tracker) -> int:
    """``task: anomaly``: one command trains, calibrates and reports (export to the device comes later)."""
    if args.command != "run" or getattr(args, "stages", None):
        raise EdgedistillError(
            f"task: anomaly runs as a whole: `edgedistill run RECIPE` (not `{args.command}`"
            + (" --stages" if getattr(args, "stages", None) else "")
            + "); training, calibration and the report are one step"
        )
    from edgedistill.run.anomaly import run_anomaly, summary_lines

    summary = run_anomaly(recipe, tracker)
    if summary is None:  # a torchrun rank other than 0: it trained its share
        return 0
    _track_outputs(tracker, recipe.run_dir, recipe.run_dir / "summary.json")
    print("\n".join(summary_lines(summary)))
    log.info("summary written to %s", recipe.run_dir / "summary.json")
    return 0


def _stages(args: argparse.Namespace, recipe) -> list[str]:
    """The stages this command runs: every one (``run``, or its --stages subset, datafree only for a data-free
    recipe), or the one it names."""
    from edgedistill.run.pipeline import PIPELINE, STAGE_FUNCTIONS

    if args.command != "run":
        return [args.command]
    stages = list(PIPELINE)
    if args.stages:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STAGE_FUNCTIONS]
        if unknown:
            raise EdgedistillError(f"--stages: unknown stage(s) {unknown}; stages are {list(STAGE_FUNCTIONS)}")
        stages = [s for s in stages if s in chosen]
    if recipe.data.source != "datafree":
        stages = [s for s in stages if s != "datafree"]
    return stages


def _sweep(args: argparse.Namespace, ctx) -> int:
    from edgedistill.run.sweep import parse_values, run_sweep

    ctx.announce_evaluation()
    result = run_sweep(ctx, parse_values(args.temperature, "temperature"), parse_values(args.alpha, "alpha"))
    print((ctx.run_dir / "sweep" / "results.md").read_text())
    return 0 if result["best"] else 1
