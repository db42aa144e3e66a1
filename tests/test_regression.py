"""Regression targets end to end on real data: scikit-learn's digits with each image's ink area and mean
intensity as the targets, through training, evaluation, export, `edgerun validate` and `edgerun camera`."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import yaml
from conftest import FAST, deep_update

from edgedistill.data.demodata import TARGETS, write_digits_regression
from edgedistill.data.sources import load_data
from edgedistill.data.targets import read_targets
from edgedistill.errors import DataError, RecipeError
from edgedistill.recipe.loading import load_recipe
from edgedistill.recipe.sections import DataConfig
from edgedistill.train.losses import regression_distillation_loss
from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.regression import summarize


def write_regression_folder(root, splits=(("train", 0, 320), ("val", 320, 440))):
    return write_digits_regression(root, splits)


def test_bad_rows_are_named_before_training(tmp_path):
    write_regression_folder(tmp_path, (("train", 0, 5),))
    with open(tmp_path / "train" / "targets.csv", "a") as fh:
        fh.write("imgs/absent.png,0.1,3\nimgs/1.png,lots,3\nimgs/2.png,0.2\n")
    with pytest.raises(DataError) as err:
        read_targets(tmp_path / "train")
    text = str(err.value)
    assert "3 bad row(s)" in text and "line 7" in text and "absent.png" in text
    assert "line 8" in text and "non-numeric" in text and "line 9" in text
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="targets.csv' is missing"):
        read_targets(tmp_path / "val")


def test_targets_are_standardized_with_train_statistics(tmp_path):
    truth = write_regression_folder(tmp_path, (("train", 0, 60), ("val", 60, 80)))
    data = load_data(DataConfig(root=str(tmp_path), image_size=16), task="regression")
    assert data.classes == list(TARGETS)
    assert np.allclose(data.scaling.mean, truth["train"].mean(0)) and np.allclose(
        data.scaling.std, truth["train"].std(0)
    )
    assert np.allclose(data.scaling.restore(data.val.labels), truth["val"], atol=1e-4)
    assert abs(float(data.train.labels.mean())) < 1e-5


def test_regression_loss_and_recipe_rules(make_recipe):
    import torch

    s, t, y = torch.zeros(4, 2), torch.ones(4, 2), torch.full((4, 2), 2.0)
    out = regression_distillation_loss(s, t, y, alpha=0.25)
    assert float(out.kd) == 1.0 and float(out.ce) == 4.0 and float(out.total) == pytest.approx(0.25 + 0.75 * 4)
    with pytest.raises(RecipeError, match="data.source: folder"):
        load_recipe(make_recipe({"task": "regression"}))  # FAST uses the digits classification source
    with pytest.raises(RecipeError, match="distill.method"):
        load_recipe(
            make_recipe({"task": "regression", "data": {"source": "folder", "root": "x"}, "distill": {"method": "dkd"}})
        )


@pytest.mark.slow
def test_regression_end_to_end_to_validate_and_camera(tmp_path):
    from edgedistill.cli import main

    truth = write_regression_folder(tmp_path / "data")
    recipe = deep_update(
        FAST,
        {
            "output": str(tmp_path / "run"),
            "task": "regression",
            "data": {
                "source": "folder",
                "root": str(tmp_path / "data"),
                "train_per_class": None,
                "val_per_class": None,
                "augment": {"scale": [0.9, 1.0], "ratio": [0.9, 1.1], "color_jitter": 0.0},
            },
            "teacher": {"epochs": 8, "lr": 0.003},
            "student": {"epochs": 8, "lr": 0.003},
            "export": {"target": "jetson-nano-jp4", "val_samples": 100},
        },
    )
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["eval_samples"] == 120
    for role in ("teacher", "student", "baseline"):
        assert set(summary[role]["per_target"]) == set(TARGETS) and summary[role]["mae"] >= 0
    assert summary["teacher"]["r2"] > 0.5  # it learned the targets, far from predicting the mean
    assert summary["retention"] == pytest.approx(summary["student"]["r2"] / summary["teacher"]["r2"])
    assert summary["kd_gain"] == pytest.approx(summary["baseline"]["mae"] - summary["student"]["mae"])
    assert "MAE / R²" in (run / "summary.md").read_text() and (run / "report.html").exists()
    student_log = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" in r for r in student_log if r["kind"] == "step")  # logged apart

    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["task"] == "regression" and manifest["classes"] == list(TARGETS)
    assert np.allclose(manifest["targets"]["mean"], truth["train"].mean(0))
    assert np.allclose(manifest["targets"]["std"], truth["train"].std(0))
    assert manifest["metrics"]["host"]["student_r2"] == summary["student"]["r2"]

    bundle = open_bundle(run / "bundle")
    images, labels = bundle.validation()
    nearest = np.abs(labels[:, None, :] - truth["val"][None]).max(2).min(1)
    assert nearest.max() < 1e-4  # validation targets, in target units
    # 120 validation images: 60 check images in the bundle (export.val_samples 100 asks more: at most half), the
    # other 60 the INT8 gate's
    assert labels.shape == (60, 2) and manifest["samples"]["val"]["gate_images"] == 60
    assert edgerun(["validate", str(run / "bundle"), "--json", str(tmp_path / "v.json")]) == 0
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["status"] == "PASS" and result["r2"] == pytest.approx(
        manifest["metrics"]["int8"]["fp32_r2"], abs=1e-4
    )

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    for i in range(30):
        writer.write(cv2.resize(images[i], (64, 64), interpolation=cv2.INTER_NEAREST))
    writer.release()
    limit = float(np.median(labels[:30, 0]))
    assert (
        edgerun(
            [
                "camera",
                str(run / "bundle"),
                "--source",
                str(video),
                "--csv",
                str(tmp_path / "frames.csv"),
                "--reject-above",
                str(limit),
                "--json",
                str(tmp_path / "cam.json"),
            ]
        )
        == 0
    )
    with open(tmp_path / "frames.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and set(TARGETS) <= set(rows[0])
    ink = np.array([float(r["ink"]) for r in rows])
    assert [int(r["reject"]) for r in rows] == [int(v > limit) for v in ink]
    cam = json.loads((tmp_path / "cam.json").read_text())
    assert cam["rejects"] == int((ink > limit).sum()) and cam["reject_rule"] == f"ink > {limit:g}"
    measured = summarize(ink[:, None], labels[:30, :1], ["ink"])
    assert measured["mae"] < 3 * summary["student"]["per_target"]["ink"]["mae"] + 0.05  # the camera measures ink
