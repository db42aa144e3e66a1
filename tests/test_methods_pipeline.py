"""Distillation methods end to end on real data (scikit-learn's digits): feature matching + DKD to the bundle,
a 2-step chain, born-again generations, unlabeled images, the sweep killed and resumed."""

import hashlib
import json
import os

import cv2
import onnx
import pytest
from conftest import kill_when_written
from onnx import numpy_helper

from edgedistill.cli import main

pytestmark = pytest.mark.slow


def _done(run, folder):
    return json.loads((run / folder / "done.json").read_text())


def _steps(run, folder):
    return [json.loads(line) for line in (run / folder / "metrics.jsonl").read_text().splitlines()]


def test_auto_features_with_dkd_train_and_the_bundle_is_the_bare_student(make_recipe, tmp_path):
    recipe = make_recipe(
        {
            "distill": {"method": "dkd", "features": "auto", "feature_weight": 0.5, "alpha": 0.5},
            "student": {"epochs": 2},
        }
    )
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    fmap = json.loads((run / "student" / "feature_map.json").read_text())
    assert fmap["mode"] == "auto" and fmap["loss"] == "mse" and len(fmap["pairs"]) == 5
    assert [p["teacher"]["name"] for p in fmap["pairs"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert "feature matching (mse), 5 pair(s)" in (run / "run.log").read_text()
    steps = [s for s in _steps(run, "student") if s["kind"] == "step"]
    for s in steps:
        assert s["loss"] == pytest.approx(0.5 * s["kd"] + 0.5 * s["ce"] + 0.5 * s["feat"], rel=1e-4)
    # DKD's linear warm-up (1/12 of 2 epochs): the first step's DKD term is 0, later ones are tckd + nckd
    assert steps[0]["kd"] == 0.0 and steps[-1]["kd"] == pytest.approx(steps[-1]["tckd"] + steps[-1]["nckd"], rel=1e-4)
    # projections are training-only: none of their weights is in the checkpoint or the ONNX graph
    from edgedistill.models.checkpoint import load_tensors
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import ModelConfig

    bare = create_model(ModelConfig(model="mobilenetv3_small_050"), 10).state_dict()
    tensors, _ = load_tensors(run / "student" / "model.safetensors")
    assert set(tensors) == set(bare)
    projection_shapes = {
        (p["teacher"]["channels"], p["student"]["channels"], 1, 1) for p in fmap["pairs"] if p["projection"] != "none"
    }
    own_shapes = {tuple(v.shape) for v in bare.values()}
    assert projection_shapes - own_shapes, "the test needs a projection shape the student lacks"
    graph = onnx.load(str(run / "bundle" / "model.onnx")).graph
    onnx_shapes = {tuple(numpy_helper.to_array(t).shape) for t in graph.initializer}
    assert not (projection_shapes - own_shapes) & onnx_shapes
    assert len(graph.output) == 1


def test_two_step_chain_trains_each_assistant_from_the_one_before(make_recipe, tmp_path):
    recipe = make_recipe(
        {
            "distill": {"chain": ["mobilenetv3_small_100", {"model": "mobilenetv3_small_075", "epochs": 1}]},
            "student": {"epochs": 2},
        }
    )
    assert main(["run", str(recipe), "--stages", "teacher,assistant,distill,baseline,evaluate"]) == 0
    run = tmp_path / "run"
    assert (
        _done(run, "assistant")["teacher"] == "teacher" and _done(run, "assistant")["model"] == "mobilenetv3_small_100"
    )
    assert _done(run, "assistant-2")["teacher"] == "assistant"
    assert _done(run, "student")["teacher"] == "assistant-2"
    assert len([s for s in _steps(run, "assistant-2") if s["kind"] == "epoch"]) == 1  # its own epochs
    assert len([s for s in _steps(run, "assistant") if s["kind"] == "epoch"]) == 2  # the student's
    summary = json.loads((run / "summary.json").read_text())
    assert [c["role"] for c in summary["chain"]] == ["assistant", "assistant-2"]
    assert (
        summary["teacher"]["params"]
        > summary["assistant"]["params"]
        > summary["assistant-2"]["params"]
        > summary["student"]["params"]
    )
    assert "assistant-2" in (run / "summary.md").read_text()


def test_born_again_generations_keep_the_best_student(make_recipe, tmp_path):
    recipe = make_recipe({"self_distill": {"generations": 2}, "student": {"epochs": 2}})
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    assert _done(run, "student-gen1")["teacher"] == "distill"
    assert _done(run, "student-gen2")["teacher"] == "generation-1"
    summary = json.loads((run / "summary.json").read_text())
    gens = summary["generations"]
    assert [g["generation"] for g in gens] == [0, 1, 2] and sum(g["kept"] for g in gens) == 1
    kept = next(g for g in gens if g["kept"])
    assert kept["val_score"] == max(g["val_score"] for g in gens)
    assert summary["student"]["generation"] == kept["generation"] and summary["student"]["top1"] == kept["top1"]
    folder = "student" if kept["generation"] == 0 else f"student-gen{kept['generation']}"
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    digest = hashlib.sha256((run / folder / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["source"]["checkpoint_sha256"] == digest  # the kept generation is what ships
    assert "generation-2: top-1" in (run / "run.log").read_text()


def test_unlabeled_images_reach_distillation_and_never_the_baseline(make_recipe, tmp_path, digits_folder):
    from conftest import digits_arrays

    images, _ = digits_arrays()
    pool = tmp_path / "pool" / "any" / "layout"
    pool.mkdir(parents=True)
    for i in range(1000, 1040):  # digits that are neither training nor validation images of the folder
        cv2.imwrite(str(pool / f"u{i}.png"), cv2.resize(images[i], (24, 24), interpolation=cv2.INTER_NEAREST))
    for n, path in enumerate(sorted((digits_folder / "train").rglob("*.png"))[:5]):  # labelled: left out
        os.symlink(path, pool.parent / f"labelled{n}.png")
    for n, path in enumerate(sorted((digits_folder / "val").rglob("*.png"))[:3]):  # evaluation: left out
        os.symlink(path, pool.parent / f"val{n}.png")
    recipe = make_recipe(
        {
            "data": {
                "source": "folder",
                "root": str(digits_folder),
                "unlabeled": str(tmp_path / "pool"),
                "train_per_class": None,
                "val_per_class": None,
            },
            "student": {"epochs": 1},
        }
    )
    assert main(["run", str(recipe), "--stages", "teacher,distill,baseline,evaluate"]) == 0
    run = tmp_path / "run"
    assert _done(run, "student")["unlabeled_images"] == 40
    assert "unlabeled_images" not in _done(run, "baseline") and "unlabeled_images" not in _done(run, "teacher")
    per_epoch = lambda folder: len([s for s in _steps(run, folder) if s["kind"] == "step" and s["epoch"] == 0])  # noqa
    assert per_epoch("baseline") == 250 // 32 and per_epoch("student") == (250 + 40) // 32
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unlabeled_images"] == 40 and "40 (the baseline never saw them)" in (run / "summary.md").read_text()
    assert "8 of 48 images are labelled images of this run" in (run / "run.log").read_text()
    # the teacher and the baseline do not depend on the unlabeled folder: changing it retrains distill only
    stamps = {f: (run / f / "model.safetensors").stat().st_mtime_ns for f in ("teacher", "baseline", "student")}
    assert main(["run", str(recipe), "--stages", "teacher,distill,baseline", "--set", "data.unlabeled=null"]) == 0
    after = {f: (run / f / "model.safetensors").stat().st_mtime_ns for f in stamps}
    assert after["teacher"] == stamps["teacher"] and after["baseline"] == stamps["baseline"]
    assert after["student"] != stamps["student"]


def test_compression_warning_before_training(make_recipe, tmp_path):
    recipe = make_recipe(
        {"teacher": {"model": "resnet50", "epochs": 0}, "student": {"model": "lcnet_035", "epochs": 1}}
    )  # 63x
    assert main(["run", str(recipe), "--stages", "teacher,distill"]) == 0
    log = (tmp_path / "run" / "run.log").read_text()
    assert "fewer parameters than the model it learns from" in log
    assert log.index("fewer parameters") < log.index("distill epoch 1/1")


def test_sweep_resumes_after_a_kill_and_names_the_best_cell(make_recipe, tmp_path):
    recipe = make_recipe({"student": {"epochs": 3}, "teacher": {"epochs": 2}})
    run = tmp_path / "run"
    args = ["sweep", str(recipe), "--temperature", "1,4", "--alpha", "0.5,0.9"]
    kill_when_written(args, run / "sweep" / "T1-a0.9" / "last.safetensors")  # the second cell, one epoch in
    first = run / "sweep" / "T1-a0.5" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not (run / "sweep" / "T1-a0.9" / "done.json").exists()
    assert main(args) == 0
    assert first.stat().st_mtime_ns == stamp  # a finished cell is not trained again
    log = (run / "run.log").read_text()
    assert "sweep/T1-a0.9: resuming after epoch" in log and "T = 1 leaves the teacher's probabilities" in log
    lines = (run / "sweep" / "results.csv").read_text().splitlines()
    assert lines[0].startswith("temperature,alpha,status,val_top1") and len(lines) == 5
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert all(r["status"] == "ok" for r in rows)
    best = max(rows, key=lambda r: (float(r["val_score"]), float(r["eval_score"])))
    md = (run / "sweep" / "results.md").read_text()
    assert f"Best: T = {float(best['temperature']):g}, alpha = {float(best['alpha']):g}" in md
    assert f"--set distill.temperature={float(best['temperature']):g}" in md
    png = (run / "sweep" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # one teacher for every cell: trained once, in the run's teacher/ folder
    assert len([r for r in _steps(run, "teacher") if r["kind"] == "epoch"]) == 2
