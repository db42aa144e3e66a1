"""``edgedistill tune``: an Optuna study over the student's training, shared by workers through its database."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgedistill.cli.console import setup_logging
from edgedistill.errors import EdgedistillError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="Optuna study: --trials students with values from --space, pruned early, best recipe written out",
    )
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--space", required=True, help="search space YAML: dotted recipe keys -> {low, high} or {choices}")
    p.add_argument("--trials", type=int, required=True, help="trials the study finishes, over all its workers")
    p.add_argument(
        "--storage",
        help="the study's database: sqlite:///FILE.db (default RUN/tune.db) or postgresql://USER@HOST:PORT/DB, "
        "which workers on several machines share",
    )
    p.add_argument("--study", help="study name (default: the recipe's name); the same name resumes it")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--pruner", choices=("median", "halving", "none"), default="median")
    p.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a running trial's heartbeats; a trial silent for three is failed and run again",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=run)


def _argv(args: argparse.Namespace, storage: str, study: str) -> list[str]:
    """The command line of a worker process (everything but --workers)."""
    out = ["tune", args.recipe, "--space", args.space, "--trials", str(args.trials), "--storage", storage]
    out += ["--study", study, "--pruner", args.pruner, "--sampler", args.sampler, "--heartbeat", str(args.heartbeat)]
    for item in args.overrides:
        out += ["--set", item]
    return out + (["-v"] if args.verbose else [])


def run(args: argparse.Namespace) -> int:
    from edgedistill.recipe.loading import load_recipe
    from edgedistill.run.context import RunContext
    from edgedistill.run.tracking import open_tracker
    from edgedistill.run.tune import TuneJob, run_tune
    from edgedistill.run.tune_space import load_space

    recipe = load_recipe(args.recipe, list(args.overrides))
    if recipe.task == "anomaly":
        raise EdgedistillError("tune searches a student's distillation; task: anomaly trains no student to tune")
    if args.trials < 1 or args.workers < 1 or args.heartbeat < 1:
        raise EdgedistillError("--trials, --workers and --heartbeat take whole numbers of 1 or more")
    space = load_space(args.space, recipe)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(recipe.run_dir, args.verbose)
    storage = args.storage or f"sqlite:///{(recipe.run_dir / 'tune.db').resolve()}"
    study = args.study or recipe.name
    ctx = RunContext(recipe)
    ctx.tracker = open_tracker(recipe, recipe.run_dir)
    status = "FAILED"
    try:
        result = run_tune(
            ctx,
            TuneJob(
                space=space,
                trials=args.trials,
                storage=storage,
                study=study,
                workers=args.workers,
                pruner=args.pruner,
                sampler=args.sampler,
                heartbeat=args.heartbeat,
                worker_index=args.worker_index,
                argv=_argv(args, storage, study),
            ),
        )
        status = "FINISHED"
    finally:
        ctx.tracker.finish(status)
    if not args.worker_index:
        print((Path(result["folder"]) / "trials.md").read_text())
        if not result["best"]:
            return 1
    return 0
