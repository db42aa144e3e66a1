"""EfficientAD: distillation for speed. The big pretrained teacher never reaches the device: a small patch
description network (PDN) learns to reproduce its features first, and the detector is that small teacher, a
student of the same shape and an autoencoder, trained on good parts only.

Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies", WACV 2024
(arXiv:2303.14535):

1. **Small teacher** (section 3.1): a PDN, four convolutions and two average poolings, no padding-free tricks, each
   output describing a 33 x 33 px patch at a quarter of the image's resolution, regresses the big teacher's
   patch features (PatchCore's: the chosen stages 3x3-average-pooled, upsampled to one grid, concatenated,
   reduced to ``channels`` by averaging neighbouring channels). The paper distils on ImageNet; here the images are
   the good training parts and as many everyday photographs (``edgedistill.data.generic``), nothing downloaded.
   ``width`` scales the PDN (the paper's EfficientAD-S is 128; the default 32 is what keeps the pair faster than
   STFPM on a ResNet-18 on a Jetson Nano's estimate).
2. **Student and autoencoder** (sections 3.2-3.3): the student (a PDN with twice the channels) regresses the
   small teacher's channel-normalised features on good images with the hard-feature loss, plus the penalty on
   everyday photographs; the autoencoder (strided convolutions to a 1 x 1 code, bilinear upsampling back) learns
   the teacher's features through a bottleneck, on images with a random brightness, contrast or saturation
   change, and the student's second half learns the autoencoder's output.
3. **Maps** (section 3.4): local anomalies from teacher vs student, logical ones from autoencoder vs student;
   each map normalised on held-out good images with the quantile rule (their 0.9 quantile -> 0, 0.995 -> 0.1),
   the two averaged, upsampled to the image; the image score is the map's maximum.

Departures, for a CPU's budget: Adam at ``lr`` for ``epochs`` passes over the good images in batches (the paper:
70,000 iterations of batch 1 at 1e-4), the small teacher distilled for ``teacher_epochs`` passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.train.anomaly import Q_A, Q_B, end_of_epoch, stage_features
from edgedistill.train.anomaly_steps import StepRunner
from edgedistill.train.epoch_state import EpochState
from edgedistill.train.losses import hard_feature_loss, penalty_loss

log = logging.getLogger(__name__)


class PatchDescriptionNetwork(nn.Module):
    """EfficientAD's PDN (small), padded: image (N, 3, H, W) -> features (N, out_channels, H/4, W/4), each
    position describing a 33 x 33 px patch."""

    def __init__(self, out_channels: int, width: int = 32):
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, padding=3),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=1),
            nn.Conv2d(w, 2 * w, 4, padding=3),
            nn.ReLU(),
            nn.AvgPool2d(2, 2, padding=1),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, out_channels, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pdn_size(size: int) -> int:
    """The PDN's output side for an input side ``size``."""
    n = size + 3
    n = n // 2 + 1
    n = n + 3
    n = n // 2 + 1
    return n - 3


class AutoEncoder(nn.Module):
    """Image -> the teacher's features through a 64-number code: five stride-2 convolutions and one that covers
    what is left (the code is 1 x 1), then bilinear upsampling in doublings to the feature grid, each followed by a
    3 x 3 convolution (dropout 0.2 while training), as the paper's decoder."""

    def __init__(self, out_channels: int, size: int, feature_size: int):
        super().__init__()
        layers, channels, n = [], 3, size
        for out in (32, 32, 64, 64, 64):
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels, n = out, n // 2
        if n < 1:
            raise ValueError(f"efficientad needs images of at least 32 px (got {size})")
        layers.append(nn.Conv2d(64, 64, n))
        self.encoder = nn.Sequential(*layers)
        sizes, s = [], feature_size
        while s > 1 and len(sizes) < 6:
            sizes.insert(0, s)
            s = (s + 1) // 2
        self.sizes = tuple(sizes)
        self.decoder = nn.ModuleList(nn.Conv2d(64, 64, 3, padding=1) for _ in self.sizes)
        self.head = nn.Conv2d(64, out_channels, 3, padding=1)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for s, conv in zip(self.sizes, self.decoder):
            z = self.dropout(F.relu(conv(F.interpolate(z, size=(s, s), mode="bilinear", align_corners=False))))
        return self.head(z)


class EfficientAdDetector(nn.Module):
    """image (N, 3, H, W) -> (anomaly map (N, 1, H, W), image score (N,)): small teacher, student and autoencoder,
    the teacher's feature normalisation and both maps' quantile normalisation folded in (one ONNX graph)."""

    def __init__(self, channels: int, width: int, size: int):
        super().__init__()
        self.channels, self.width, self.size = int(channels), int(width), int(size)
        feature = pdn_size(size)
        self.teacher = PatchDescriptionNetwork(channels, width)
        self.student = PatchDescriptionNetwork(2 * channels, width)
        self.autoencoder = AutoEncoder(channels, size, feature)
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))
        # each map: 0.1 * (map - q_a) / (q_b - q_a); the identity until set_normalization
        self.register_buffer("q_st", torch.tensor([0.0, 0.1]))
        self.register_buffer("q_ae", torch.tensor([0.0, 0.1]))
        self.normalization: dict = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.teacher(x) - self.feature_mean) / self.feature_std

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher-student map, autoencoder-student map), each (N, 1, h, w) on the feature grid."""
        t, s, a = self.features(x), self.student(x), self.autoencoder(x)
        c = self.channels
        map_st = (t - s[:, :c]).pow(2).mean(dim=1, keepdim=True)
        map_ae = (a - s[:, c:]).pow(2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_st, map_ae = self.raw_maps(x)
        map_st = 0.1 * (map_st - self.q_st[0]) / (self.q_st[1] - self.q_st[0])
        map_ae = 0.1 * (map_ae - self.q_ae[0]) / (self.q_ae[1] - self.q_ae[0])
        amap = F.interpolate(0.5 * (map_st + map_ae), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return amap, amap.flatten(1).amax(dim=1)

    @torch.no_grad()
    def set_normalization(self, good: torch.Tensor, batch_size: int = 32) -> dict:
        """Each map's quantiles on held-out good images (never the training ones)."""
        self.eval()
        parts = [self.raw_maps(good[i : i + batch_size]) for i in range(0, len(good), batch_size)]
        facts = {"images": int(len(good)), "rule": f"EfficientAD: each map q{Q_A} -> 0, q{Q_B} -> 0.1, then averaged"}
        for name, index, buffer in (("st", 0, self.q_st), ("ae", 1, self.q_ae)):
            values = torch.cat([p[index].flatten() for p in parts])
            values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            q_a, q_b = torch.quantile(values, Q_A).item(), torch.quantile(values, Q_B).item()
            if not q_b > q_a:
                raise ValueError(f"the good images' {name} maps are constant: no normalisation can be fitted")
            buffer.copy_(torch.tensor([q_a, q_b]))
            facts.update({f"q_a_{name}": q_a, f"q_b_{name}": q_b})
        self.normalization = facts
        return facts


def patch_targets(teacher: nn.Module, x: torch.Tensor, stages: Sequence[int], channels: int, size: int):
    """The big teacher's patch features (PatchCore's recipe) on the PDN's grid: (N, channels, size, size)."""
    feats = stage_features(teacher, x, stages)
    grid = feats[0].shape[-2:]
    pooled = [
        F.interpolate(F.avg_pool2d(f, 3, stride=1, padding=1), size=grid, mode="bilinear", align_corners=False)
        for f in feats
    ]
    joined = F.interpolate(torch.cat(pooled, dim=1), size=(size, size), mode="bilinear", align_corners=False)
    n, c, h, w = joined.shape
    if c == channels:
        return joined
    flat = joined.permute(0, 2, 3, 1).reshape(-1, 1, c)  # neighbouring channels averaged down to `channels`
    return F.adaptive_avg_pool1d(flat, channels).reshape(n, h, w, channels).permute(0, 3, 1, 2)


@dataclass
class EfficientAdJob:
    """What :func:`train_efficientad` trains: the big pretrained ``teacher`` (timm, frozen; it teaches the small
    one and is then left behind), its ``stages``, the ``good`` training images and ``other`` everyday photographs
    (both (N, 3, H, W), normalised alike), the small networks' ``channels`` and ``width``, the schedules, seed."""

    teacher: nn.Module
    good: torch.Tensor
    other: torch.Tensor
    stages: Sequence[int] = (2, 3)
    channels: int = 64
    width: int = 32
    teacher_epochs: int = 30
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    amp: str = "off"  # train.amp: the forward passes' precision (edgedistill.train.anomaly_steps)
    history: list = field(default_factory=list)
    teacher_history: list = field(default_factory=list)
    state: Optional[EpochState] = None  # resumable: written after every epoch of both steps
    on_epoch: Optional[Callable[[str, int], None]] = None  # (phase, epoch) after each epoch's state is written


def _batches(n: int, batch_size: int, generator: torch.Generator, smallest: int = 2):
    """Global batches of positions (every process draws the same ones); a last one under ``smallest`` skipped."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        chunk = order[i : i + batch_size]
        if len(chunk) >= smallest:
            yield chunk


def distill_small_teacher(job: EfficientAdJob, detector: EfficientAdDetector) -> None:
    """Step 1: the PDN teacher regresses the big teacher's normalised patch features on the good images and the
    everyday photographs (flipped at random); then its outputs' per-channel mean and std on the good images are
    folded into the detector."""
    device = job.device
    big = job.teacher.to(device).eval()
    images = torch.cat([job.good, job.other])
    grid = pdn_size(images.shape[-1])
    runner = StepRunner(job.amp, device)
    with torch.no_grad(), runner.autocast():
        targets = torch.cat(
            [
                patch_targets(big, images[i : i + 32].to(device), job.stages, job.channels, grid).float().cpu()
                for i in range(0, len(images), 32)
            ]
        )
    mean = targets.mean(dim=(0, 2, 3), keepdim=True)
    std = targets.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    targets = (targets - mean) / std
    teacher = detector.teacher.to(device).train()
    optimiser = torch.optim.Adam(teacher.parameters(), lr=job.lr, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(job.seed)
    start = 0
    if job.state is not None:
        start, extra = job.state.resume("teacher", teacher, optimiser, generator)
        job.teacher_history[:] = extra.get("teacher_history", [])[:start]
        runner.load_state_dict(extra)
    for epoch in range(start, job.teacher_epochs):
        total, seen = 0.0, 0
        for chunk in _batches(len(images), job.batch_size, generator, runner.min_batch):
            idx = runner.shard(chunk)
            x, y = images[idx].to(device), targets[idx].to(device)
            if torch.rand(1, generator=generator).item() < 0.5:  # one flip for image and target
                x, y = x.flip(-1), y.flip(-1)
            with runner.autocast():
                out = teacher(x)
            loss = F.mse_loss(out.float(), y)
            runner.step(loss, optimiser, runner.share(len(idx), len(chunk)))
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        total, seen = runner.totals(total, seen)
        job.teacher_history.append({"epoch": epoch + 1, "loss": total / max(seen, 1)})
        end_of_epoch(job, "teacher", epoch + 1, (teacher, optimiser, generator, runner))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = torch.cat([teacher(job.good[i : i + 32].to(device)) for i in range(0, len(job.good), 32)])
    detector.feature_mean.copy_(out.mean(dim=(0, 2, 3), keepdim=True).cpu())
    detector.feature_std.copy_(out.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6).cpu())


def _jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's autoencoder augmentation on normalised images: brightness, contrast or saturation by a factor
    in [0.8, 1.2] (applied around the batch's own statistics, which the normalisation leaves linear)."""
    factor = 0.8 + 0.4 * torch.rand(1, generator=generator).item()
    kind = int(torch.randint(3, (1,), generator=generator).item())
    if kind == 0:
        return x * factor
    if kind == 1:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + factor * (x - mean)
    gray = x.mean(dim=1, keepdim=True)
    return gray + factor * (x - gray)


def train_efficientad(job: EfficientAdJob) -> EfficientAdDetector:
    """Both steps; ``job.teacher_history`` gets step 1's loss per epoch, ``job.history`` step 2's loss parts."""
    if len(job.good) < 2:
        raise ValueError(f"efficientad needs good training images: {len(job.good)} given")
    if len(job.other) < 2:
        raise ValueError("efficientad needs everyday photographs for its penalty (edgedistill.data.generic)")
    torch.manual_seed(job.seed)
    device = job.device
    detector = EfficientAdDetector(job.channels, job.width, int(job.good.shape[-1])).to(device)
    c = job.channels
    params = list(detector.student.parameters()) + list(detector.autoencoder.parameters())
    optimiser = torch.optim.Adam(params, lr=job.lr, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(job.seed + 1)
    runner = StepRunner(job.amp, device)
    start = 0
    if job.state is not None and job.state.phase() == "detector":  # step 1 finished before the run was killed
        start, extra = job.state.resume("detector", detector, optimiser, generator)
        job.teacher_history[:] = extra.get("teacher_history", [])
        job.history[:] = extra.get("history", [])[:start]
        runner.load_state_dict(extra)
        for p in detector.teacher.parameters():
            p.requires_grad_(False)
    else:
        distill_small_teacher(job, detector)
    detector.to(device)
    for epoch in range(start, job.epochs):
        detector.student.train()
        detector.autoencoder.train()
        sums = {"hard": 0.0, "penalty": 0.0, "ae": 0.0, "stae": 0.0}
        seen = 0
        for chunk in _batches(len(job.good), job.batch_size, generator, runner.min_batch):
            others = torch.randint(len(job.other), (len(chunk),), generator=generator)
            mine = runner.shard(torch.arange(len(chunk)))
            x = job.good[chunk[mine]].to(device)
            other = job.other[others[mine]].to(device)
            aug = _jitter(x, generator)  # one draw per global batch: every process the same change
            with runner.autocast():
                with torch.no_grad():
                    t, t_aug = detector.features(x), detector.features(aug)
                s_x, s_other, s_aug = detector.student(x), detector.student(other), detector.student(aug)
                a = detector.autoencoder(aug)
            t, t_aug, a = t.float(), t_aug.float(), a.float()
            hard = hard_feature_loss(t, s_x[:, :c].float())
            penalty = penalty_loss(s_other[:, :c].float())
            ae = (t_aug - a).pow(2).mean()
            stae = (a.detach() - s_aug[:, c:].float()).pow(2).mean()
            loss = hard + penalty + ae + stae
            runner.step(loss, optimiser, runner.share(len(x), len(chunk)))
            for key, value in (("hard", hard), ("penalty", penalty), ("ae", ae), ("stae", stae)):
                sums[key] += value.item() * len(x)
            seen += len(x)
        *parts, seen = runner.totals(*sums.values(), seen)
        row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in zip(sums, parts)}}
        row["loss"] = sum(row[k] for k in sums)
        job.history.append(row)
        log.debug("efficientad epoch %d: %s", epoch + 1, row)
        end_of_epoch(job, "detector", epoch + 1, (detector, optimiser, generator, runner))
    return detector.cpu().eval()


def stfpm_resnet18_reference(size: int) -> nn.Module:
    """STFPM on a ResNet-18 (teacher and student up to stage 3), the paper's and anomalib's default: the pair
    efficientad's device estimate is compared with. Random weights: only its architecture is estimated."""
    import timm

    from edgedistill.train.anomaly import AnomalyDetector, fresh_student

    teacher = timm.create_model("resnet18", pretrained=False)
    return AnomalyDetector(teacher, fresh_student(teacher, 0), (1, 2, 3)).eval()
