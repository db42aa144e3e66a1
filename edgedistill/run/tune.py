"""``edgedistill tune RECIPE --space space.yaml --trials N``: an Optuna study over the student's training.

The teacher (and any assistant) is trained once, as ``edgedistill run`` would, in the run folder; every trial then
distils a student with the recipe changed by the trial's values (``edgedistill.run.tune_space``) into
``<run>/tune/<study>/trial-<n>/``, and its value is the recipe's own metric on the validation split (never the
test split: the step's ``report.json``). Each validation epoch's top-1 (R^2 for regression) feeds the pruner
(``median``: Optuna's MedianPruner; ``halving``: successive halving; ``none``), which stops hopeless trials early.

Several workers share one study through its database (``edgedistill.run.tune_storage``): ``--workers K`` starts K
processes on this machine; on several machines each runs the same command with the same PostgreSQL ``--storage``
(and its own run folder). Together they finish exactly ``--trials`` trials (completed, pruned or failed by their
own error); a worker killed mid-trial leaves it failed, and the trial is run again with the same values. The
same command after a kill resumes the study.

Written at the end (``<run>/tune/<study>/``): ``trials.csv`` and ``trials.md`` (every trial: state, value,
values, epochs validated, seconds), ``best.yaml`` (the recipe with the best trial's values: `edgedistill run` it),
``report.html``/``report.md`` with the table and Optuna's optimisation history and parameter importances. With
tracking on, each trial is a nested MLflow run of the run folder's run, with its values and result.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from edgedistill.errors import EdgedistillError, RecipeError
from edgedistill.files import atomic_write_text
from edgedistill.run.context import RunContext
from edgedistill.run.folder import STUDENT_SECTIONS, Step
from edgedistill.run.pipeline import run_stage
from edgedistill.run.training import check_teacher_floor, train_step
from edgedistill.run.tune_space import SearchSpace, trial_recipe
from edgedistill.run.tune_storage import Heartbeat, file_lock, open_storage, study_lock

log = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
SAMPLERS = ("tpe", "random", "grid")
FOLDER_ATTR = "folder"  # a trial's user attribute: its training folder (a retried trial keeps the killed one's)
# the system attributes Optuna's retry callback gives a retry: the first trial of its line, every one before it
RETRY_ATTR, HISTORY_ATTR = "failed_trial", "retry_history"


@dataclass
class TuneJob:
    """One ``edgedistill tune`` command (or one of its ``--workers`` processes)."""

    space: SearchSpace
    trials: int
    storage: str
    study: str
    workers: int = 1
    pruner: str = "median"
    sampler: str = "tpe"
    heartbeat: int = 10
    worker_index: int = 0  # 0: the command itself; 1..K: a process it started
    argv: list = field(default_factory=list)  # the command line, for the processes it starts


def _pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _grid(grid: dict, seed: int):
    """Optuna's grid sampler over ``grid``."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid, without its ``study.stop()`` once every cell is taken: that works inside
        ``Study.optimize`` only, and a study run by ask and tell ends by its own count (``next_trial``)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return Grid(grid, seed=seed)


def _sampler(job: TuneJob, seed: int):
    import optuna

    if job.sampler == "grid":
        return _grid(job.space.grid(), seed)
    if job.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed + job.worker_index)
    startup = min(10, max(3, job.trials // 3))
    return optuna.samplers.TPESampler(seed=seed + job.worker_index, n_startup_trials=startup)


def open_study(ctx: RunContext, job: TuneJob):
    """The study (made or loaded); one made for another recipe or space is refused, naming what differs."""
    import optuna

    want = {"recipe": ctx.fingerprint("distill"), "space": job.space.fingerprint(), "trials": job.trials}
    # workers starting together on a fresh database would race to create its tables and the study: one at a time
    with study_lock(job.storage, "(tables)"):
        storage = open_storage(job.storage, job.heartbeat)
        study = optuna.create_study(
            study_name=job.study,
            storage=storage,
            sampler=_sampler(job, ctx.recipe.seed),
            pruner=_pruner(job.pruner),
            direction="maximize",
            load_if_exists=True,
        )
        have = study.user_attrs
        if not have:
            for key, value in want.items():
                study.set_user_attr(key, value)
    if have:
        differs = [k for k in ("recipe", "space") if have.get(k) != want[k]]
        if differs:
            raise RecipeError(
                f"tune: study '{job.study}' in {job.storage} was made for another {' and '.join(differs)}: "
                "give --study NAME for a new study (or the same recipe and space to resume it)"
            )
    return study, storage


def _counted(study) -> tuple[int, int, int]:
    """(trials that count toward --trials, queued ones, running ones): a failed trial that was queued again is
    its retry, not a trial of its own."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get(HISTORY_ATTR, [])}
    counted = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(counted), waiting, running


def next_trial(study, job: TuneJob):
    """The next trial to run (a queued retry first), or None when the study has its trials; under the lock."""
    from optuna.storages import fail_stale_trials

    with study_lock(job.storage, job.study):
        fail_stale_trials(study)  # a dead worker's trial: failed, and queued again with its values
        counted, waiting, _ = _counted(study)
        if waiting == 0 and counted >= job.trials:
            return None
        return study.ask()


def _folder_of(study, storage, trial) -> str:
    """A trial's folder: a retry's is the killed trial's (its checkpoint resumes), else trial-<number>."""
    origin = storage.get_trial_system_attrs(trial._trial_id).get(RETRY_ATTR)
    if origin is not None:
        before = study.get_trials(deepcopy=False)[origin]
        return before.user_attrs.get(FOLDER_ATTR, f"trial-{origin}")
    return f"trial-{trial.number}"


def run_trial(ctx: RunContext, study, storage, trial, job: TuneJob) -> None:
    """Train one trial's student, report each validation epoch to the pruner, tell the study how it ended."""
    import optuna
    from optuna.trial import TrialState

    values = job.space.suggest(trial)
    folder = _folder_of(study, storage, trial)
    trial.set_user_attr(FOLDER_ATTR, folder)
    key = f"tune/{job.study}/{folder}"
    seen = {"epochs": 0}

    def prune(step_key: str, record: dict) -> None:
        score = record.get("val_r2", record.get("val_top1"))
        if step_key != key or score is None:
            return
        seen["epochs"] += 1
        trial.report(float(score), step=int(record["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {record['epoch'] + 1}: validation {score:.4f}")

    started = time.perf_counter()
    log.info("tune: trial %d (%s): %s", trial.number, folder, values)
    state, value, reason = TrialState.FAIL, None, ""
    with Heartbeat(storage, trial._trial_id, job.heartbeat):
        try:
            recipe = trial_recipe(ctx.recipe, values, job.space.source)  # a combination the recipe refuses: failed
            cell = ctx.derive(recipe)
            cell.steps[key] = Step(key, key, "student", recipe.student, ctx.steps["distill"].teacher, STUDENT_SECTIONS)
            cell.epoch_hooks = [prune]
            report = train_step(cell, key)
            state, value = TrialState.COMPLETE, float(report["score"])
        except optuna.TrialPruned as exc:
            state, reason = TrialState.PRUNED, str(exc)
        except EdgedistillError as exc:  # a diverging trial is a row with its status, not the end of the study
            reason = str(exc).splitlines()[0][:300]
            log.warning("tune: trial %d failed: %s", trial.number, reason)
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    trial.set_user_attr("epochs_validated", seen["epochs"])
    if reason:
        trial.set_user_attr("reason", reason)
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    ctx.tracker.log_stage(
        key,
        params=values,
        metrics={"value": value} if value is not None else {},
        tags={"trial": trial.number, "state": state.name, "study": job.study},
    )
    log.info(
        "tune: trial %d %s%s",
        trial.number,
        state.name.lower(),
        f": {value:.4f}" if value is not None else f" ({reason})",
    )


def _others_running(study) -> bool:
    return _counted(study)[2] > 0


def work(ctx: RunContext, job: TuneJob) -> int:
    """One worker's loop: trials until the study has its count (waiting out others' last trials, which may be
    a killed worker's, to run them again); returns the trials this worker ran."""
    study, storage = open_study(ctx, job)
    ran = 0
    while True:
        trial = next_trial(study, job)
        if trial is None:
            if _others_running(study):
                time.sleep(max(1, job.heartbeat // 2))  # another worker's last trial: done soon, or failed stale
                continue
            return ran
        run_trial(ctx, study, storage, trial, job)
        ran += 1


def prepare_teacher(ctx: RunContext) -> None:
    """The teacher (and assistants) once for the study, under a lock: the first worker trains, the others wait
    for it and find the stage done."""
    with file_lock(ctx.run_dir / "tune" / ".teacher.lock"):
        run_stage(ctx, "teacher")
        check_teacher_floor(ctx, "tune")
        run_stage(ctx, "assistant")


def _worker_command(job: TuneJob, index: int) -> list[str]:
    return [sys.executable, "-m", "edgedistill", *job.argv, "--workers", "1", "--worker-index", str(index)]


def run_tune(ctx: RunContext, job: TuneJob) -> dict[str, Any]:
    """The whole command: the teacher, the workers (this process, or ``--workers`` processes), the results."""
    prepare_teacher(ctx)
    if job.workers > 1:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // job.workers)))
        procs = [subprocess.Popen(_worker_command(job, i + 1), env=env) for i in range(job.workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            log.warning(
                "tune: %d of %d workers ended with an error (exit %s)", sum(map(bool, codes)), job.workers, codes
            )
    else:
        work(ctx, job)
    if job.worker_index:
        return {}
    return write_results(ctx, job)


def _rows(study, space: SearchSpace) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.WAITING,):
            continue
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                **{k: t.params.get(k) for k in space.dims},
                "epochs_validated": t.user_attrs.get("epochs_validated"),
                "seconds": t.user_attrs.get("seconds"),
                "folder": t.user_attrs.get(FOLDER_ATTR, ""),
                "reason": t.user_attrs.get("reason", ""),
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def _plots(study) -> dict[str, bytes]:
    """Optuna's optimisation history and (with two finished trials or more) parameter importances, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    pngs: dict[str, bytes] = {}
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    makers = [("optimisation history", optuna.visualization.matplotlib.plot_optimization_history)]
    if len(done) >= 2:
        makers.append(("parameter importances", optuna.visualization.matplotlib.plot_param_importances))
    for title, make in makers:
        try:
            ax = make(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances with one value per parameter
            log.warning("tune: no %s plot (%s)", title, exc)
            continue
        buffer = io.BytesIO()
        ax.figure.set_size_inches(7, 4)
        ax.figure.tight_layout()
        ax.figure.savefig(buffer, format="png", dpi=110)
        plt.close(ax.figure)
        pngs[title] = buffer.getvalue()
    return pngs


def write_results(ctx: RunContext, job: TuneJob) -> dict[str, Any]:
    """trials.csv, trials.md, best.yaml and the report with the plots; the best trial's facts."""
    from edgedistill.judge.anomaly_report import write_report

    study, _ = open_study(ctx, job)
    folder = ctx.run_dir / "tune" / job.study
    folder.mkdir(parents=True, exist_ok=True)
    rows = _rows(study, job.space)
    columns = list(rows[0]) if rows else ["trial", "state", "value"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "trials.csv", buffer.getvalue())
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    metric = ctx.evaluation.metric_title if ctx.recipe.task != "regression" else "R^2"
    lines = [
        f"# {ctx.recipe.name}: study '{job.study}'",
        "",
        f"{len(rows)} trials ({counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed) "
        f"of --trials {job.trials}; sampler {job.sampler}, pruner {job.pruner}; value: validation {metric} of the "
        f"student `{ctx.recipe.student.model}` taught by `{ctx.recipe.teacher.model}`; storage {job.storage}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    best: dict[str, Any] = {}
    try:
        chosen = study.best_trial
    except ValueError:  # no complete trial
        chosen = None
    if chosen is not None:
        best_recipe = trial_recipe(ctx.recipe, chosen.params, job.space.source)
        atomic_write_text(folder / "best.yaml", best_recipe.to_yaml())
        best = {"trial": chosen.number, "value": chosen.value, "params": dict(chosen.params)}
        lines += [
            "",
            f"Best: trial {chosen.number}, validation {metric} {chosen.value:.4f}, with "
            + ", ".join(f"{k} = {_fmt(v)}" for k, v in chosen.params.items())
            + f"; its recipe: {folder / 'best.yaml'} (`edgedistill run` it to evaluate on the test split).",
        ]
    atomic_write_text(folder / "trials.md", "\n".join(lines) + "\n")
    write_report(folder, lines, _plots(study), title=f"study {job.study}")
    log.info("tune: %s", lines[2])
    return {"rows": rows, "best": best, "folder": str(folder)}
