"""Cached soft labels (FKD): replayed views equal the stored ones, a changed teacher never reuses a cache, and
with a draw per epoch the student trains exactly as it does online."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgedistill.data.loaders import train_loader
from edgedistill.data.sources import load_data
from edgedistill.models.factory import create_model
from edgedistill.recipe.loading import load_recipe
from edgedistill.train.job import Teaching, TrainJob
from edgedistill.train.loop import train_model
from edgedistill.train.softlabels import SoftLabelCache, SoftLabelJob, build, cache_key, cached_soft_labels


@pytest.fixture
def small(make_recipe):
    r = load_recipe(
        make_recipe(
            {
                "data": {"train_per_class": 8, "val_per_class": 2, "batch_size": 16},
                "student": {"epochs": 2},
                "distill": {"soft_labels": "cached", "cache_draws": 2},
            }
        ),
        [],
    )
    data = load_data(r.data)
    torch.manual_seed(0)
    teacher = create_model(r.teacher, len(data.classes)).eval()
    return r, data, teacher


def test_replayed_views_get_exactly_the_teacher_logits_of_those_views(small, tmp_path):
    r, data, teacher = small
    cache = build(
        SoftLabelJob(
            teacher=teacher,
            teacher_sha256="t" * 64,
            split=data.train,
            data_cfg=r.data,
            seed=3,
            draws=2,
            topk=None,
            folder=tmp_path,
            device=torch.device("cpu"),
        )
    )
    assert cache.values.shape[:2] == (2, cache.offsets[-1]) and cache.indices is None  # 10 classes: full vectors
    with torch.no_grad():
        for draw in (1, 0):  # any order: a draw is reproduced from (seed, draw) alone
            for step, (images, _) in enumerate(train_loader(data.train, r.data, 3, draw)):
                assert torch.allclose(cache.batch(draw, step, torch.device("cpu")), teacher(images), atol=1e-5)
    path = tmp_path / "c.npz"
    cache.save(path)
    again = SoftLabelCache.load(path)
    assert np.array_equal(again.values, cache.values) and np.array_equal(again.offsets, cache.offsets)


def test_top_k_keeps_the_largest_logits_and_zero_probability_elsewhere():
    values = np.array([[[5.0, 3.0]]], dtype=np.float32)
    cache = SoftLabelCache(values, np.array([[[7, 2]]]), num_classes=200, batch_rows=np.array([1]))
    logits = cache.batch(0, 0, torch.device("cpu"))
    probs = torch.softmax(logits / 4.0, dim=1)
    assert logits.shape == (1, 200) and logits[0, 7] == 5.0 and logits[0, 2] == 3.0
    assert probs[0, 7] + probs[0, 2] == pytest.approx(1.0) and probs[0, 0] == 0


def test_a_changed_teacher_or_recipe_gets_its_own_cache(small, tmp_path):
    r, data, teacher = small
    key = cache_key("a" * 64, data.train, r.data, 0, 2, None)
    assert cache_key("b" * 64, data.train, r.data, 0, 2, None) != key  # another teacher checkpoint
    assert cache_key("a" * 64, data.train, r.data.model_copy(update={"image_size": 24}), 0, 2, None) != key
    assert (
        cache_key("a" * 64, data.train, r.data, 1, 2, None) != key
        and cache_key("a" * 64, data.train, r.data, 0, 3, None) != key
    )
    first = cached_soft_labels(
        SoftLabelJob(teacher, "a" * 64, data.train, r.data, 0, 2, None, tmp_path, torch.device("cpu"))
    )
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    reused = cached_soft_labels(
        SoftLabelJob(teacher, "a" * 64, data.train, r.data, 0, 2, None, tmp_path, torch.device("cpu"))
    )
    assert np.array_equal(first.values, reused.values) and len(list(tmp_path.glob("*.npz"))) == 1
    cached_soft_labels(SoftLabelJob(teacher, "c" * 64, data.train, r.data, 0, 2, None, tmp_path, torch.device("cpu")))
    assert len(list(tmp_path.glob("*.npz"))) == 2  # the stale one is never read for the new teacher


def test_with_a_draw_per_epoch_cached_training_equals_online(small, tmp_path):
    r, data, teacher = small
    losses = {}
    for mode in ("online", "cached"):
        torch.manual_seed(1)
        student = create_model(r.student, len(data.classes))
        if mode == "cached":
            cache = build(
                SoftLabelJob(
                    teacher=teacher,
                    teacher_sha256="t" * 64,
                    split=data.train,
                    data_cfg=r.data,
                    seed=5,
                    draws=2,
                    topk=None,
                    folder=tmp_path,
                    device=torch.device("cpu"),
                )
            )
            teaching = Teaching(teacher=None, distill=r.distill, soft_labels=cache)
        else:
            teaching = Teaching(teacher=teacher, distill=r.distill)
        train_model(
            TrainJob(
                student,
                data.train,
                data.val,
                r.data,
                r.student,
                tmp_path / mode,
                5,
                "fp",
                torch.device("cpu"),
                mode,
                teaching=teaching,
            )
        )
        losses[mode] = [
            json.loads(line)
            for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
            if '"kind": "step"' in line
        ]
    assert len(losses["online"]) == len(losses["cached"]) > 0
    for a, b in zip(losses["online"], losses["cached"]):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def test_cached_soft_labels_refuse_feature_matching(make_recipe):
    from edgedistill.errors import RecipeError

    with pytest.raises(RecipeError, match="soft_labels"):
        load_recipe(make_recipe({"distill": {"soft_labels": "cached", "features": "auto"}}), [])
