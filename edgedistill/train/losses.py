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
- ``stfpm_loss``: Wang, Wu, Tang, "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021
  (arXiv:2103.04257), eq. 1-2: at each chosen stage, half the squared distance between the channel-wise
  L2-normalised teacher and student feature vectors, averaged over positions, summed over stages.
- ``hard_feature_loss`` and ``penalty_loss``: Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly
  Detection at Millisecond-Level Latencies", WACV 2024 (arXiv:2303.14535), section 3.2: the student's squared
  error on the teacher's (normalised) features averaged over the elements at or above their ``p_hard`` = 0.999
  quantile only (the hardest patches of each batch), and the mean squared student output on images unlike the
  training ones (ImageNet in the paper), which keeps the student from imitating the teacher off the good images.

For imbalanced classes (``Balance``):
- class weights of the cross-entropy: ``auto`` = ``n / (classes * n_c)`` (King & Zeng, "Logistic Regression in Rare
  Events Data", 2001; scikit-learn's "balanced").
- ``logit_adjusted_cross_entropy``: Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning via logit
  adjustment", ICLR 2021 (arXiv:2007.07314): ``CE(logits + tau * log prior, y)``; the model's own logits then
  estimate the balanced posterior, so inference needs no change.
- ``balanced_kd_loss``: Zhang, Chen, Hu, Peng, "Balanced Knowledge Distillation for Long-tailed Learning",
  Neurocomputing 2023 (arXiv:2104.10510): the KD term is class-balanced by reweighting the teacher's softened
  distribution with class-balanced weights and renormalizing, ``p_t ∝ w_c softmax(z_t / T)``, i.e. the teacher's
  tempered logits shifted by ``log w``; the weights follow the "effective number of samples" (Cui, Jia, Lin, Song,
  Belongie, "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019): ``w_c ∝ (1 - b) / (1 - b^n_c)``,
  b = 0.9999, normalized to sum to the number of classes.

The teacher's logits are detached inside these functions: no gradient ever reaches the teacher.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
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


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
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


UNLABELED = -1  # the target of an image without a label: edgedistill.data.splits.UNLABELED, the same value


class Balance(NamedTuple):
    """How a step's loss treats imbalanced classes; every field None leaves the loss as it was."""

    ce_weight: Optional[torch.Tensor] = None  # per class: class weights (x importance weights of a balanced stream)
    ce_adjust: Optional[torch.Tensor] = None  # per class: tau * log prior, added to the logits inside CE only
    kd_log_weight: Optional[torch.Tensor] = None  # per class: log class-balanced weights of the teacher's targets

    @property
    def empty(self) -> bool:
        return all(t is None for t in self)

    def to(self, device: torch.device) -> "Balance":
        return Balance(*(None if t is None else t.to(device) for t in self))


def inverse_frequency_weights(sizes: np.ndarray) -> np.ndarray:
    """``n / (classes * n_c)`` per class (0 for a class without images): each class weighs as much in total."""
    sizes = np.asarray(sizes, dtype=np.float64)
    present = sizes > 0
    return np.where(present, sizes.sum() / (present.sum() * np.maximum(sizes, 1)), 0.0)


def effective_number_weights(sizes: np.ndarray, beta: float = 0.9999) -> np.ndarray:
    """Cui et al. (CVPR 2019): ``(1 - beta) / (1 - beta^n_c)``, normalized to sum to the number of classes."""
    sizes = np.maximum(np.asarray(sizes, dtype=np.float64), 1)
    weights = (1 - beta) / (1 - np.power(beta, sizes))
    return weights / weights.sum() * len(sizes)


def labeled_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    adjust: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy over the rows whose target is not ``UNLABELED``: their mean, or with per-class ``weight``
    their weighted mean (PyTorch's convention: divided by the summed weights of the rows' classes); ``adjust``
    is added to the logits first (logit adjustment). 0 when no row is labelled."""
    if adjust is not None:
        logits = logits + adjust
    labeled = targets != UNLABELED
    if weight is None:
        if bool(labeled.all()):
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        total = F.cross_entropy(
            logits, targets, ignore_index=UNLABELED, reduction="sum", label_smoothing=label_smoothing
        )
        return total / max(int(labeled.sum()), 1)
    total = F.cross_entropy(
        logits, targets, weight=weight, ignore_index=UNLABELED, reduction="sum", label_smoothing=label_smoothing
    )
    return total / weight[targets[labeled]].sum().clamp_min(1e-12)


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Menon et al. (ICLR 2021), the logit-adjusted loss: ``CE(logits + tau * log prior, y)``."""
    return labeled_cross_entropy(logits, targets, adjust=tau * torch.log(prior))


def balanced_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    log_class_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KD against the teacher's softened distribution reweighted per class (Balanced KD, Zhang et al.):
    ``p_t ∝ w * softmax(z_t / T) = softmax(z_t / T + log w)``; without weights, plain ``kd_loss``."""
    if log_class_weights is None:
        return kd_loss(student_logits, teacher_logits, temperature)
    t = float(temperature)
    shifted = teacher_logits.detach() / t + log_class_weights
    return kd_loss(student_logits / t, shifted, 1.0) * (t * t)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    balance: Optional[Balance] = None,
) -> DistillLoss:
    """The three terms, returned separately so that KD and CE can be logged apart.

    A target of -1 marks an unlabeled image: the KD term covers every row, CE only the labeled ones (their
    mean; 0 when a batch holds none). ``balance`` weighs and adjusts the CE term and class-balances the KD term."""
    balance = balance or Balance()
    kd = balanced_kd_loss(student_logits, teacher_logits, temperature, balance.kd_log_weight)
    ce = labeled_cross_entropy(student_logits, targets, label_smoothing, balance.ce_weight, balance.ce_adjust)
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


def feature_loss(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, projector: Optional[nn.Module] = None
) -> torch.Tensor:
    """MSE between projected student features and (detached) teacher features; maps are pooled to match."""
    s = projector(student_feature) if projector is not None else student_feature
    s, t = _same_size(s, teacher_feature.detach())
    if s.shape != t.shape:
        raise ValueError(
            f"feature shapes differ after projection: student {tuple(s.shape)} vs teacher "
            f"{tuple(t.shape)}; give a FeatureProjector({s.shape[1]}, {t.shape[1]})"
        )
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


def regression_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, kind: str = "mse"
) -> DistillLoss:
    """``alpha * MSE(student, teacher) + (1 - alpha) * loss(student, y)`` on standardized targets; the second term
    is returned as ``ce`` (the task term) so both are logged apart."""
    kd = F.mse_loss(student, teacher.detach())
    task = regression_loss(student, target, kind)
    return DistillLoss(alpha * kd + (1 - alpha) * task, kd, task)


def feature_discrepancy(teacher_feature: torch.Tensor, student_feature: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): half the squared distance between the channel-normalised feature vectors at each position
    (STFPM's per-position loss and its anomaly map; 0 where the student reproduces the teacher, at most 2)."""
    t = F.normalize(teacher_feature.detach(), dim=1)
    s = F.normalize(student_feature, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


def stfpm_loss(teacher_features: list, student_features: list) -> torch.Tensor:
    """STFPM (Wang et al. 2021): the per-position discrepancy averaged over positions and images, summed over the
    stages. The teacher's features are detached."""
    if len(teacher_features) != len(student_features) or not teacher_features:
        raise ValueError("stfpm_loss needs one student feature map per teacher feature map")
    return sum(feature_discrepancy(t, s).mean() for t, s in zip(teacher_features, student_features))


def hard_feature_loss(teacher_feature: torch.Tensor, student_feature: torch.Tensor, p_hard: float = 0.999):
    """EfficientAD's hard-feature loss (Batzner et al. 2024, eq. 1): the mean of the squared differences at or
    above their ``p_hard`` quantile; the teacher's features are detached."""
    distance = (teacher_feature.detach() - student_feature).pow(2).flatten()
    if distance.numel() > 2**24:  # torch.quantile's limit: a seeded subset decides the quantile
        keep = torch.randperm(distance.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]
        cut = torch.quantile(distance.detach()[keep.to(distance.device)], p_hard)
    else:
        cut = torch.quantile(distance.detach(), p_hard)
    return distance[distance >= cut].mean()


def penalty_loss(student_feature_on_other_images: torch.Tensor) -> torch.Tensor:
    """EfficientAD's penalty (Batzner et al. 2024, section 3.2): the mean squared student output on images unlike
    the good parts, so that the student does not generalise its imitation of the teacher to anomalies."""
    return student_feature_on_other_images.pow(2).mean()
