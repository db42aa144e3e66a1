"""The KD loss against hand-computed values and against timm's LogitDistillationTask."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.train.losses import FeatureProjector, distillation_loss, feature_loss, kd_loss


def hand_kd(student, teacher, T):
    """sum_i p_t,i * (log p_t,i - log p_s,i), softmax at temperature T, times T^2 (one sample)."""
    zs = [s / T for s in student]
    zt = [t / T for t in teacher]
    ls = [z - math.log(sum(math.exp(v) for v in zs)) for z in zs]
    lt = [z - math.log(sum(math.exp(v) for v in zt)) for z in zt]
    return T * T * sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))


def test_kd_loss_matches_hand_computation():
    s, t = [1.0, 2.0, 0.5], [3.0, -1.0, 0.0]
    for T in (1.0, 3.0, 4.5):
        got = kd_loss(torch.tensor([s]), torch.tensor([t]), T).item()
        assert got == pytest.approx(hand_kd(s, t, T), rel=1e-5)


def test_kd_loss_is_t_squared_scaled_and_batch_averaged():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, -1.0, 0.0], [1.0, 0.5, 0.0]])
    T = 2.0
    plain = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="sum").item() / 2
    assert kd_loss(s, t, T).item() == pytest.approx(plain * T * T, rel=1e-5)
    per_sample = (hand_kd(s[0].tolist(), t[0].tolist(), T) + hand_kd(s[1].tolist(), t[1].tolist(), T)) / 2
    assert kd_loss(s, t, T).item() == pytest.approx(per_sample, rel=1e-5)


def test_identical_logits_give_zero_kd():
    x = torch.randn(4, 10)
    assert kd_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_pure_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y).item()
    kd = kd_loss(s, t, 3.0).item()
    out0 = distillation_loss(s, t, y, 3.0, 0.0)
    out1 = distillation_loss(s, t, y, 3.0, 1.0)
    assert out0.total.item() == pytest.approx(ce, rel=1e-6)
    assert out1.total.item() == pytest.approx(kd, rel=1e-6)
    mix = distillation_loss(s, t, y, 3.0, 0.6)
    assert mix.total.item() == pytest.approx(0.6 * kd + 0.4 * ce, rel=1e-6)
    assert mix.kd.item() == pytest.approx(kd) and mix.ce.item() == pytest.approx(ce)


def test_gradient_flows_only_to_the_student():
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    distillation_loss(student(x), teacher(x), y, 3.0, 0.6).total.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and teacher.bias.grad is None


def test_agrees_with_timm_logit_distillation_task():
    """timm.task.LogitDistillationTask in complementary mode: task_loss_weight = 1 - alpha."""
    from timm.task import LogitDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("resnet10t", num_classes=7)
    teacher = timm.create_model("resnet10t", num_classes=7)
    T, alpha = 3.0, 0.6
    task = LogitDistillationTask(
        student, teacher, criterion=nn.CrossEntropyLoss(), task_loss_weight=1 - alpha, temperature=T, verbose=False
    )
    task.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    timm_out = task(x, y)
    with torch.no_grad():
        teacher_logits = teacher.eval()(x)
    ours = distillation_loss(timm_out["output"], teacher_logits, y, T, alpha)
    assert ours.kd.item() == pytest.approx(timm_out["kd_loss"].item(), rel=1e-5)
    assert ours.ce.item() == pytest.approx(timm_out["task_loss"].item(), rel=1e-5)
    assert ours.total.item() == pytest.approx(timm_out["loss"].item(), rel=1e-5)


def test_feature_loss_projects_student_to_teacher_width():
    s, t = torch.randn(2, 16, 8, 8, requires_grad=True), torch.randn(2, 64, 4, 4)
    proj = FeatureProjector(16, 64)
    loss = feature_loss(s, t, proj)
    loss.backward()
    assert loss.item() > 0 and proj.proj[0].weight.grad is not None
    with pytest.raises(ValueError, match="FeatureProjector"):
        feature_loss(torch.randn(2, 16), torch.randn(2, 64))


def test_the_losses_mark_an_unlabeled_image_as_the_data_does():
    """The losses stay pure (no import of the data wing), so each side names the marker: they must agree."""
    from edgedistill.data.splits import UNLABELED as data_marker
    from edgedistill.train.losses import UNLABELED as loss_marker

    assert data_marker == loss_marker == -1
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    from edgedistill.train.losses import labeled_cross_entropy

    only_first = labeled_cross_entropy(logits, torch.tensor([0, data_marker]), 0.0, None, None)
    assert torch.isclose(only_first, F.cross_entropy(logits[:1], torch.tensor([0])))
