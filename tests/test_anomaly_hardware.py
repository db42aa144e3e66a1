"""Anomaly training on the hardware as classification's: mixed precision (train.amp: bf16 and fp16 with its grad
scaler, whose state resumes) and torchrun (two gloo processes share each batch, take the one-process steps, rank 0
alone writes, and a killed pair resumes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import TORCHRUN, image_tensor, kill_when_written

pytest.importorskip("skimage", reason="the texture bench needs scikit-image (the [anomaly] extra; .ci/run installs it)")

from edgedistill.data.generic import generic_images  # noqa: E402
from edgedistill.data.textures import texture_set  # noqa: E402
from edgedistill.train.anomaly import StfpmJob, train_stfpm  # noqa: E402
from edgedistill.train.anomaly_steps import StepRunner  # noqa: E402
from edgedistill.train.efficientad import EfficientAdJob, train_efficientad  # noqa: E402
from edgedistill.train.epoch_state import EpochState  # noqa: E402


@pytest.fixture(scope="module")
def good():
    return image_tensor(texture_set("brick", 12, 0, 32, seed=0, region=(0.0, 0.5)).images)


@pytest.fixture(scope="module")
def teacher():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False)  # random weights: only the arithmetic is under test


def test_bf16_trains_stfpm_close_to_full_precision(good, teacher):
    full = StfpmJob(teacher=teacher, good=good, stages=(1, 2), epochs=2, batch_size=6)
    half = StfpmJob(teacher=teacher, good=good, stages=(1, 2), epochs=2, batch_size=6, amp="bf16")
    a, b = train_stfpm(full), train_stfpm(half)
    losses = [r["loss"] for r in half.history]
    assert all(np.isfinite(losses))
    assert losses[0] == pytest.approx(full.history[0]["loss"], rel=0.05)  # the same steps, at bf16's precision
    x = good[:2]
    assert a(x)[1].dtype == b(x)[1].dtype == torch.float32  # the detector that ships is full precision
    assert not torch.equal(a(x)[0], b(x)[0])  # and bf16 did run: the weights differ in their last bits


def test_fp16_scales_gradients_and_its_scaler_resumes(good, teacher, tmp_path):
    runner = StepRunner("fp16", "cpu")
    assert runner.scaler.is_enabled() and runner.dtype == torch.float16
    assert StepRunner("auto", "cpu").dtype is None and not StepRunner("auto", "cpu").scaler.is_enabled()
    other = image_tensor(generic_images(8, 32, seed=0))
    state = EpochState(tmp_path / "training.pt", "fp")
    job = EfficientAdJob(
        teacher=teacher, good=good, other=other, stages=(2, 3), channels=8, width=8, teacher_epochs=1, epochs=1,
        batch_size=6, amp="fp16", state=state,
    )  # fmt: skip
    train_efficientad(job)
    saved = state.load()
    assert saved["phase"] == "detector" and saved["scaler"]["scale"] > 0  # the scaler's state is in the epoch state
    assert all(np.isfinite(r["loss"]) for r in job.history + job.teacher_history)
    resumed = StepRunner("fp16", "cpu")
    resumed.load_state_dict(saved)
    assert resumed.scaler.get_scale() == saved["scaler"]["scale"]


def _write(split_dir: Path, sample) -> None:
    for i, (image, kind) in enumerate(zip(sample.images, sample.defect)):
        folder = split_dir / (kind or "good")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _history(run: Path) -> dict:
    saved = torch.load(run / "anomaly" / "detector.pt", map_location="cpu", weights_only=True)
    return {"teacher": saved["teacher_history"], "detector": saved["history"], "state": saved["state_dict"]}


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_and_resume_after_a_kill(tmp_path):
    """efficientad under torchrun: the small teacher's steps (a mean-squared error, exactly shared between the
    processes) are the one-process steps; the detector's come close (its hard-feature quantile is each process's);
    killed after an epoch, the pair resumes; rank 0 alone writes the run."""
    root = tmp_path / "parts"
    _write(root / "train", texture_set("brick", 16, 0, 32, seed=0, region=(0.0, 0.5)))
    _write(root / "val", texture_set("brick", 12, 4, 32, seed=1, region=(0.5, 1.0)))
    recipes = {}
    for name in ("one", "two"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipe = {
            "name": name,
            "task": "anomaly",
            "output": str(tmp_path / name),
            "data": {"source": "folder", "root": str(root), "image_size": 32},
            "teacher": {"model": "resnet18"},
            "anomaly": {
                "method": "efficientad", "stages": [2, 3], "width": 8, "channels": 8, "teacher_epochs": 3,
                "epochs": 3, "batch_size": 8, "other_images": 8,
            },
            "evaluate": {"operating_point": {"max_false_reject": 0.2}},
            "export": {"int8": "off"},
        }  # fmt: skip
        recipes[name].write_text(yaml.safe_dump(recipe))
    one = subprocess.run(
        [sys.executable, "-m", "edgedistill", "run", str(recipes["one"])], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = TORCHRUN
    run = tmp_path / "two"
    kill_when_written(["run", str(recipes["two"])], run / "anomaly" / "training.pt", command=torchrun)
    assert not (run / "anomaly" / "detector.pt").exists(), "the run finished before it could be killed"
    two = subprocess.run([*torchrun, "run", str(recipes["two"])], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    log = (run / "run.log").read_text()
    assert "anomaly: resuming" in log and "anomaly detector epoch 3/3" in log
    a, b = _history(tmp_path / "one"), _history(run)
    assert [r["epoch"] for r in b["teacher"]] == [1, 2, 3] and [r["epoch"] for r in b["detector"]] == [1, 2, 3]
    for ra, rb in zip(a["teacher"], b["teacher"]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    torch.testing.assert_close(
        b["state"]["teacher.body.0.weight"], a["state"]["teacher.body.0.weight"], rtol=1e-3, atol=1e-5
    )
    for ra, rb in zip(a["detector"], b["detector"]):
        assert rb["ae"] == pytest.approx(ra["ae"], rel=0.1)  # the autoencoder's mean error: the shared step
    rows = [json.loads(line) for line in (run / "anomaly" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [("teacher", e) for e in (1, 2, 3)] + [
        ("detector", e) for e in (1, 2, 3)
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "efficientad" and (run / "bundle" / "manifest.json").is_file()
    assert not list(run.glob("**/.*.tmp"))  # rank 0 alone writes: no half-written file left behind
