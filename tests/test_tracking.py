"""MLflow tracking and registry against a real `mlflow server` (SQLite backend, local artifacts, loopback): a run is
read back through MlflowClient (params, per-epoch metric history, final figures, artifacts, nested stage runs), a
killed run continues the same MLflow run, the bundle registers as a version whose .edb is the run folder's bytes,
and a tracking server that cannot be reached or refuses a write costs one warning, never the run or its figures."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import FAST, deep_update, free_port, kill_when_written

pytest.importorskip("mlflow", reason="MLflow is the [tracking] extra (scripts/setup_env.sh installs it)")

from mlflow.tracking import MlflowClient  # noqa: E402

from edgedistill.cli import main as edgedistill  # noqa: E402


def _recipe(tmp_path: Path, uri: str, name: str = "parts", **extra) -> Path:
    data = deep_update(
        FAST,
        {
            "name": name,
            "output": str(tmp_path / "run"),
            "tracking": {"mlflow": {"uri": uri, "experiment": f"line-{name}"}},
            **extra,
        },
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_killed_run_continues_its_mlflow_run_registers_and_reads_back(mlflow_server, tmp_path, capsys):
    recipe = _recipe(tmp_path, mlflow_server, export={**FAST["export"], "target": "jetson-nano-jp4"})
    run = tmp_path / "run"
    kill_when_written(["run", str(recipe)], run / "student" / "last.safetensors")
    first = json.loads((run / "tracking.json").read_text())
    assert edgedistill(["run", str(recipe)]) == 0
    state = json.loads((run / "tracking.json").read_text())
    assert state["run_id"] == first["run_id"]  # the same MLflow run, continued
    client = MlflowClient(mlflow_server)
    parent = client.get_run(state["run_id"])
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())  # the resolved recipe, every key as dotted params
    assert params["distill.temperature"] == str(resolved["distill"]["temperature"])
    assert params["student.model"] == "mobilenetv3_small_050" and params["data.source"] == "digits"
    summary = json.loads((run / "summary.json").read_text())
    assert parent.data.metrics["retention"] == pytest.approx(summary["retention"])
    assert parent.data.metrics["kd_gain"] == pytest.approx(summary["kd_gain"])
    assert parent.data.metrics["kd_gain_p_value"] == pytest.approx(summary["significance"]["p_value"])
    assert parent.data.metrics["planner_fps"] == pytest.approx(summary["device_estimate"]["student"]["est_fps"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.md", "report.html", "bundle", "recipe.yaml"} <= artifacts
    # a nested run per stage, each epoch once with its step, even across the kill
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {r.data.tags["stage"]: r for r in children}
    assert {"teacher", "distill", "baseline", "evaluate", "export"} <= set(stages)
    assert all(r.info.status == "FINISHED" for r in stages.values())
    history = client.get_metric_history(stages["distill"].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(FAST["student"]["epochs"]))
    assert {"kd", "ce", "val_top1", "lr"} <= set(stages["distill"].data.metrics)
    metrics = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m.get("kind") == "epoch"][-1]
    assert stages["distill"].data.metrics["val_top1"] == pytest.approx(last["val_top1"])
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["tracking"]["mlflow_run_id"] == state["run_id"]

    # the bundle registers as a version: the run folder's .edb, byte for byte, tagged
    key = tmp_path / "line.key"
    assert edgedistill(["keygen", "-o", str(key)]) == 0
    assert edgedistill(["export", str(recipe), "--register", "parts", "--sign", str(key)]) == 0
    assert "registered models:/parts/1" in capsys.readouterr().out
    version = client.get_model_version("parts", "1")
    assert version.run_id == state["run_id"]
    tags = version.tags
    assert tags["sha256"] == _sha256(run / "parts.edb") and tags["signed_by"] != "unsigned"
    assert tags["metric"] == "top1" and float(tags["metric_value"]) == pytest.approx(summary["student"]["top1"])
    assert tags["precisions"].startswith("fp32,fp16")
    client.set_registered_model_alias("parts", "line-3", "1")
    from edgedistill.run.registry import RegisteredBundle, RegistryError

    fetched = RegisteredBundle("models:/parts@line-3", mlflow_server, tmp_path / "cache")
    assert fetched.version == "1" and _sha256(fetched.edb) == _sha256(run / "parts.edb")
    fetched.record_deploy([{"host": "nvidia@line1", "status": "FAIL", "fps_p50": 41.5, "reason": "fps 41.5 < 60"}])
    tags = client.get_model_version("parts", "1").tags
    assert tags["deploy.nvidia_line1.status"] == "FAIL" and tags["deploy.nvidia_line1.fps_p50"] == "41.5"
    with pytest.raises(RegistryError, match="not in the registry"):
        RegisteredBundle("models:/parts/7", mlflow_server, tmp_path / "cache")
    with pytest.raises(RegistryError, match="models:/NAME/VERSION"):
        RegisteredBundle("models:/parts/latest/x", mlflow_server, tmp_path / "cache")


@pytest.mark.slow
def test_an_unreachable_server_warns_once_and_the_figures_are_the_same(trained_run, tmp_path, capsys):
    """The session's untracked run beside the same recipe tracked to a port nobody listens on."""
    resolved = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    resolved["output"] = str(tmp_path / "run")
    resolved["tracking"] = {"mlflow": {"uri": f"http://127.0.0.1:{free_port()}"}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(resolved))
    assert edgedistill(["run", str(recipe)]) == 0
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("cannot be reached") == 1 and "the run goes on without tracking" in log
    assert not (tmp_path / "run" / "tracking.json").exists()
    a = json.loads((trained_run / "summary.json").read_text())
    b = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("retention", "kd_gain"):
        assert b[key] == pytest.approx(a[key], abs=1e-9)
    for role in ("teacher", "student", "baseline"):
        assert b[role]["top1"] == pytest.approx(a[role]["top1"], abs=1e-9)


def test_a_refused_write_is_one_warning_and_tracking_stops(tmp_path, caplog, monkeypatch):
    """A server that accepted the run and then refuses writes (full disk, permissions, gone): one warning."""
    from mlflow.exceptions import MlflowException

    from edgedistill.recipe.loading import load_recipe
    from edgedistill.run.tracking import MlflowTracker, TrackingUnavailable, open_tracker

    recipe = load_recipe(_recipe(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"))
    tracker = open_tracker(recipe, tmp_path / "run")
    assert isinstance(tracker, MlflowTracker)
    tracker.log_epoch("teacher", {"epoch": 0, "loss": 1.5})

    def refuse(*args, **kwargs):
        raise MlflowException("INTERNAL_ERROR: disk full")

    tracker.client.log_batch = refuse
    with caplog.at_level(logging.WARNING):
        for epoch in range(1, 4):
            tracker.log_epoch("teacher", {"epoch": epoch, "loss": 1.0})
        tracker.log_summary({"retention": 0.9})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage() and not tracker.enabled
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        json.loads((tmp_path / "run" / "tracking.json").read_text())["stages"]["teacher"]["run_id"], "loss"
    )
    assert [m.step for m in history] == [0]  # what was written before the refusal stays
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingUnavailable, match="tracking.mlflow has no uri"):
        open_tracker(load_recipe(_recipe(tmp_path, None)), tmp_path / "other")


def test_a_stage_run_the_kill_left_unrecorded_is_found_again_not_doubled(tmp_path, monkeypatch):
    """Killed between making a stage's nested run and writing it into tracking.json: the run started again finds
    that nested run on the server and goes on in it, each epoch once."""
    from edgedistill.recipe.loading import load_recipe
    from edgedistill.run.tracking import open_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = load_recipe(_recipe(tmp_path, uri))
    first = open_tracker(recipe, tmp_path / "run")
    first.log_epoch("teacher", {"epoch": 0, "loss": 2.0})
    state_path = tmp_path / "run" / "tracking.json"
    state = json.loads(state_path.read_text())
    stage_run = state["stages"].pop("teacher")["run_id"]
    state_path.write_text(json.dumps(state))  # what the file held when the kill came
    again = open_tracker(recipe, tmp_path / "run")
    assert again.run_id == first.run_id
    for epoch in (0, 1, 2):  # epoch 0 again: restored from the checkpoint, replayed to the hook
        again.log_epoch("teacher", {"epoch": epoch, "loss": 2.0 - epoch / 2})
    client = MlflowClient(uri)
    children = client.search_runs([state["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'")
    assert [r.info.run_id for r in children] == [stage_run]
    assert [m.step for m in client.get_metric_history(stage_run, "loss")] == [0, 1, 2]
