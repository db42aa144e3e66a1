"""Distillation losses: pure functions on tensors.

- ``kd_loss``: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015
  (arXiv:1503.02531). KL divergence between temperature-softened teacher and student distributions,
  scaled by T^2 so that its gradients keep their magnitude as T changes (section 2 of the paper).
- ``distillation_loss``: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)``.
- ``feature_loss``: Romero et al., "FitNets: Hints for Thin Deep Nets", 2015 (arXiv:1412.6550):
  MSE between a student feature map, projected by a learned regressor, and the teacher's.

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


class DistillLoss(NamedTuple):
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float, label_smoothing: float = 0.0) -> DistillLoss:
    """The three terms, returned separately so that KD and CE can be logged apart."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
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


def feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                 projector: Optional[nn.Module] = None) -> torch.Tensor:
    """MSE between projected student features and (detached) teacher features; maps are resized to match."""
    s = projector(student_feature) if projector is not None else student_feature
    t = teacher_feature.detach()
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        s = F.adaptive_avg_pool2d(s, t.shape[-2:])
    if s.shape != t.shape:
        raise ValueError(f"feature shapes differ after projection: student {tuple(s.shape)} vs teacher "
                         f"{tuple(t.shape)}; give a FeatureProjector({s.shape[1]}, {t.shape[1]})")
    return F.mse_loss(s, t)
