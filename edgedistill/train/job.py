"""One model's training as data: the ``TrainJob`` (model, images, schedule, what teaches it), the teaching (frozen
teacher, feature matcher, cached soft labels), the treatment of imbalanced classes, and the loss of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.data.splits import Split
from edgedistill.recipe.sections import DataConfig, DistillConfig, ModelConfig, TrainConfig
from edgedistill.train.features import DEFAULT_WEIGHTS, FeatureMatcher
from edgedistill.train.losses import (
    UNLABELED,
    Balance,
    distillation_loss,
    dkd_loss,
    effective_number_weights,
    inverse_frequency_weights,
    labeled_cross_entropy,
    regression_distillation_loss,
    regression_loss,
)


@dataclass
class Teaching:
    """What a distillation step learns from: a frozen teacher, the loss settings, optional feature matching."""

    teacher: Optional[nn.Module]  # None when the soft labels come from a cache
    distill: DistillConfig
    features: Optional[FeatureMatcher] = None
    soft_labels: Optional[Any] = None  # softlabels.SoftLabelCache: teacher logits per draw, replayed in order

    @property
    def feature_weight(self) -> float:
        if self.features is None:
            return 0.0
        w = self.distill.feature_weight
        return DEFAULT_WEIGHTS[self.distill.feature_loss] if w is None else w


def dkd_ramp(progress_epochs: float, cfg: ModelConfig, distill: DistillConfig) -> float:
    """DKD's linear warm-up factor at ``progress_epochs`` (fractional epochs done)."""
    warmup = distill.dkd_warmup_epochs if distill.dkd_warmup_epochs is not None else cfg.epochs / 12
    return 1.0 if warmup <= 0 else min(1.0, progress_epochs / warmup)


@dataclass
class TrainJob:
    """One model's training: the model, the images it learns from and is validated on, its schedule and loss
    settings, where it saves, and (for distillation) what teaches it. ``train_model`` reads nothing else."""

    model: nn.Module
    train: Split
    val: Split
    data: DataConfig  # augmentation, batch, data.sampler (distill.balance: sampler swaps in a balanced one)
    cfg: ModelConfig  # epochs, optimizer, class weights, logit adjustment, layer decay
    folder: Path
    seed: int
    fingerprint: str
    device: torch.device
    label: str
    teaching: Optional["Teaching"] = None
    hardware: TrainConfig = field(default_factory=TrainConfig)
    task: str = "classification"
    balance: Optional[Balance] = None
    freeze_bn: bool = False  # BatchNorm statistics stay as they are (quantization-aware fine-tuning)
    # rank 0, after each epoch's record is written (tracking, a search's pruner); an exception it raises (a pruned
    # trial) ends the training there, with the last checkpoint kept
    on_epoch: Optional[Callable[[dict], None]] = None


def balance_for(
    cfg: ModelConfig,
    train: Split,
    data_cfg: DataConfig,
    distill: Optional[DistillConfig] = None,
    original_sampler: Optional[str] = None,
) -> Optional[Balance]:
    """The loss's treatment of imbalanced classes for one step, from its training labels:

    - ``cfg.class_weights`` (auto: ``n / (classes n_c)``, or the listed weights) weigh the CE term;
    - ``cfg.logit_adjustment`` tau adds ``tau * log prior`` to the logits inside CE, the prior being the class
      frequencies the training stream shows (Menon et al. 2021), or under ``distill.balance: sampler`` the
      frequencies of the stream CE is weighted back to;
    - ``distill.balance: sampler``: the stream is drawn class-balanced (``data_cfg.sampler``), and CE is
      importance-weighted by ``prior_original / prior_balanced`` back to ``original_sampler``'s distribution;
    - ``distill.balance: reweight``: the KD target is class-balanced (Balanced KD, effective-number weights).
    None when nothing applies (the loss is then exactly as before)."""
    from edgedistill.data.loaders import stream_prior
    from edgedistill.errors import RecipeError

    labels = np.asarray(train.labels)
    k = len(train.classes)
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    weight = None
    if cfg.class_weights == "auto":
        weight = inverse_frequency_weights(sizes)
    elif isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != k:
            raise RecipeError(
                f"class_weights lists {len(cfg.class_weights)} weights for {k} classes "
                f"({', '.join(train.classes)}): give one per class, in that order"
            )
        weight = np.asarray(cfg.class_weights, dtype=np.float64)
    prior = stream_prior(labels, k, data_cfg.sampler)
    if distill is not None and distill.balance == "sampler":
        original = stream_prior(labels, k, original_sampler or "uniform")
        correction = original / np.maximum(prior, 1e-12)
        weight = correction if weight is None else weight * correction
        # CE is importance-weighted back to the original stream, so its adjustment is that stream's prior (the
        # balanced draw's prior is uniform: adjusting by it would do nothing)
        prior = original
    adjust = cfg.logit_adjustment * np.log(np.maximum(prior, 1e-12)) if cfg.logit_adjustment else None
    kd_weight = (
        np.log(effective_number_weights(sizes)) if distill is not None and distill.balance == "reweight" else None
    )
    if weight is None and adjust is None and kd_weight is None:
        return None
    as_tensor = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Balance(as_tensor(weight), as_tensor(adjust), as_tensor(kd_weight))


def compute_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    cfg: ModelConfig,
    distill: Optional[DistillConfig],
    progress_epochs: float = 0.0,
    task: str = "classification",
    balance: Optional[Balance] = None,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch: CE alone (no teacher), or KD/DKD + CE; targets of -1 are unlabeled. For
    regression: the MSE/Huber task loss, and with a teacher ``alpha * MSE(student, teacher)`` added (as ``kd``;
    the task term is logged as ``ce``). ``balance`` weighs and adjusts CE and class-balances KD (imbalanced
    classes)."""
    if task == "regression":
        if teacher_logits is None:
            loss = regression_loss(logits, targets, cfg.loss)
            return {"loss": loss, "ce": loss}
        assert distill is not None
        out = regression_distillation_loss(logits, teacher_logits, targets, distill.alpha, cfg.loss)
        return {"loss": out.total, "kd": out.kd, "ce": out.ce}
    balance = balance or Balance()
    if teacher_logits is None:
        if balance.empty:
            ce = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        else:
            ce = labeled_cross_entropy(logits, targets, cfg.label_smoothing, balance.ce_weight, balance.ce_adjust)
        return {"loss": ce, "ce": ce}
    assert distill is not None
    if distill.method == "kd":
        out = distillation_loss(
            logits, teacher_logits, targets, distill.temperature, distill.alpha, cfg.label_smoothing, balance
        )
        return {"loss": out.total, "kd": out.kd, "ce": out.ce}
    # DKD needs a target class: an unlabeled image takes the teacher's prediction
    if balance.kd_log_weight is not None:  # the class-balanced teacher decides the target class too
        teacher_logits = teacher_logits + balance.kd_log_weight * distill.temperature
    pseudo = torch.where(targets == UNLABELED, teacher_logits.argmax(-1), targets)
    tckd, nckd = dkd_loss(logits, teacher_logits, pseudo, distill.temperature, distill.dkd_alpha, distill.dkd_beta)
    kd = dkd_ramp(progress_epochs, cfg, distill) * (tckd + nckd)
    ce = labeled_cross_entropy(logits, targets, cfg.label_smoothing, balance.ce_weight, balance.ce_adjust)
    return {
        "loss": distill.alpha * kd + (1 - distill.alpha) * ce,
        "kd": kd,
        "ce": ce,
        "tckd": tckd.detach(),
        "nckd": nckd.detach(),
    }
