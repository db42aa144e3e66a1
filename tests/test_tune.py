"""`edgedistill tune`: the search space checked like a recipe; a study that finishes exactly --trials trials, writes
the best recipe, the table and Optuna's plots, and resumes after a kill (SQLite); two workers on a real PostgreSQL
sharing one study, one of them killed mid-trial: its trial is failed (not left running) and run again, no trial
lost or run twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAST, deep_update, kill_tree, kill_when_written

pytest.importorskip("optuna", reason="Optuna is the [tune] extra (scripts/setup_env.sh installs it)")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from edgedistill.errors import RecipeError  # noqa: E402
from edgedistill.recipe.loading import load_recipe  # noqa: E402
from edgedistill.run.tune_space import load_space  # noqa: E402

SPACE = "distill.temperature: {low: 1, high: 8, log: true}\ndistill.alpha: {low: 0.1, high: 0.9}\n"


def _recipe(folder: Path, name: str = "tuned") -> Path:
    data = deep_update(
        FAST,
        {
            "name": name,
            "output": str(folder / "run"),
            "teacher": {"epochs": 3},
            "student": {"epochs": 3},
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    (folder / "space.yaml").write_text(SPACE)
    return path


def test_a_search_space_is_checked_like_a_recipe(tmp_path):
    base = load_recipe(_recipe(tmp_path))
    cases = {
        "distill.temprature: {low: 1, high: 4}": "did you mean 'distill.temperature'",
        "teacher.lr: {low: 0.001, high: 0.01}": "the teacher is trained once",
        "data.image_size: {choices: [16, 24]}": "the data is loaded once",
        "distill.alpha: {low: 0.9, high: 0.1}": "low (0.9) must be below high (0.1)",
        "student.lr: {low: 0, high: 0.1, log: true}": "log: true needs low > 0",
        "student.epochs: {low: 2.5, high: 8}": "takes whole numbers",
        "distill.alpha: {low: 0.1, high: 1.5}": "distill.alpha",  # the recipe's own bound refuses 1.5
        "distill.method: {choices: [kd, nonsense]}": "distill.method",
        "distill.alpha: 0.5": "give {low: A, high: B} or {choices",
        "student.lr: {low: 0.001, hgh: 0.01}": "hgh",
    }
    for text, expected in cases.items():
        path = tmp_path / "space.yaml"
        path.write_text(text + "\n")
        with pytest.raises(RecipeError, match="space.yaml") as err:
            load_space(path, base)
        assert expected in str(err.value), (text, str(err.value))
    path.write_text("student.epochs: {low: 2, high: 6, step: 2}\ndistill.method: {choices: [kd, dkd]}\n")
    space = load_space(path, base)
    assert space.integer["student.epochs"] and space.grid() == {
        "student.epochs": [2, 4, 6],
        "distill.method": ["kd", "dkd"],
    }


def _trials(storage: str, study: str):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _check_study(trials, n: int) -> None:
    """Exactly n trials count (complete or pruned), none running or queued, every failed one retried."""
    retried = {k for t in trials for k in t.system_attrs.get("retry_history", [])}
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert all(t.number in retried for t in trials if t.state == TrialState.FAIL), "a failed trial was lost"
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n


@pytest.mark.slow
def test_a_study_finishes_its_trials_writes_the_best_recipe_and_resumes_after_a_kill(tmp_path):
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    args = ["tune", str(recipe), "--space", str(tmp_path / "space.yaml"), "--trials", "4", "--heartbeat", "1"]
    kill_when_written(args, run / "tune" / "tuned" / "trial-1" / "last.safetensors")
    done = subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(f"sqlite:///{run / 'tune.db'}", "tuned")
    _check_study(trials, 4)
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in killed] == [1]  # the killed worker's trial: failed, not left running
    retry = [t for t in trials if 1 in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].user_attrs["folder"] == "trial-1"  # run again in its folder, resumed
    assert retry[0].params == killed[0].params
    assert "resuming after epoch" in (run / "run.log").read_text()
    table = (run / "tune" / "tuned" / "trials.csv").read_text().splitlines()
    assert table[0].startswith("trial,state,value,distill.temperature,distill.alpha") and len(table) == 1 + len(trials)
    best = yaml.safe_load((run / "tune" / "tuned" / "best.yaml").read_text())
    winner = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best["distill"]["temperature"] == pytest.approx(winner.params["distill.temperature"])
    assert best["distill"]["alpha"] == pytest.approx(winner.params["distill.alpha"])
    report = (run / "tune" / "tuned" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2  # optimisation history, parameter importances
    for t in trials:  # the value is the validation split's metric, as the trial's own report says
        if t.state == TrialState.COMPLETE:
            folder = run / "tune" / "tuned" / t.user_attrs["folder"]
            assert json.loads((folder / "report.json").read_text())["score"] == pytest.approx(t.value)
    # the same command again: the study has its trials, nothing more runs
    again = subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True)
    assert again.returncode == 0 and len(_trials(f"sqlite:///{run / 'tune.db'}", "tuned")) == len(trials)
    # another space on the same study is refused, naming what differs
    (tmp_path / "space.yaml").write_text("distill.alpha: {low: 0.2, high: 0.8}\n")
    other = subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True)
    assert other.returncode == 2 and "made for another space" in " ".join((other.stdout + other.stderr).split())


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_killed_workers_trial_runs_again(postgres_url, tmp_path):
    """Two "machines" (two run folders, one database): worker A is killed in the middle of a trial; B finishes
    the study, failing A's trial once its heartbeat is stale and running it again."""
    procs, runs = {}, {}
    for name in ("a", "b"):
        recipe = _recipe(tmp_path / name)
        runs[name] = tmp_path / name / "run"
        args = ["tune", str(recipe), "--space", str(tmp_path / name / "space.yaml"), "--trials", "5"]
        args += ["--storage", postgres_url, "--study", "line", "--heartbeat", "1"]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "edgedistill", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.time() + 300
    while time.time() < deadline and not list((runs["a"] / "tune" / "line").glob("trial-*/last.safetensors")):
        assert procs["a"].poll() is None, procs["a"].stderr.read()[-3000:]
        time.sleep(0.05)
    kill_tree(procs["a"])
    assert procs["b"].wait(timeout=600) == 0, procs["b"].stderr.read()[-3000:]
    trials = _trials(postgres_url, "line")
    _check_study(trials, 5)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # A's trial, killed: failed by B (its heartbeat went stale) and queued again
    done_in = {}
    for name, run in runs.items():
        for done in (run / "tune" / "line").glob("trial-*/done.json"):
            done_in.setdefault(done.parent.name, []).append(name)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(done_in.get(t.user_attrs["folder"]) and len(done_in[t.user_attrs["folder"]]) == 1 for t in finished)
    assert len({t.user_attrs["folder"] for t in finished}) == len(finished)  # no trial run twice
    retry = [t for t in trials if failed[0].number in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_a_grid_study_run_by_ask_and_tell_ends_by_its_count():
    """Optuna's grid sampler stops a study when its cells are taken, which raises outside Study.optimize."""
    from edgedistill.run.tune import _grid

    study = optuna.create_study(sampler=_grid({"distill.alpha": [0.2, 0.4], "distill.temperature": [2.0]}, 0))
    seen = []
    for _ in range(2):
        trial = study.ask()
        seen.append(trial.suggest_categorical("distill.alpha", [0.2, 0.4]))
        trial.suggest_categorical("distill.temperature", [2.0])
        study.tell(trial, 0.5)  # the last cell: no RuntimeError from study.stop()
    assert sorted(seen) == [0.2, 0.4]
