"""Splits: the images (paths or decoded arrays) and labels of one split, a data set's splits together, the
unlabeled stream and the calibration hold-out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from edgedistill.data.images import fit_shorter_side, read_image
from edgedistill.errors import DataError
from edgerun.preprocess import PreprocessSpec, geometric

if TYPE_CHECKING:  # targets builds its splits here; the annotation alone needs the class
    from edgedistill.data.targets import TargetScaling

# The label of an image without one (data.unlabeled): cross-entropy skips it, distillation learns it from the
# teacher. The losses mark it with the same value (edgedistill.train.losses.UNLABELED; a test keeps them equal).
UNLABELED = -1


@dataclass
class Split:
    """One split: image paths or decoded arrays, their labels, the class names."""

    name: str
    classes: list[str]
    labels: np.ndarray
    paths: list[Path] = field(default_factory=list)
    images: Optional[list[np.ndarray]] = None  # decoded RGB uint8, when held in memory
    skipped: list[str] = field(default_factory=list)  # unreadable files, with the reason
    max_side: Optional[int] = None  # training splits: shorter side shrunk to what augmentation needs
    prepared: Optional[PreprocessSpec] = None  # evaluation splits: images held resized and cropped by this spec

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        if self.images is not None and self.images[index] is not None:
            return self.images[index]
        image = self._read(index)
        return geometric(image, self.prepared) if self.prepared else fit_shorter_side(image, self.max_side)

    def original(self, index: int) -> np.ndarray:
        """The image as its file decodes, full frame, as a camera would deliver it (an evaluation split may hold it
        cropped, a training split with its shorter side shrunk); arrays without a file are their own original."""
        if not self.paths or (self.prepared is None and not self.max_side):
            return self.load(index)
        return self._read(index)

    def _read(self, index: int) -> np.ndarray:
        image = read_image(self.paths[index])
        if image is None:
            raise DataError(f"image '{self.paths[index]}' became unreadable during the run")
        return image

    def subset(self, indices: Sequence[int]) -> "Split":
        indices = list(indices)
        return Split(
            name=self.name,
            classes=self.classes,
            labels=self.labels[indices],
            paths=[self.paths[i] for i in indices] if self.paths else [],
            images=[self.images[i] for i in indices] if self.images is not None else None,
            skipped=self.skipped,
            max_side=self.max_side,
            prepared=self.prepared,
        )


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Optional[Split]
    source: str
    rest: Optional[Split] = None  # training images that train_per_class left out (``data.unlabeled: rest``)
    calib: Optional[Split] = None  # labelled images for the operating point's threshold (data.calib_dir/_fraction)
    scaling: Optional["TargetScaling"] = None  # task: regression: the train statistics the targets are standardized by

    @property
    def classes(self) -> list[str]:
        """The class names; for regression, the target names (one model output each)."""
        return self.train.classes


def with_unlabeled(train: Split, unlabeled: Split) -> Split:
    """The training split followed by the unlabeled images (targets -1): one shuffled stream for distillation."""
    n, m = len(train), len(unlabeled)
    images = None
    if train.images is not None or unlabeled.images is not None:
        images = (list(train.images) if train.images is not None else [None] * n) + (
            list(unlabeled.images) if unlabeled.images is not None else [None] * m
        )
    paths = (list(train.paths) or [None] * n) + (list(unlabeled.paths) or [None] * m)
    return Split(
        name=f"{train.name}+unlabeled",
        classes=train.classes,
        labels=np.concatenate([train.labels, unlabeled.labels]),
        paths=paths,
        images=images,
        skipped=train.skipped + unlabeled.skipped,
        max_side=train.max_side or unlabeled.max_side,
    )


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(train_idx), np.sort(val_idx)


def _array_split(
    name: str, images: np.ndarray, labels: np.ndarray, classes: list[str], cap: Optional[int], seed: int
) -> tuple[Split, Optional[Split]]:
    """(the split capped at ``cap`` images per class, the images the cap left out or None)."""
    rest = None
    if cap:
        rng = np.random.default_rng(seed)
        keep = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cap] for c in range(len(classes))])
        )
        dropped = np.setdiff1d(np.arange(len(labels)), keep)
        if len(dropped):
            rest = Split(
                name=f"{name}-rest",
                classes=classes,
                labels=labels[dropped].astype(np.int64),
                images=list(images[dropped]),
            )
        images, labels = images[keep], labels[keep]
    return Split(name=name, classes=classes, labels=labels.astype(np.int64), images=list(images)), rest
