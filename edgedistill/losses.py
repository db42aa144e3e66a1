"""Distillation losses: pure functions on tensors.

- ``kd_loss``: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015
  (arXiv:1503.02531). KL divergence between temperature-softened teacher and student distributions,
  scaled by T^2 so that its gradients keep their magnitude as T changes (section 2 of the paper).
- ``distillation_loss``: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)``.
- ``dkd_loss``: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022
  (arXiv:2203.08679): KD split into a target-class term (TCKD, binary target vs rest) and a non-target
  term (NCKD, the distribution among the other classes), weighted separately (alpha, beta).
- ``feature_loss``: Romero et al., "FitNets: Hints for Thin Deep Nets", 2015 (arXiv:1412.6550):
  MSE between a student feature map, projected by a learned regressor, and the teacher's.
- ``attention_loss``: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017
  (arXiv:1612.03928): distance between the L2-normalised spatial attention maps (channel mean of the
  squared activations) of student and teacher; needs no projection, since channels are averaged away.
- ``regression_distillation_loss``: for regression targets the student learns the teacher's predictions
  directly (Hinton et al.'s "matching logits" limit; for regression, e.g. Saputra et al., "Distilling
  Knowledge From a Deep Pose Regressor Network", ICCV 2019, arXiv:1908.00858):
  ``alpha * MSE(student, teacher) + (1 - alpha) * loss(student, y)``, loss being MSE or Huber.

The teacher's logits are detached inside these functions: no gradient ever reaches the teacher.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def _target_split(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """log p(target), log (1 - p(target)) and the log-softmax over the non-target classes, at ``temperature``.

    Computed in log space from logsumexps, so nothing is clamped: the non-target distribution is the softmax
    of the other logits alone (the paper's p-hat), not a renormalised, rounded probability vector.
    """
    z = logits / temperature
    mask = F.one_hot(targets, z.shape[-1]).bool()
    log_all = torch.logsumexp(z, dim=-1)
    others = z.masked_select(~mask).view(z.shape[0], z.shape[-1] - 1)
    log_others = torch.logsumexp(others, dim=-1)
    log_target = z.masked_select(mask) - log_all
    log_rest = log_others - log_all
    return log_target, log_rest, others - log_others.unsqueeze(-1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             temperature: float, alpha: float = 1.0, beta: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``(alpha * TCKD, beta * NCKD)``, T^2-scaled and batch-averaged.

    TCKD = KL(b_teacher || b_student) over the binary distribution [p(target), 1 - p(target)];
    NCKD = KL(p-hat_teacher || p-hat_student) over the softmax of the non-target logits alone.
    Classic KD equals ``TCKD + (1 - p_teacher(target)) * NCKD``; DKD weighs them ``alpha * TCKD + beta * NCKD``
    instead (the caller adds the two; they are returned apart so that they can be logged apart). The paper's CIFAR
    setting: alpha 1, beta 8, T 4, and a linear warm-up of the DKD term over its first 20 of 240 epochs.
    """
    t = float(temperature)
    s_tgt, s_rest, s_others = _target_split(student_logits, targets, t)
    t_tgt, t_rest, t_others = _target_split(teacher_logits.detach(), targets, t)
    batch = student_logits.shape[0]
    tckd = (t_tgt.exp() * (t_tgt - s_tgt) + t_rest.exp() * (t_rest - s_rest)).sum() / batch * (t * t)
    nckd = F.kl_div(s_others, t_others, reduction="sum", log_target=True) / batch * (t * t)
    return alpha * tckd, beta * nckd


class DistillLoss(NamedTuple):
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


UNLABELED = -1


def labeled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the rows whose target is not ``UNLABELED``."""
    labeled = int((targets != UNLABELED).sum())
    if labeled == len(targets):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets, ignore_index=UNLABELED, reduction="sum", label_smoothing=label_smoothing)
    return total / max(labeled, 1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float, label_smoothing: float = 0.0) -> DistillLoss:
    """The three terms, returned separately so that KD and CE can be logged apart.

    A target of -1 marks an unlabeled image: the KD term covers every row, CE only the labeled ones (their
    mean; 0 when a batch holds none)."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    ce = labeled_cross_entropy(student_logits, targets, label_smoothing)
    return DistillLoss(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)


class FeatureProjector(nn.Module):
    """FitNets regressor: a 1x1 convolution (maps) or linear layer (vectors) from student to teacher width."""

    def __init__(self, student_channels: int, teacher_channels: int, spatial: bool = True):
        super().__init__()
        if spatial:
            self.proj: nn.Module = nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_channels),
            )
        else:
            self.proj = nn.Linear(student_channels, teacher_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _same_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two feature maps down to the other's spatial size."""
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
            s = F.adaptive_avg_pool2d(s, t.shape[-2:])
        else:
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
    return s, t


def feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                 projector: Optional[nn.Module] = None) -> torch.Tensor:
    """MSE between projected student features and (detached) teacher features; maps are pooled to match."""
    s = projector(student_feature) if projector is not None else student_feature
    s, t = _same_size(s, teacher_feature.detach())
    if s.shape != t.shape:
        raise ValueError(f"feature shapes differ after projection: student {tuple(s.shape)} vs teacher "
                         f"{tuple(t.shape)}; give a FeatureProjector({s.shape[1]}, {t.shape[1]})")
    return F.mse_loss(s, t)


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map: mean over channels of |f|^p, flattened and L2-normalised."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): mean squared difference of the normalised attention
    maps, the form of the authors' code (their weight beta = 1e3 multiplies it). Channel counts may differ."""
    s, t = _same_size(student_feature, teacher_feature.detach())
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """MSE, or Huber (delta 1, on standardized targets: quadratic within one standard deviation)."""
    if kind == "huber":
        return F.huber_loss(prediction, target, delta=1.0)
    return F.mse_loss(prediction, target)


def regression_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
                                 kind: str = "mse") -> DistillLoss:
    """``alpha * MSE(student, teacher) + (1 - alpha) * loss(student, y)`` on standardized targets; the second term
    is returned as ``ce`` (the task term) so both are logged apart."""
    kd = F.mse_loss(student, teacher.detach())
    task = regression_loss(student, target, kind)
    return DistillLoss(alpha * kd + (1 - alpha) * task, kd, task)
