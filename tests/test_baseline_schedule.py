"""A fair control when the student also learns from unlabeled images: the baseline's schedule, 'rest' images,
validation every N epochs, and runs compared side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgedistill.data.folders import load_unlabeled
from edgedistill.data.sources import load_data
from edgedistill.data.splits import UNLABELED
from edgedistill.errors import DataError, RecipeError
from edgedistill.judge.compare import compare_text
from edgedistill.recipe.loading import load_recipe
from edgedistill.run.context import RunContext
from edgedistill.run.training import baseline_epochs


def _recipe(make_recipe, **extra):
    return load_recipe(make_recipe(extra), [])


def test_match_steps_gives_the_baseline_as_many_optimizer_steps_as_the_student(make_recipe):
    r = _recipe(make_recipe, baseline={"epochs": "match_steps"}, student={"epochs": 20}, data={"batch_size": 64})
    # student: 20 epochs x ceil((200 + 1238) / 64) = 20 x 23 = 460 steps; baseline: ceil(200 / 64) = 4 per epoch
    assert baseline_epochs(r, labelled=200, unlabeled=1238) == 115
    assert baseline_epochs(r, labelled=200, unlabeled=0) == 20  # no unlabeled images: the student's schedule
    assert baseline_epochs(_recipe(make_recipe, student={"epochs": 7}), 200, 1238) == 7  # default: 'student'
    assert baseline_epochs(_recipe(make_recipe, baseline={"epochs": 33}), 200, 1238) == 33
    with pytest.raises(RecipeError, match="baseline.epochs"):
        _recipe(make_recipe, baseline={"epochs": "twice"})


def test_the_baseline_fingerprint_follows_unlabeled_images_only_under_match_steps(make_recipe):
    def fingerprint(**extra):
        return RunContext(_recipe(make_recipe, **extra)).fingerprint("baseline")

    plain = fingerprint(data={"unlabeled": "rest", "train_per_class": 20})
    assert plain == fingerprint(data={"unlabeled": None, "train_per_class": 20})  # the baseline never sees them
    matched = dict(baseline={"epochs": "match_steps"})
    assert fingerprint(data={"unlabeled": "rest", "train_per_class": 20}, **matched) != fingerprint(
        data={"unlabeled": None, "train_per_class": 20}, **matched
    )  # its schedule depends on them


def test_rest_withholds_the_labels_of_the_images_train_per_class_leaves_out(make_recipe):
    r = _recipe(make_recipe, data={"train_per_class": 20, "unlabeled": "rest"})
    data = load_data(r.data)
    rest = load_unlabeled("rest", data, None)
    assert len(data.train) == 200 and len(rest) == 1438 - 200  # sklearn digits: 1,438 training images in all
    assert (rest.labels == UNLABELED).all()
    kept = {img.tobytes() for img in data.train.images}
    assert not any(img.tobytes() in kept for img in rest.images[:300])  # none of the labelled images again
    val = {img.tobytes() for img in data.val.images}
    assert not any(img.tobytes() in val for img in rest.images)  # and never a validation image
    with pytest.raises(DataError, match="train_per_class"):
        load_unlabeled("rest", load_data(_recipe(make_recipe, data={"train_per_class": None}).data), None)


def test_validation_every_n_epochs_keeps_the_last_one(make_recipe, tmp_path):
    from edgedistill.models.factory import create_model
    from edgedistill.train.job import TrainJob
    from edgedistill.train.loop import train_model

    r = _recipe(make_recipe, student={"epochs": 3, "val_every": 2}, data={"train_per_class": 3, "val_per_class": 2})
    data = load_data(r.data)
    model = create_model(r.student, len(data.classes))
    train_model(
        TrainJob(model, data.train, data.val, r.data, r.student, tmp_path / "s", 0, "fp", torch.device("cpu"), "s")
    )
    epochs = [
        json.loads(line)
        for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in line
    ]
    assert [("val_top1" in e) for e in epochs] == [False, True, True]  # epoch 2 (every 2nd) and the last


def _summary(seed, teacher, student, baseline, p=0.01):
    return {
        "seed": seed,
        "teacher": {"top1": teacher},
        "student": {"top1": student},
        "baseline": {"top1": baseline},
        "retention": student / teacher,
        "kd_gain": student - baseline,
        "significance": {"p_value": p},
    }


def test_compare_gives_mean_and_spread_and_flags_a_gain_that_changes_sign():
    text = compare_text([_summary(0, 0.96, 0.94, 0.90), _summary(1, 0.96, 0.92, 0.91)], ["runs/a", "runs/b"])
    gains = np.array([4.0, 1.0])
    assert f"KD gain {gains.mean():+.2f} ± {gains.std(ddof=1):.2f} points" in text
    assert "retention 96.9 ± 1.5%" in text and "changes sign" not in text
    flipped = compare_text([_summary(0, 0.96, 0.94, 0.90), _summary(1, 0.96, 0.90, 0.92)], ["a", "b"])
    assert "changes sign" in flipped


def test_bf16_autocast_trains_on_cpu_so_the_amp_path_cannot_rot(make_recipe, tmp_path):
    """train.amp: bf16 runs the same loop under CPU autocast: finite losses close to full precision's."""
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import TrainConfig
    from edgedistill.train.job import TrainJob
    from edgedistill.train.loop import amp_dtype, train_model

    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("off", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    r = _recipe(make_recipe, student={"epochs": 1}, data={"train_per_class": 6, "val_per_class": 2})
    data = load_data(r.data)
    losses = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = create_model(r.student, len(data.classes))
        train_model(
            TrainJob(
                model,
                data.train,
                data.val,
                r.data,
                r.student,
                tmp_path / amp,
                0,
                "fp",
                torch.device("cpu"),
                amp,
                hardware=TrainConfig(amp=amp),
            )
        )
        steps = [
            json.loads(line)
            for line in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()
            if '"kind": "step"' in line
        ]
        losses[amp] = np.array([s["loss"] for s in steps])
    assert np.isfinite(losses["bf16"]).all()
    assert not np.array_equal(losses["bf16"], losses["off"])  # autocast really ran in bf16 ...
    assert np.allclose(losses["bf16"][0], losses["off"][0], rtol=0.05)  # ... and computes the same loss
