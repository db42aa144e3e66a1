"""Quantization-aware distillation end to end on real digits: killed during its fine-tuning and resumed, the Q/DQ
model it exports keeps TensorRT's rules, and the attempts land in the manifest and the summary."""

import json

import onnx
import pytest
from conftest import kill_when_written

from edgedistill.cli import main
from edgedistill.ship.qdq import qdq_violations

pytestmark = pytest.mark.slow


def test_qad_resumes_after_a_kill_and_ships_a_rule_clean_model(make_recipe, tmp_path):
    recipe = make_recipe(
        {"data": {"train_per_class": 60}, "export": {"target": "jetson-nano-jp4", "int8": "qad", "qad_epochs": 3}}
    )
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--stages", "teacher,distill,baseline,evaluate"]) == 0
    kill_when_written(["export", str(recipe)], run / "qad" / "last.safetensors")
    assert not (run / "export.done.json").exists()
    assert main(["export", str(recipe)]) == 0
    assert "qad: resuming after epoch 1/3" in (run / "run.log").read_text()
    epochs = [
        json.loads(line)["epoch"]
        for line in (run / "qad" / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in line
    ]
    assert epochs == [0, 1, 2]  # each epoch once: the killed one redone, none doubled
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    int8 = manifest["metrics"]["int8"]
    qad = int8["attempts"]["qad"]
    # by default QAD recovers the FP32 student: the student's own FP32 outputs teach its fake-quantized copy
    assert qad["epochs"] == 3 and qad["teacher"] == "student" and qad["train_seconds"] > 0
    assert qad["objective"].startswith("recovery")
    assert qad["student_train_seconds"] > 0 and "kd" in (run / "qad" / "metrics.jsonl").read_text()
    assert set(int8["attempts"]) >= {"ptq", "qad"}
    if int8["attempts"]["qad"]["passes"]:
        assert manifest["variants"]["int8"]["method"] == "qad" and int8["status"] == "accepted"
    assert qdq_violations(onnx.load(str(run / "bundle" / "model.int8.onnx"))) == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["int8"]["attempts"]["qad"]["epochs"] == 3
    assert "INT8 on the host (ONNX Runtime" in (run / "summary.md").read_text()
    # the run's teacher instead (retraining, said so): another fingerprint, so QAD runs again
    assert main(["export", str(recipe), "--set", "export.qad_teacher=teacher"]) == 0
    assert "against the FP32 teacher" in (run / "run.log").read_text()
    retrained = json.loads((run / "bundle" / "manifest.json").read_text())["metrics"]["int8"]["attempts"]["qad"]
    assert retrained["teacher"] == "teacher" and retrained["objective"].startswith("retraining")
