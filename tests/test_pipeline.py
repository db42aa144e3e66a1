"""End to end on real data (scikit-learn's digits): every stage, resume, kill, NaN, teacher floor."""

import json

import pytest
from conftest import kill_when_written

from edgedistill.cli import main
from edgedistill.train import loop as train_loop

pytestmark = pytest.mark.slow


def test_full_run_writes_every_artifact_and_skips_when_done(make_recipe, tmp_path, capsys):
    recipe = make_recipe({"evaluate": {"cost": {"requests_per_month": 1e7, "price_per_hour": 0.1}}})
    assert main(["run", str(recipe), "--stages", "teacher,distill,baseline,evaluate"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("retention", "kd_gain", "size_reduction", "speedup"):
        assert isinstance(summary[key], float)
    for role in ("teacher", "student", "baseline"):
        assert 0.0 <= summary[role]["top1"] <= 1.0 and summary[role]["params"] > 0
    assert summary["retention"] == pytest.approx(summary["student"]["top1"] / summary["teacher"]["top1"])
    assert summary["kd_gain"] == pytest.approx(summary["student"]["top1"] - summary["baseline"]["top1"])
    assert summary["student"]["params"] == summary["baseline"]["params"] < summary["teacher"]["params"]
    assert summary["cost"]["teacher"]["monthly_cost"] >= summary["cost"]["student"]["monthly_cost"] > 0
    assert summary["teacher"]["top1"] > 0.3  # 2 epochs on real digits beat chance (0.1) by far
    report = json.loads((run / "teacher" / "report.json").read_text())
    assert len(report["confusion_matrix"]) == 10 and 0 <= report["ece"] <= 1 and "per_class" in report
    assert (run / "teacher" / "report.md").read_text().startswith("# Teacher")
    for stage in ("teacher", "student", "baseline"):
        assert (run / stage / "model.safetensors").exists() and (run / stage / "recipe.yaml").exists()
    steps = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "ce", "loss"} <= set(steps[0]) and steps[-1]["kind"] == "epoch"
    base_steps = [json.loads(line) for line in (run / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert "kd" not in base_steps[0]
    assert "retention" in capsys.readouterr().out
    # a second run with the same recipe skips every stage and leaves the checkpoints untouched
    stamp = (run / "student" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(recipe), "--stages", "teacher,distill,baseline,evaluate"]) == 0
    assert (run / "student" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "skipped" in (run / "run.log").read_text()
    # changing the student's recipe re-runs distill and baseline, not the teacher
    teacher_stamp = (run / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(recipe), "--stages", "teacher,distill", "--set", "distill.temperature=4"]) == 0
    assert (run / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher_stamp
    assert (run / "student" / "model.safetensors").stat().st_mtime_ns != stamp


def test_killed_run_resumes_from_its_last_epoch(make_recipe, tmp_path):
    recipe = make_recipe({"teacher": {"epochs": 6}, "data": {"train_per_class": 60}})
    kill_when_written(["teacher", str(recipe)], tmp_path / "run" / "teacher" / "last.safetensors", timeout=240)
    assert not (tmp_path / "run" / "teacher" / "done.json").exists()
    assert main(["teacher", str(recipe)]) == 0
    log = (tmp_path / "run" / "run.log").read_text()
    assert "resuming after epoch" in log
    epochs = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]
    assert epochs == list(range(6))  # each epoch exactly once, none lost, none doubled
    assert (tmp_path / "run" / "teacher" / "done.json").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(make_recipe, tmp_path, monkeypatch, capsys):
    recipe = make_recipe({"teacher": {"epochs": 3}})
    real = train_loop.compute_loss
    calls = {"n": 0}

    def poisoned(logits, *args, **kwargs):
        calls["n"] += 1
        out = real(logits, *args, **kwargs)
        if calls["n"] > 17:  # after the first epoch (15 steps)
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(train_loop, "compute_loss", poisoned)
    assert main(["teacher", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "nan" in err and "epoch 2" in err and "last.safetensors" in err and "Lower the learning rate" in err
    assert (tmp_path / "run" / "teacher" / "last.safetensors").exists()
    monkeypatch.setattr(train_loop, "compute_loss", real)
    assert main(["teacher", str(recipe)]) == 0  # resumes from the kept checkpoint
    assert "resuming after epoch 1/3" in (tmp_path / "run" / "run.log").read_text()


def test_weak_teacher_is_refused_unless_forced(make_recipe, tmp_path, capsys):
    recipe = make_recipe({"teacher": {"epochs": 0, "min_top1": 0.9}, "student": {"epochs": 1}})
    assert main(["teacher", str(recipe)]) == 0
    assert main(["distill", str(recipe)]) == 2
    assert "teacher.min_top1" in capsys.readouterr().err
    assert main(["distill", str(recipe), "--force"]) == 0


def test_stage_order_and_cli_errors(make_recipe, capsys):
    recipe = make_recipe()
    assert main(["evaluate", str(recipe)]) == 2
    assert "edgedistill teacher" in capsys.readouterr().err
    assert main(["distill", str(recipe)]) == 2
    assert "distill needs the 'teacher' stage" in capsys.readouterr().err
    assert main(["run", str(recipe), "--set", "studnet.epochs=1"]) == 2
    assert "'student'" in capsys.readouterr().err
    assert main(["run", str(recipe), "--stages", "teacher,distil"]) == 2


def test_feature_hint_distillation_trains_and_logs_its_term(make_recipe, tmp_path):
    recipe = make_recipe({"distill": {"features": "last", "feature_weight": 0.5}, "student": {"epochs": 2}})
    assert main(["run", str(recipe), "--stages", "teacher,distill"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(
        s["loss"] == pytest.approx(0.6 * s["kd"] + 0.4 * s["ce"] + 0.5 * s["feat"], rel=1e-4)
        for s in steps
        if s["kind"] == "step"
    )
    assert steps[-1]["feat"] >= 0
    # the saved student is the student alone (the projector is not exported)
    from edgedistill.models.checkpoint import load_tensors

    tensors, _ = load_tensors(tmp_path / "run" / "student" / "model.safetensors")
    assert not any(k.startswith(("features.", "proj")) for k in tensors)
    # feature_weight alone (the former switch) now names the key to set
    old = make_recipe({"distill": {"feature_weight": 0.5}}, name="old.yaml")
    assert main(["distill", str(old)]) == 2


def test_same_seed_gives_the_same_training(make_recipe, tmp_path):
    """Shuffling, augmentation and initialisation follow the seed: two runs log identical losses."""
    logs = []
    for name in ("a", "b"):
        recipe = make_recipe({"output": str(tmp_path / name), "teacher": {"epochs": 1}}, name=f"{name}.yaml")
        assert main(["teacher", str(recipe)]) == 0
        logs.append(
            [
                json.loads(line)["loss"]
                for line in (tmp_path / name / "teacher" / "metrics.jsonl").read_text().splitlines()
            ]
        )
    assert logs[0] == logs[1]


def test_teacher_assistant_bridges_teacher_and_student(make_recipe, tmp_path):
    recipe = make_recipe(
        {"assistant": {"model": "mobilenetv3_small_100", "epochs": 2, "lr": 0.005}, "student": {"epochs": 2}}
    )
    assert main(["run", str(recipe), "--stages", "teacher,assistant,distill,baseline,evaluate"]) == 0
    run = tmp_path / "run"
    assert (run / "assistant" / "model.safetensors").exists() and (run / "assistant" / "report.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["assistant"]["model"] == "mobilenetv3_small_100"
    assert summary["teacher"]["params"] > summary["assistant"]["params"] > summary["student"]["params"]
    assert "teacher assistant" in (run / "run.log").read_text()
