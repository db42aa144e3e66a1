"""Data-free distillation (DeepInversion): the loss terms, synthesis on a real digits teacher, and a run that
never reads a real training image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, deep_update, kill_when_written

from edgedistill.errors import RecipeError
from edgedistill.models.checkpoint import load_model
from edgedistill.models.factory import create_model
from edgedistill.recipe.loading import load_recipe
from edgedistill.recipe.sections import DataConfig, DataFreeConfig, ModelConfig
from edgedistill.train.datafree import (
    SynthesisJob,
    bn_statistics_loss,
    competition_loss,
    image_priors,
    require_batchnorm,
    synthesize,
)


def test_loss_terms_vanish_where_the_paper_says():
    x = torch.randn(64, 4, 5, 5) * 2 + 1
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    assert float(bn_statistics_loss(x, mean, var)) == pytest.approx(0.0, abs=1e-5)
    assert float(bn_statistics_loss(x, mean + 1, var)) == pytest.approx(2.0, rel=1e-4)  # ||1||_2 over 4 channels
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert [float(v) for v in image_priors(flat)] == [0.0, 0.0]
    assert float(image_priors(torch.randn(2, 3, 8, 8))[1]) > 0
    logits = torch.randn(5, 10)
    assert float(competition_loss(logits, logits)) == pytest.approx(1.0)  # no disagreement: nothing gained
    assert float(competition_loss(logits * 5, -logits * 5)) < 1.0


def test_a_teacher_without_batchnorm_is_refused():
    with pytest.raises(RecipeError, match="no BatchNorm"):
        require_batchnorm(create_model(ModelConfig(model="convnext_atto"), 10), "convnext_atto")


def test_datafree_needs_the_teachers_weights(make_recipe):
    with pytest.raises(RecipeError, match="teacher.pretrained_path"):
        load_recipe(make_recipe({"data": {"source": "datafree"}}))


def _trained_teacher(run: Path) -> torch.nn.Module:
    teacher = create_model(ModelConfig(model=FAST["teacher"]["model"]), 10)
    load_model(run / "teacher" / "model.safetensors", teacher)
    return teacher.eval()


@pytest.mark.slow
def test_synthesis_makes_images_the_teacher_recognizes(trained_run, tmp_path):
    """On the digits teacher: its confidence in the intended class on its own synthetic images is far above its
    confidence on noise, and the BatchNorm-statistics loss falls."""
    teacher = _trained_teacher(trained_run)
    data_cfg = DataConfig(**FAST["data"])
    cfg = DataFreeConfig(images_per_class=3, batch_size=30, steps=150)
    classes = [str(i) for i in range(10)]
    synthetic = synthesize(
        SynthesisJob(
            teacher=teacher,
            teacher_sha256="sha",
            classes=classes,
            data_cfg=data_cfg,
            cfg=cfg,
            folder=tmp_path / "set",
            seed=0,
            device=torch.device("cpu"),
        )
    )
    assert len(synthetic.files) == 30 and sorted(set(synthetic.labels.tolist())) == list(range(10))
    facts = json.loads((tmp_path / "set" / "synthesis.json").read_text())
    assert facts["bn_loss_last"] < 0.5 * facts["bn_loss_first"]
    noise = torch.randn(30, 3, 16, 16)
    with torch.no_grad():
        noise_conf = float(teacher(noise).softmax(1)[torch.arange(30), torch.arange(30) % 10].mean())
    assert facts["teacher_confidence"] > 0.6 and facts["teacher_confidence"] > noise_conf + 0.4
    assert all((tmp_path / "set" / f).exists() for f in synthetic.files)  # PNGs, one folder per class
    assert synthetic.logits.shape == (30, 10)


@pytest.mark.slow
def test_a_datafree_run_reads_no_training_image_resumes_and_beats_chance(
    trained_run, digits_folder, tmp_path, monkeypatch
):
    from edgedistill.cli import main
    from edgedistill.data import folders, imagecache, splits

    recipe = deep_update(
        FAST,
        {
            "output": str(tmp_path / "run"),
            "data": {"source": "datafree", "root": str(digits_folder), "train_per_class": None, "val_per_class": None},
            "teacher": {"pretrained_path": str(trained_run / "teacher" / "model.safetensors"), "epochs": 0},
            "student": {"epochs": 30},
            "datafree": {"images_per_class": 30, "batch_size": 100, "steps": 250},
        },
    )
    path = tmp_path / "datafree.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = tmp_path / "run" / "datafree" / "batches" / "0000.json"
    kill_when_written(["datafree", str(path)], first)
    written = first.stat().st_mtime_ns

    read = []
    real_read, real_key = folders.read_image, imagecache.entry_key
    for module in (folders, splits):  # every decoder of the data wing
        monkeypatch.setattr(module, "read_image", lambda p, *a, **k: read.append(Path(p)) or real_read(p, *a, **k))
    monkeypatch.setattr(imagecache, "entry_key", lambda paths, v: read.extend(map(Path, paths)) or real_key(paths, v))
    assert main(["run", str(path), "--stages", "datafree,teacher,distill,baseline,evaluate"]) == 0
    assert first.stat().st_mtime_ns == written  # the finished batch was kept, not synthesized again
    train_dir = digits_folder / "train"
    assert read and not [p for p in read if train_dir in p.parents]  # no real training image was ever opened
    assert [p for p in read if (digits_folder / "val") in p.parents]  # the real validation images were
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_free"]["synthetic_images"] == 300 and summary["data_free"]["real_evaluation"]
    assert summary["eval_samples"] == 80  # the real validation images
    from scipy.stats import binomtest

    right = round(summary["student"]["top1"] * summary["eval_samples"])
    assert binomtest(right, summary["eval_samples"], 0.1, alternative="greater").pvalue < 0.05  # above chance (10%)
    assert "data-free" in (tmp_path / "run" / "summary.md").read_text()
