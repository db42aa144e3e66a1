"""Cached soft labels: the teacher runs once per image per augmentation draw, the student replays those views.

After Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (FKD, ECCV 2022): store the
teacher's outputs for a fixed number of augmented views of every training image, then train the student on
exactly those views without running the teacher. Here a view is reproduced rather than described: the training
loader's shuffle and augmentation depend only on (seed, epoch) (``loaders.train_loader``), so draw ``d`` is "the
loader of epoch ``d``", and student epoch ``e`` replays draw ``e % draws`` batch by batch. The cache holds, per
draw, the teacher's logits in loader order: the full vector when there are at most 100 classes (or
``cache_topk`` is unset), else the top-k values and their class indices (the rest are treated as -inf, i.e.
zero probability at any temperature).

A cache file is named by everything that decides its contents (the teacher checkpoint's sha256, the training
images, the data and augmentation settings, the seed, draws and k), so a changed teacher or recipe never
reuses a stale one; it is reused by every step with the same teacher (students of a sweep, the baseline never
needs it). Files are plain ``.npz`` arrays, loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from edgedistill.data.loaders import train_loader
from edgedistill.data.splits import Split
from edgedistill.recipe.schema import HARDWARE_KEYS
from edgedistill.recipe.sections import DataConfig
from edgedistill.train import distributed

log = logging.getLogger(__name__)
FULL_VECTOR_CLASSES = 100


def cache_key(
    teacher_sha256: str, split: Split, data_cfg: DataConfig, seed: int, draws: int, topk: Optional[int]
) -> str:
    """What decides the cached logits, hashed: teacher weights, images (labels included: they mark unlabeled
    rows), every data/augmentation setting (not the loader workers, which change no view), seed, draws, k."""
    h = hashlib.sha256()
    h.update(teacher_sha256.encode())
    hardware = {k.split(".", 1)[1] for k in HARDWARE_KEYS if k.startswith("data.")}
    data = data_cfg.model_dump(mode="json", exclude=hardware)
    h.update(
        json.dumps(
            {"data": data, "seed": seed, "draws": draws, "topk": topk, "images": len(split)}, sort_keys=True
        ).encode()
    )
    h.update(np.ascontiguousarray(split.labels).tobytes())
    for i in range(len(split)):
        if split.paths and split.paths[i] is not None:
            h.update(str(split.paths[i]).encode())
        else:
            h.update(hashlib.sha256(np.ascontiguousarray(split.load(i)).tobytes()).digest())
    return h.hexdigest()[:20]


class SoftLabelCache:
    """Teacher logits per draw, in the order the loader of that draw yields its batches."""

    def __init__(self, values: np.ndarray, indices: Optional[np.ndarray], num_classes: int, batch_rows: np.ndarray):
        self.values = values  # (draws, rows, k or classes) float32
        self.indices = indices  # (draws, rows, k) int64, or None for full vectors
        self.num_classes = num_classes
        self.offsets = np.concatenate([[0], np.cumsum(batch_rows)])  # batch i covers rows offsets[i]:offsets[i+1]

    @property
    def draws(self) -> int:
        return self.values.shape[0]

    def batch(self, draw: int, step: int, device: torch.device, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The teacher logits of batch ``step`` of draw ``draw``, as a (batch, classes) tensor; under torchrun,
        the rows of this process's share of the global batch (``data.EpochBatchSampler``)."""
        rows = slice(int(self.offsets[step]) + rank, int(self.offsets[step + 1]), world)
        values = torch.from_numpy(np.ascontiguousarray(self.values[draw, rows]))
        if self.indices is None:
            return values.to(device)
        full = torch.full((len(values), self.num_classes), float("-inf"))
        full.scatter_(1, torch.from_numpy(np.ascontiguousarray(self.indices[draw, rows])), values)
        return full.to(device)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {
            "values": self.values,
            "num_classes": np.array(self.num_classes),
            "batch_rows": np.diff(self.offsets).astype(np.int64),
        }
        if self.indices is not None:
            arrays["indices"] = self.indices
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "SoftLabelCache":
        with np.load(path, allow_pickle=False) as data:
            return cls(
                data["values"],
                data["indices"] if "indices" in data else None,
                int(data["num_classes"]),
                data["batch_rows"],
            )


@dataclass
class SoftLabelJob:
    """The teacher's logits to cache: the frozen ``teacher`` (its weights' sha256 keys the cache), the training
    ``split`` and the recipe's data section (its augmentation draws the views), the seed, how many augmentation
    ``draws``, the top-k kept per image (None: every class), the cache ``folder`` and the device."""

    teacher: nn.Module
    teacher_sha256: str
    split: Split
    data_cfg: DataConfig
    seed: int
    draws: int
    topk: Optional[int]
    folder: Path
    device: torch.device


@torch.inference_mode()
def build(job: SoftLabelJob) -> SoftLabelCache:
    """Run the teacher over ``job.draws`` passes of the training loader (the views the student will replay)."""
    teacher, device, topk, draws = job.teacher, job.device, job.topk, job.draws
    teacher.eval().to(device)
    values, indices, batch_rows, num_classes = [], [], None, None
    loader = train_loader(job.split, job.data_cfg, job.seed, pin_memory=device.type == "cuda")
    for draw in range(draws):
        loader.batch_sampler.set_epoch(draw)
        rows, idx, sizes = [], [], []
        for images, _targets in loader:
            logits = teacher(images.to(device)).float().cpu()
            num_classes = logits.shape[1]
            sizes.append(len(logits))
            if topk and num_classes > FULL_VECTOR_CLASSES:
                top = logits.topk(min(topk, num_classes), dim=1)
                rows.append(top.values.numpy())
                idx.append(top.indices.numpy())
            else:
                rows.append(logits.numpy())
        values.append(np.concatenate(rows))
        if idx:
            indices.append(np.concatenate(idx))
        batch_rows = np.array(sizes, dtype=np.int64)
        log.info("soft labels: draw %d/%d cached (%d images)", draw + 1, draws, sum(sizes))
    return SoftLabelCache(
        np.stack(values).astype(np.float32), np.stack(indices) if indices else None, int(num_classes), batch_rows
    )


def cached_soft_labels(job: SoftLabelJob) -> SoftLabelCache:
    """The cache for this teacher and data: loaded when its file exists, else built and saved."""
    job.folder.mkdir(parents=True, exist_ok=True)
    path = job.folder / f"{cache_key(job.teacher_sha256, job.split, job.data_cfg, job.seed, job.draws, job.topk)}.npz"
    if path.exists():
        log.info("soft labels: reusing %s", path)
        distributed.barrier()
        return SoftLabelCache.load(path)
    cache = None
    if distributed.world().is_main:  # under torchrun rank 0 builds it once, the others then read it
        cache = build(job)
        cache.save(path)
        log.info("soft labels: %d draws x %d images cached in %s", cache.draws, int(cache.offsets[-1]), path)
    distributed.barrier()
    return cache if cache is not None else SoftLabelCache.load(path)
