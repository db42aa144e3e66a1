"""Data-free distillation: a training set synthesized from the teacher alone.

DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
arXiv:1912.08795): batches of random inputs are optimized so that (1) the teacher predicts a chosen class
(cross-entropy), (2) the mean and variance of the features entering every BatchNorm layer match that layer's
running statistics, the teacher's memory of its training images (``bn_statistics_loss``), and (3) image priors
keep them natural: total variation (L1 and L2 of neighbour differences) and an L2 norm (``image_priors``).
Between steps the inputs are jittered and flipped. The optional adaptive term (the paper's Adaptive
DeepInversion) rewards images on which teacher and student disagree: ``1 - JS(teacher, student)``
(``competition_loss``), with the student as it stands at synthesis time.

The set is written as a folder of PNGs per class with the teacher's logits (``soft_labels.npz``), so it can be
inspected and reused; each finished batch is recorded (``batches/NNNN.json``), so a killed synthesis resumes
at the next batch. Everything that decides the images (teacher weights, image size and normalization, the
``datafree`` settings, seed) is hashed into ``key.txt``; a folder made under another key is synthesized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.errors import RecipeError
from edgedistill.files import atomic_write_text
from edgedistill.recipe.sections import DataConfig, DataFreeConfig

log = logging.getLogger(__name__)
SOFT_LABELS = "soft_labels.npz"


# ------------------------------------------------------------------------------------------ the loss terms
def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's feature-distribution term for one BatchNorm layer (Eq. 4): the L2 distances between the
    batch's per-channel mean and variance of the layer's input and the layer's running statistics."""
    dims = [0] + list(range(2, features.dim()))
    mean = features.mean(dims)
    var = features.var(dims, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def image_priors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total variation L1, total variation L2) of a batch (Eq. 3's R_TV): mean absolute, and L2 norms of, the
    differences between each pixel and its right, lower and two diagonal neighbours."""
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    return sum(d.abs().mean() for d in diffs), sum(torch.linalg.vector_norm(d) for d in diffs)


def competition_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """Adaptive DeepInversion's term (Eq. 8): 1 - Jensen-Shannon divergence between the teacher's and the
    student's softened outputs, so minimizing it seeks images the two disagree on."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    js = 0.5 * F.kl_div(m, p, reduction="batchmean") + 0.5 * F.kl_div(m, q, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


class _BNStatistics:
    """Forward hooks collecting ``bn_statistics_loss`` of every BatchNorm layer of a model."""

    def __init__(self, layers: Sequence[nn.Module]):
        self.losses: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: tuple, _output) -> None:
        self.losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

    def take(self) -> list[torch.Tensor]:
        losses, self.losses = self.losses, []
        return losses

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ synthesis
@dataclass
class SyntheticSet:
    """The synthesized images: paths relative to the set's folder, their classes and the teacher's logits."""

    folder: Path
    files: list[str]
    labels: np.ndarray
    logits: np.ndarray

    @classmethod
    def load(cls, folder: Path) -> "SyntheticSet":
        with np.load(folder / SOFT_LABELS, allow_pickle=False) as data:
            return cls(
                folder,
                [str(f) for f in data["files"]],
                data["labels"].astype(np.int64),
                data["logits"].astype(np.float32),
            )


def synthesis_key(
    teacher_sha256: str, data_cfg: DataConfig, cfg: DataFreeConfig, classes: Sequence[str], seed: int
) -> str:
    facts = {
        "teacher": teacher_sha256,
        "size": data_cfg.image_size,
        "mean": data_cfg.mean,
        "std": data_cfg.std,
        "datafree": cfg.model_dump(mode="json", exclude={"compare_run"}),
        "classes": list(classes),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def require_batchnorm(teacher: nn.Module, name: str) -> list[nn.Module]:
    layers = bn_layers(teacher)
    if not layers:
        raise RecipeError(
            f"data.source: datafree: the teacher ({name}) has no BatchNorm layers. DeepInversion "
            "synthesizes images by matching the running statistics BatchNorm layers keep of the "
            "training images; without them there is nothing to invert. Use a teacher with "
            "BatchNorm (ResNet, EfficientNet, MobileNet, ...), or distill on real or unlabeled images"
        )
    return layers


def _to_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Normalized NCHW -> uint8 NHWC RGB."""
    pixels = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class SynthesisJob:
    """What ``synthesize`` makes: images of ``classes`` from the frozen ``teacher`` (its weights' sha256 keys the
    set), at the recipe's image size and normalization (``data_cfg``), with DeepInversion's settings (``cfg``), into
    ``folder``, from ``seed``, on ``device``; ``student`` (the adaptive competition term) and ``progress(done,
    total)`` are optional."""

    teacher: nn.Module
    teacher_sha256: str
    classes: Sequence[str]
    data_cfg: DataConfig
    cfg: DataFreeConfig
    folder: Path
    seed: int
    device: torch.device
    teacher_name: str = "teacher"
    student: Optional[nn.Module] = None
    progress: Optional[Callable[[int, int], None]] = None


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _Inversion:
    """One synthesis's fixed parts: the frozen teacher (and student), its BatchNorm hooks and their weights, the
    normalization and the valid pixel range."""

    def __init__(self, job: SynthesisJob, layers: list[nn.Module]):
        self.job, self.cfg, device = job, job.cfg, job.device
        self.teacher = _frozen(job.teacher, device)
        self.student = _frozen(job.student, device) if job.student is not None and job.cfg.competition > 0 else None
        self.mean = torch.tensor(job.data_cfg.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(job.data_cfg.std, device=device).view(1, 3, 1, 1)
        self.low, self.high = (0 - self.mean) / self.std, (1 - self.mean) / self.std  # valid pixels, normalized
        self.hooks = _BNStatistics(layers)
        self.weights = [self.cfg.first_bn_multiplier] + [1.0] * (len(layers) - 1)

    def optimize(self, b: int, rows: range, targets: torch.Tensor, done: Callable[[int], None]):
        """Batch ``b``'s images, optimized from noise: (images, BN-statistics loss at the first and last step)."""
        cfg, job = self.cfg, self.job
        size = job.data_cfg.image_size
        gen = torch.Generator(device="cpu").manual_seed(job.seed * 1_000_003 + b)
        x = torch.randn((len(rows), 3, size, size), generator=gen).to(job.device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        first = last = None
        for step in range(cfg.steps):
            for group in optimizer.param_groups:  # cosine decay, as the paper's ImageNet schedule
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
            view = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            if cfg.flip and bool(torch.rand(1, generator=gen) < 0.5):
                view = view.flip(3)
            self.hooks.take()
            logits = self.teacher(view)
            bn = sum(w * loss for w, loss in zip(self.weights, self.hooks.take()))
            tv_l1, tv_l2 = image_priors(view)
            loss = (
                F.cross_entropy(logits, targets)
                + cfg.bn_weight * bn
                + cfg.tv_l1 * tv_l1
                + cfg.tv_l2 * tv_l2
                + cfg.l2 * torch.linalg.vector_norm(view)
            )
            if self.student is not None:
                loss = loss + cfg.competition * competition_loss(logits, self.student(view))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, self.high), self.low)  # stay a valid image
            bn_value = float(bn.detach())
            first = bn_value if first is None else first
            last = bn_value
            done(step)
        self.hooks.take()
        return _to_uint8(x.detach(), self.mean, self.std), first, last

    def save(
        self, b: int, rows: range, targets: torch.Tensor, images: np.ndarray, first: float, last: float, batches: int
    ) -> None:
        """The batch's PNG files and its record (files, labels, the teacher's logits of the saved 8-bit images)."""
        folder = self.job.folder
        with torch.no_grad():  # the soft labels of the saved (8-bit) images, as the student will see them
            saved = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(self.job.device)
            soft = self.teacher((saved - self.mean) / self.std).float().cpu()
            self.hooks.take()
        files = []
        for row, image, label in zip(rows, images, targets.tolist()):
            rel = f"images/{label:03d}/{row:06d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / rel), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            files.append(rel)
        probs = soft.softmax(1)
        atomic_write_text(
            folder / "batches" / f"{b:04d}.json",
            json.dumps(
                {
                    "batch": b,
                    "files": files,
                    "labels": targets.tolist(),
                    "logits": soft.tolist(),
                    "bn_loss_first": first,
                    "bn_loss_last": last,
                    "confidence": float(probs[torch.arange(len(files)), targets.cpu()].mean()),
                }
            ),
        )
        log.info(
            "datafree: batch %d/%d, BN-statistics loss %.3f -> %.3f, teacher confidence %.2f",
            b + 1,
            batches,
            first,
            last,
            float(probs[torch.arange(len(files)), targets.cpu()].mean()),
        )


def synthesize(job: SynthesisJob) -> SyntheticSet:
    """Synthesize ``job.cfg.images_per_class`` images per class into ``job.folder`` (resuming finished batches)."""
    cfg, folder, classes = job.cfg, job.folder, job.classes
    layers = require_batchnorm(job.teacher, job.teacher_name)
    key = synthesis_key(job.teacher_sha256, job.data_cfg, cfg, classes, job.seed)
    key_file = folder / "key.txt"
    if folder.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
        log.info("datafree: %s was synthesized under other settings or another teacher; starting again", folder)
        shutil.rmtree(folder)
    if (folder / SOFT_LABELS).exists():
        return SyntheticSet.load(folder)
    (folder / "batches").mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_file, key)

    inversion = _Inversion(job, layers)
    num_classes = len(classes)
    total = cfg.images_per_class * num_classes
    batches = math.ceil(total / cfg.batch_size)
    try:
        for b in range(batches):
            if (folder / "batches" / f"{b:04d}.json").exists():
                continue
            rows = range(b * cfg.batch_size, min(total, (b + 1) * cfg.batch_size))
            targets = torch.tensor([r % num_classes for r in rows], device=job.device)

            def done(step: int, b: int = b) -> None:
                if job.progress is not None:
                    job.progress(b * cfg.steps + step + 1, batches * cfg.steps)

            images, first, last = inversion.optimize(b, rows, targets, done)
            inversion.save(b, rows, targets, images, first, last, batches)
    finally:
        inversion.hooks.close()
    return _finish(folder, classes)


def _finish(folder: Path, classes: Sequence[str]) -> SyntheticSet:
    records = [json.loads(p.read_text()) for p in sorted((folder / "batches").glob("*.json"))]
    files = [f for r in records for f in r["files"]]
    labels = np.array([lab for r in records for lab in r["labels"]], dtype=np.int64)
    logits = np.array([row for r in records for row in r["logits"]], dtype=np.float32)
    tmp = folder / f".{SOFT_LABELS}.tmp.npz"
    np.savez(tmp, files=np.array(files), labels=labels, logits=logits, classes=np.array(list(classes)))
    tmp.replace(folder / SOFT_LABELS)
    summary = {
        "images": len(files),
        "classes": list(classes),
        "bn_loss_first": float(np.mean([r["bn_loss_first"] for r in records])),
        "bn_loss_last": float(np.mean([r["bn_loss_last"] for r in records])),
        "teacher_confidence": float(np.mean([r["confidence"] for r in records])),
    }
    atomic_write_text(folder / "synthesis.json", json.dumps(summary, indent=2))
    return SyntheticSet.load(folder)
