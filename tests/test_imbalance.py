"""Training for imbalanced classes: class-aware samplers (one process and torchrun's shards), class weights, the
logit-adjusted and Balanced-KD losses by hand, the importance weights of distill.balance: sampler, the recipe
checks and the warning before training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgedistill.data.loaders import EpochBatchSampler, sampling_weights, stream_prior
from edgedistill.data.splits import Split
from edgedistill.errors import RecipeError
from edgedistill.recipe.loading import load_recipe
from edgedistill.recipe.sections import DataConfig, StudentConfig
from edgedistill.train.job import balance_for
from edgedistill.train.losses import (
    Balance,
    balanced_kd_loss,
    distillation_loss,
    effective_number_weights,
    inverse_frequency_weights,
    labeled_cross_entropy,
    logit_adjusted_cross_entropy,
)

LABELS = np.repeat(np.arange(3), [600, 120, 30])  # 20:4:1


def _drawn(labels, sampler, epochs=30, world=1):
    weights = sampling_weights(labels, sampler)
    counts = np.zeros(3)
    for epoch in range(epochs):
        batches = [
            EpochBatchSampler(len(labels), 50, seed=2, rank=r, world=world, weights=weights) for r in range(world)
        ]
        for b in batches:
            b.set_epoch(epoch)
        shards = [list(b) for b in batches]
        for step in range(len(shards[0])):
            rows = [i for shard in shards for i, _ in shard[step]]
            np.add.at(counts, labels[rows], 1)
    return counts / counts.sum()


def test_balanced_and_sqrt_samplers_draw_the_class_frequencies_they_promise():
    assert sampling_weights(LABELS, "uniform") is None  # every image once per epoch, as before
    assert np.allclose(_drawn(LABELS, "balanced"), 1 / 3, atol=0.02)
    sqrt = np.sqrt([600, 120, 30])
    assert np.allclose(_drawn(LABELS, "sqrt"), sqrt / sqrt.sum(), atol=0.02)
    assert np.allclose(stream_prior(LABELS, 3, "balanced"), 1 / 3)
    assert np.allclose(stream_prior(LABELS, 3, "uniform"), [0.8, 0.16, 0.04])


def test_torchrun_shards_of_a_balanced_sampler_are_the_one_process_batches():
    weights = sampling_weights(LABELS, "balanced")
    one = EpochBatchSampler(len(LABELS), 50, seed=5, weights=weights)
    two = [EpochBatchSampler(len(LABELS), 50, seed=5, rank=r, world=2, weights=weights) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    for whole, a, b in zip(one.global_batches(), *(list(s) for s in two)):
        assert sorted(whole) == sorted([i for i, _ in a] + [i for i, _ in b])
    assert np.allclose(_drawn(LABELS, "balanced", world=2), 1 / 3, atol=0.02)


def test_unlabeled_rows_keep_their_share_of_a_balanced_stream():
    labels = np.r_[LABELS, -np.ones(250, dtype=np.int64)]
    weights = sampling_weights(labels, "balanced")
    assert weights[labels == -1].sum() == pytest.approx(250 / 1000)
    per_class = [weights[labels == c].sum() for c in range(3)]
    assert np.allclose(per_class, 0.75 / 3)


def test_logit_adjusted_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    targets = torch.tensor([0, 1])
    prior = torch.tensor([0.8, 0.2])
    want = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        z = [v + math.log(p) for v, p in zip(row, prior.tolist())]
        want += -(z[t] - math.log(sum(math.exp(v) for v in z))) / 2
    assert logit_adjusted_cross_entropy(logits, targets, prior).item() == pytest.approx(want, rel=1e-6)
    # tau 0 is plain cross-entropy; the rare class's loss rises under adjustment (a margin it must win)
    assert logit_adjusted_cross_entropy(logits, targets, prior, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item()
    )
    assert labeled_cross_entropy(logits[1:], targets[1:], adjust=torch.log(prior)) > F.cross_entropy(
        logits[1:], targets[1:]
    )


def test_class_weights_and_weighted_cross_entropy_by_hand():
    assert np.allclose(inverse_frequency_weights([600, 120, 30]), [750 / 1800, 750 / 360, 750 / 90])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1, -1])  # the last row unlabeled
    w = torch.tensor([1.0, 4.0, 9.0])
    ce = [-F.log_softmax(logits[i], 0)[t].item() for i, t in ((0, 0), (1, 1))]
    want = (1.0 * ce[0] + 4.0 * ce[1]) / (1.0 + 4.0)
    assert labeled_cross_entropy(logits, targets, weight=w).item() == pytest.approx(want, rel=1e-6)
    assert labeled_cross_entropy(logits[2:], targets[2:], weight=w).item() == 0.0  # no labelled row


def test_balanced_kd_reweights_the_teachers_soft_labels_by_hand():
    s = torch.tensor([[0.2, 1.0, -0.5]])
    t = torch.tensor([[2.0, 0.5, -1.0]])
    w = torch.tensor(effective_number_weights(np.array([600, 120, 30])), dtype=torch.float32)
    T = 3.0
    p = F.softmax(t / T, 1) * w
    p = p / p.sum()
    q = F.log_softmax(s / T, 1)
    want = (p * (p.log() - q)).sum().item() * T * T
    assert balanced_kd_loss(s, t, T, torch.log(w)).item() == pytest.approx(want, rel=1e-5)
    assert w[2] > w[1] > w[0] and float(w.sum()) == pytest.approx(3.0)  # rare classes up, normalized to K
    plain = distillation_loss(s, t, torch.tensor([0]), T, 0.5)
    assert distillation_loss(s, t, torch.tensor([0]), T, 0.5, balance=Balance()).total.item() == pytest.approx(
        plain.total.item()
    )


def test_balance_sampler_importance_weights_undo_the_balanced_stream_for_ce():
    split = Split("train", ["a", "b", "c"], LABELS)
    from edgedistill.recipe.sections import DistillConfig

    out = balance_for(
        StudentConfig(),
        split,
        DataConfig(sampler="balanced"),
        DistillConfig(balance="sampler"),
        original_sampler="uniform",
    )
    # balanced stream: each class 1/3; original: 0.8/0.16/0.04 -> CE weights 2.4, 0.48, 0.12
    assert np.allclose(out.ce_weight.numpy(), [2.4, 0.48, 0.12], rtol=1e-5) and out.kd_log_weight is None
    assert balance_for(StudentConfig(), split, DataConfig()) is None  # nothing asked: the loss is untouched
    adjusted = balance_for(StudentConfig(logit_adjustment=1.0, class_weights="auto"), split, DataConfig())
    assert np.allclose(adjusted.ce_adjust.numpy(), np.log([0.8, 0.16, 0.04]), rtol=1e-5)
    with pytest.raises(RecipeError, match="2 weights for 3 classes"):
        balance_for(StudentConfig(class_weights=[1.0, 2.0]), split, DataConfig())


def test_balance_sampler_keeps_the_logit_adjustment_on():
    """Under distill.balance: sampler the stream is balanced (uniform prior: an adjustment by it is a constant, i.e.
    none); CE is weighted back to the original stream, so the adjustment is that stream's prior, and training with
    it differs from training without it."""
    split = Split("train", ["a", "b", "c"], LABELS)
    from edgedistill.recipe.sections import DistillConfig
    from edgedistill.train.job import compute_loss

    adjusted = balance_for(
        StudentConfig(logit_adjustment=1.0),
        split,
        DataConfig(sampler="balanced"),
        DistillConfig(balance="sampler"),
        original_sampler="uniform",
    )
    assert np.allclose(adjusted.ce_adjust.numpy(), np.log([0.8, 0.16, 0.04]), rtol=1e-5)
    assert np.ptp(adjusted.ce_adjust.numpy()) > 1  # not a constant shift: the adjustment is on
    plain = balance_for(
        StudentConfig(),
        split,
        DataConfig(sampler="balanced"),
        DistillConfig(balance="sampler"),
        original_sampler="uniform",
    )
    logits, targets = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.2, 1.5]]), torch.tensor([2, 1])
    teacher = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    distill = DistillConfig(balance="sampler")
    cfg = StudentConfig(logit_adjustment=1.0)
    with_adjustment = compute_loss(logits, targets, teacher, cfg, distill, balance=adjusted)["ce"]
    without = compute_loss(logits, targets, teacher, cfg, distill, balance=plain)["ce"]
    assert not torch.isclose(with_adjustment, without)


def test_two_corrections_of_one_term_are_refused(make_recipe):
    with pytest.raises(RecipeError, match="student.logit_adjustment and student.class_weights"):
        load_recipe(make_recipe({"student": {"logit_adjustment": 1.0, "class_weights": "auto"}}))
    with pytest.raises(RecipeError, match="corrects the soft labels twice"):
        load_recipe(make_recipe({"teacher": {"logit_adjustment": 1.0}, "distill": {"balance": "reweight"}}))
    with pytest.raises(RecipeError, match="data.sampler: balanced does nothing"):
        load_recipe(make_recipe({"teacher": {"logit_adjustment": 1.0}, "data": {"sampler": "balanced"}}))
    load_recipe(make_recipe({"teacher": {"logit_adjustment": 1.0}, "student": {"logit_adjustment": 1.0}}))


def test_recipe_checks_of_the_imbalance_and_operating_point_keys(make_recipe):
    with pytest.raises(RecipeError, match="exactly one of target_recall"):
        load_recipe(make_recipe({"evaluate": {"operating_point": {"target_recall": 0.9, "max_false_reject": 0.1}}}))
    with pytest.raises(RecipeError, match="distill.balance: sampler"):
        load_recipe(make_recipe({"distill": {"balance": "sampler"}, "data": {"unlabeled": "rest"}}))
    with pytest.raises(RecipeError, match="class_weights"):
        load_recipe(make_recipe({"student": {"class_weights": [1.0, -2.0]}}))
    r = load_recipe(make_recipe({"evaluate": {"operating_point": {"max_false_reject": 0.05}}}))
    assert r.data.calib_fraction == 0.1  # the held-out share is written into the resolved recipe
    plain = load_recipe(make_recipe())
    assert r.fingerprint("data") != plain.fingerprint("data")  # so the teacher trains on the smaller set
    assert (
        load_recipe(
            make_recipe(
                {
                    "data": {"test_dir": "test", "source": "folder", "root": "x"},
                    "evaluate": {"operating_point": {"target_recall": 0.9}},
                }
            )
        ).data.calib_fraction
        is None
    )
