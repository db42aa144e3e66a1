"""Student-teacher anomaly detection: a student learns a pretrained teacher's features on good parts only, and
where it fails to reproduce them (a scratch, a spot, a foreign patch) the discrepancy is the anomaly.

``stfpm`` (Wang, Wu, Tang, "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021): the
student has the teacher's architecture, starts from random weights and regresses the teacher's channel-normalised
feature maps at chosen stages (``train.losses.stfpm_loss``). At inference each stage's per-position discrepancy is
upsampled to the image, the stages are averaged (the paper multiplies them; the mean keeps a map that one stage
has not yet learned from vanishing), smoothed with a Gaussian (sigma 4 px, as anomalib does), and the image score
is the map's maximum. Maps and scores are normalised on held-out good images with EfficientAD's quantile rule
(Batzner, Heckler, König, "EfficientAD", WACV 2024): the 0.9 quantile of their map values maps to 0 and the 0.995
quantile to 0.1, so that thresholds read alike across models. Everything from image to (map, score) is one
module, :class:`AnomalyDetector`: what ships as one ONNX graph.

Optimiser: Adam (lr 1e-3) rather than the paper's SGD at 0.4, whose schedule assumes hundreds of epochs on a GPU.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.train import distributed
from edgedistill.train.anomaly_steps import StepRunner
from edgedistill.train.epoch_state import EpochState
from edgedistill.train.losses import feature_discrepancy, stfpm_loss

log = logging.getLogger(__name__)

Q_A, Q_B = 0.9, 0.995  # EfficientAD's map normalisation: the 0.9 quantile -> 0, the 0.995 quantile -> 0.1


def stage_features(model: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> list:
    """The model's feature maps at the stages ``indices`` (timm ``feature_info`` numbering); the blocks after the
    last one never run (``stop_early``): the detector carries only the stages it reads."""
    return model.forward_intermediates(x, indices=list(indices), intermediates_only=True, stop_early=True)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


class AnomalyDetector(nn.Module):
    """image (N, 3, H, W), normalised as the recipe says -> (anomaly map (N, 1, H, W), image score (N,)); with
    :meth:`set_normalization`, both on EfficientAD's scale (good images' 0.9 quantile 0, 0.995 quantile 0.1)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, indices: Sequence[int], sigma: float = 4.0):
        super().__init__()
        self.teacher, self.student, self.indices = teacher, student, tuple(int(i) for i in indices)
        self.register_buffer("kernel", gaussian_kernel(sigma))
        # 0.1 * (map - q_a) / (q_b - q_a): the identity until set_normalization (no branch: one graph either way)
        self.register_buffer("q_a", torch.tensor(0.0))
        self.register_buffer("q_b", torch.tensor(0.1))
        self.normalization: dict = {}

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        maps = [
            F.interpolate(feature_discrepancy(t, s), size=size, mode="bilinear", align_corners=False)
            for t, s in zip(
                stage_features(self.teacher, x, self.indices), stage_features(self.student, x, self.indices)
            )
        ]
        amap = torch.stack(maps, dim=0).mean(dim=0)
        pad = self.kernel.shape[-1] // 2
        return F.conv2d(F.pad(amap, (pad, pad, pad, pad), mode="reflect"), self.kernel)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = 0.1 * (self.raw_map(x) - self.q_a) / (self.q_b - self.q_a)
        return amap, amap.flatten(1).amax(dim=1)

    @torch.no_grad()
    def set_normalization(self, good: torch.Tensor, batch_size: int = 32) -> dict:
        """Quantiles of the raw map values of held-out good images (never the training ones)."""
        self.eval()
        values = torch.cat([self.raw_map(good[i : i + batch_size]).flatten() for i in range(0, len(good), batch_size)])
        values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        q_a, q_b = torch.quantile(values, Q_A).item(), torch.quantile(values, Q_B).item()
        if not q_b > q_a:
            raise ValueError("the good images' anomaly maps are constant: no normalisation can be fitted")
        self.q_a.fill_(q_a)
        self.q_b.fill_(q_b)
        self.normalization = {
            "q_a": q_a,
            "q_b": q_b,
            "images": int(len(good)),
            "rule": f"EfficientAD: q{Q_A} -> 0, q{Q_B} -> 0.1",
        }
        return self.normalization


@dataclass
class StfpmJob:
    """What :func:`train_stfpm` trains: the pretrained ``teacher`` (a timm model with ``forward_intermediates``;
    frozen), its ``stages``, the ``good`` training images (N, 3, H, W, normalised), the schedule and seed."""

    teacher: nn.Module
    good: torch.Tensor
    stages: Sequence[int] = (1, 2, 3)
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    amp: str = "off"  # train.amp: the forward passes' precision (edgedistill.train.anomaly_steps)
    history: list = field(default_factory=list)
    state: Optional[EpochState] = None  # resumable: written after every epoch, picked up by the next call
    on_epoch: Optional[Callable[[str, int], None]] = None  # (phase, epoch) after each epoch's state is written


def fresh_student(teacher: nn.Module, seed: int) -> nn.Module:
    """The teacher's architecture with fresh weights (STFPM's student)."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    for module in student.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return student


def train_stfpm(job: StfpmJob) -> AnomalyDetector:
    """Train the student on the good images; ``job.history`` gets the loss per epoch."""
    if len(job.good) < 2:
        raise ValueError(f"STFPM needs good training images: {len(job.good)} given")
    teacher = job.teacher.to(job.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = fresh_student(teacher, job.seed).to(job.device)
    for p in student.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(student.parameters(), lr=job.lr)
    generator = torch.Generator().manual_seed(job.seed)
    runner = StepRunner(job.amp, job.device)
    start = 0
    if job.state is not None:
        start, extra = job.state.resume("stfpm", student, optimiser, generator)
        job.history[:] = extra.get("history", [])[:start]
        runner.load_state_dict(extra)
    for epoch in range(start, job.epochs):
        student.train()
        order = torch.randperm(len(job.good), generator=generator)
        total, seen = 0.0, 0
        for i in range(0, len(order), job.batch_size):
            chunk = order[i : i + job.batch_size]
            if len(chunk) < runner.min_batch:
                continue  # BatchNorm needs two images on every process
            batch = job.good[runner.shard(chunk)].to(job.device)
            with torch.no_grad(), runner.autocast():
                target = [t.float() for t in stage_features(teacher, batch, job.stages)]
            with runner.autocast():
                features = stage_features(student, batch, job.stages)
            loss = stfpm_loss(target, [f.float() for f in features])
            runner.step(loss, optimiser, runner.share(len(batch), len(chunk)))
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        total, seen = runner.totals(total, seen)
        job.history.append({"epoch": epoch + 1, "loss": total / max(seen, 1)})
        log.debug("stfpm epoch %d: loss %.4f", epoch + 1, job.history[-1]["loss"])
        end_of_epoch(job, "stfpm", epoch + 1, (student, optimiser, generator, runner))
    return AnomalyDetector(teacher, student.eval(), job.stages).eval()


def end_of_epoch(job, phase: str, epoch: int, parts: tuple) -> None:
    """The resumable state after ``epoch`` of ``phase`` (``parts``: model, optimiser, batch-order generator and
    step runner; with the job's histories), written by rank 0 alone, then the job's hook."""
    model, optimiser, generator, runner = parts
    if job.state is not None and distributed.world().is_main:
        extra = {"history": list(job.history), "teacher_history": list(getattr(job, "teacher_history", []))}
        job.state.save(phase, epoch, model, optimiser, generator, **extra, **runner.state_dict())
    if job.on_epoch is not None:
        job.on_epoch(phase, epoch)


@torch.no_grad()
def detect(detector: AnomalyDetector, images: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W), scores (N,)) as numpy."""
    detector.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        amap, score = detector(images[i : i + batch_size])
        maps.append(amap[:, 0].cpu().numpy())
        scores.append(score.cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


class PatchMemory(nn.Module):
    """The training-free reference: the pretrained teacher's local features of good images kept in a memory, a
    position's anomaly the distance to its nearest good patch (PatchCore: Roth, Pemula, Zepeda, Schölkopf, Brox,
    Gehler, "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022). As the paper: the chosen stages'
    maps 3x3-average-pooled, upsampled to the first chosen stage and concatenated; the memory subsampled at random
    to ``memory_size`` patches (the paper's greedy coreset keeps coverage better at equal size). The map is
    upsampled, smoothed and normalised as :class:`AnomalyDetector`'s, so both read on one scale."""

    def __init__(
        self, teacher: nn.Module, indices: Sequence[int] = (2, 3), memory_size: int = 20000, sigma: float = 4.0
    ):
        super().__init__()
        self.teacher, self.indices, self.memory_size = teacher.eval(), tuple(int(i) for i in indices), memory_size
        self.register_buffer("kernel", gaussian_kernel(sigma))
        self.register_buffer("memory", torch.zeros(0))
        self.register_buffer("q_a", torch.tensor(0.0))
        self.register_buffer("q_b", torch.tensor(0.1))

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        feats = stage_features(self.teacher, x, self.indices)
        size = feats[0].shape[-2:]
        pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in feats]
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in pooled], dim=1)

    @torch.no_grad()
    def fit(self, good: torch.Tensor, batch_size: int = 32, seed: int = 0) -> "PatchMemory":
        patches = torch.cat(
            [
                self._patches(good[i : i + batch_size]).permute(0, 2, 3, 1).flatten(0, 2)
                for i in range(0, len(good), batch_size)
            ]
        )
        keep = torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[: self.memory_size]
        self.memory = patches[keep].contiguous()
        return self

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        patches = self._patches(x)
        n, c, h, w = patches.shape
        flat = patches.permute(0, 2, 3, 1).reshape(-1, c)
        nearest = torch.cat(
            [torch.cdist(flat[i : i + 4096], self.memory).amin(dim=1) for i in range(0, len(flat), 4096)]
        )
        amap = F.interpolate(nearest.reshape(n, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        pad = self.kernel.shape[-1] // 2
        return F.conv2d(F.pad(amap, (pad, pad, pad, pad), mode="reflect"), self.kernel)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = 0.1 * (self.raw_map(x) - self.q_a) / (self.q_b - self.q_a)
        return amap, amap.flatten(1).amax(dim=1)

    set_normalization = AnomalyDetector.set_normalization
