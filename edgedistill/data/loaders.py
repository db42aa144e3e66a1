"""Training and evaluation loaders: augmentation, the per-epoch batch sampler (one process or torchrun's
several), loader workers.

An image's augmentation draws from a stream seeded by (seed, epoch, image), so what a process sees never depends
on how many loader workers or torchrun processes there are, nor on the order images are visited; shuffles
depend on (seed, epoch) only, so a resumed run redoes an epoch exactly and cached soft labels can replay it.
Evaluation uses ``edgerun.preprocess`` (the very function the device runs) on the pixels ``data`` holds.
"""

from __future__ import annotations

import math
import os
import random
from typing import Optional

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from edgedistill.data.images import eval_spec
from edgedistill.data.splits import Split
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig
from edgerun.preprocess import INTERPOLATIONS, PreprocessSpec, geometric, normalize, to_three_channels


def item_label(split: Split, index: int):
    """A training or evaluation target: the class index, or the standardized regression values."""
    label = split.labels[index]
    return torch.from_numpy(np.array(label, dtype=np.float32)) if split.labels.ndim > 1 else int(label)


def train_transform(cfg: DataConfig) -> A.Compose:
    aug = cfg.augment
    interp = INTERPOLATIONS[cfg.interpolation]
    steps: list = [
        A.RandomResizedCrop(
            size=(cfg.image_size, cfg.image_size), scale=aug.scale, ratio=aug.ratio, interpolation=interp
        )
    ]
    if aug.rotate:
        steps.append(A.Rotate(limit=aug.rotate, interpolation=interp, p=0.5))
    if aug.hflip:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.color_jitter:
        j = aug.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    steps.append(A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0))
    return A.Compose(steps)


class TrainDataset(Dataset):
    """Augmented training images. An item is asked for as ``(index, epoch_seed)`` and its augmentation draws
    from a stream seeded by both, so an image's view depends on (seed, epoch, image) only: not on the process
    (loader workers, torchrun ranks) nor on the order the images are visited."""

    def __init__(self, split: Split, cfg: DataConfig):
        self.split = split
        self.transform = train_transform(cfg)
        self._np = np.random.Generator(np.random.PCG64(0))
        self._py = random.Random(0)
        self.transform.set_random_state(self._np, self._py)  # one stream shared by every transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch_seed = key
        self._np.bit_generator.state = np.random.PCG64([epoch_seed, index]).state
        self._py.seed(epoch_seed * 2**32 + index)
        image = to_three_channels(self.split.load(index))
        out = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), item_label(self.split, index)


class EvalDataset(Dataset):
    def __init__(self, split: Split, spec: PreprocessSpec):
        self.split = split
        self.spec = spec

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image = self.split.load(index)
        crop = image if self.split.prepared == self.spec else geometric(image, self.spec)
        return torch.from_numpy(normalize(crop[None], self.spec)[0]), item_label(self.split, index)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 100_003 + epoch) % 2**31


# the exponent q of class-aware sampling (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
# Recognition", ICLR 2020): class j is drawn with probability n_j^q / sum_i n_i^q
SAMPLER_POWER = {"uniform": 1.0, "sqrt": 0.5, "balanced": 0.0}


def sampling_weights(labels: np.ndarray, sampler: str) -> Optional[np.ndarray]:
    """Each training row's probability of being drawn under ``data.sampler`` (None: uniform, every row once per
    epoch). Unlabeled rows (label -1) keep their natural share of the stream; labelled rows share the rest by
    class as n_c^q."""
    q = SAMPLER_POWER[sampler]
    if q == 1.0:
        return None
    labels = np.asarray(labels)
    labelled = labels >= 0
    sizes = np.bincount(labels[labelled])
    present = sizes > 0
    class_mass = np.where(present, np.power(np.maximum(sizes, 1), q), 0.0)
    class_mass = class_mass / class_mass.sum() * labelled.mean()  # labelled rows keep their share of the stream
    weights = np.full(len(labels), 1.0 / len(labels))
    weights[labelled] = class_mass[labels[labelled]] / sizes[labels[labelled]]
    return weights / weights.sum()


def stream_prior(labels: np.ndarray, num_classes: int, sampler: str) -> np.ndarray:
    """The class frequencies a training stream shows under ``data.sampler`` (labelled rows only)."""
    labels = np.asarray(labels)
    weights = sampling_weights(labels, sampler)
    labelled = labels >= 0
    mass = np.bincount(
        labels[labelled], weights=None if weights is None else weights[labelled], minlength=num_classes
    ).astype(np.float64)
    return mass / mass.sum()


class EpochBatchSampler(Sampler):
    """Batches of one epoch for one process: the epoch's shuffle depends on (seed, epoch) only, global batch
    ``i`` is ``order[i*B:(i+1)*B]`` and rank ``r`` of ``n`` processes takes its rows ``r::n``, so the processes
    together see exactly the batches one process would (the last incomplete batch is dropped when there is more
    than one). Yields ``(index, epoch_seed)`` pairs for :class:`TrainDataset`; call :meth:`set_epoch` before each
    epoch (the loader and its workers live for the whole training)."""

    def __init__(
        self,
        count: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        weights: Optional[np.ndarray] = None,
    ):
        if count < world:
            raise DataError(f"{count} training images cannot be shared by {world} processes: use fewer processes")
        self.count, self.global_batch, self.seed, self.rank, self.world = count, global_batch, seed, rank, world
        # class-aware sampling: an epoch is ``count`` draws with replacement from these probabilities
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.drop_last = count > global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count // self.global_batch if self.drop_last else math.ceil(self.count / self.global_batch)

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.count, replacement=True, generator=generator).tolist()
        else:
            order = torch.randperm(self.count, generator=generator).tolist()
        return [order[i * self.global_batch : (i + 1) * self.global_batch] for i in range(len(self))]

    def __iter__(self):
        es = epoch_seed(self.seed, self.epoch)
        for batch in self.global_batches():
            yield [(index, es) for index in batch[self.rank :: self.world]]


def resolve_workers(cfg: DataConfig, processes_here: int = 1) -> int:
    """``data.workers``: a number, or auto = the cores this process may use, shared by the processes on this
    machine, less one for the training process itself (at most 8); none with 2 cores or fewer per process, where
    a worker slows training down (benchmarks/results/train_speed.md: 0.77x vs 0.83x of the plain loop)."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = cores // max(1, processes_here)
    return 0 if share <= 2 else min(8, share - 1)


def batch_sizes(cfg: DataConfig, world: int = 1) -> tuple[int, int]:
    """(global batch, each process's batch) for ``world`` processes: ``data.batch_size`` split evenly, or
    ``data.batch_per_device`` each."""
    if cfg.batch_per_device is not None:
        return cfg.batch_per_device * world, cfg.batch_per_device
    if cfg.batch_size % world:
        raise DataError(
            f"data.batch_size {cfg.batch_size} does not split evenly over {world} processes: use a "
            f"multiple of {world}, or set data.batch_per_device (the global batch is then "
            f"batch_per_device x processes)"
        )
    return cfg.batch_size, cfg.batch_size // world


def train_loader(
    split: Split, cfg: DataConfig, seed: int, epoch: int = 0, rank: int = 0, world: int = 1, pin_memory: bool = False
) -> DataLoader:
    """The training loader of one process, positioned at ``epoch`` (``loader.batch_sampler.set_epoch`` moves
    it): shuffle and augmentation depend only on (seed, epoch), so a resumed run redoes an epoch exactly, and
    ``world`` processes see together what one process would. The global batch is ``data.batch_size`` (or
    ``batch_per_device`` x processes); ``data.sampler`` decides how images are drawn."""
    global_batch, _ = batch_sizes(cfg, world)
    weights = sampling_weights(split.labels, cfg.sampler) if split.labels.ndim == 1 else None
    sampler = EpochBatchSampler(len(split), global_batch, seed, rank, world, weights)
    sampler.set_epoch(epoch)
    workers = resolve_workers(cfg, world) if len(sampler) > 1 else 0
    return DataLoader(
        TrainDataset(split, cfg),
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )


def eval_loader(split: Split, cfg: DataConfig) -> DataLoader:
    batch = max(cfg.batch_size, 64)
    workers = resolve_workers(cfg) if len(split) > 4 * batch else 0  # small splits: forking costs more
    return DataLoader(EvalDataset(split, eval_spec(cfg)), batch_size=batch, shuffle=False, num_workers=workers)
