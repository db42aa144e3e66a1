"""Image folders for anomaly detection without defect labels (``task: anomaly``), laid out as MVTec AD is:

    root/train/good/*.png                        good parts only: what the detector learns
    root/val/good/*.png, root/val/<kind>/*.png   good parts, and defect kinds that only measure
    root/test/...                                as val/ (optional): reported on when present
    root/val/<kind>/<stem>_mask.png              a defect's pixel mask beside its image, or
    root/ground_truth/<kind>/<stem>_mask.png     MVTec's own place for the test split's masks

Every image goes through the device's geometry (edgerun.preprocess: the shorter side scaled to ``image_size``,
then the centre square), its mask through the same with nearest-neighbour.
A mask whose size is not its image's, or a defect image without one, is skipped from the pixel metrics and counted
(``masks_skipped``), never an error; a ``train/`` folder with a class besides ``good`` is an error that names the
task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from edgedistill.data.images import read_image
from edgedistill.errors import DataError
from edgerun.preprocess import center_crop, resize_shorter_side

log = logging.getLogger(__name__)

GOOD = "good"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class AnomalySplit:
    """``images`` uint8 (N, S, S, 3); ``kind`` per image ('good' or the defect folder); ``masks`` uint8
    (N, S, S) (zeros for good images) and ``has_mask`` per image; ``files``; masks skipped and why."""

    images: np.ndarray
    kind: list
    masks: np.ndarray
    has_mask: np.ndarray
    files: list
    masks_skipped: list = field(default_factory=list)

    @property
    def is_defective(self) -> np.ndarray:
        return np.array([k != GOOD for k in self.kind])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))


def _resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """The device's geometry (edgerun.preprocess): the shorter side scaled to ``size``, then the centre
    ``size`` x ``size`` crop; a mask with nearest-neighbour, so it stays on its defect."""
    scaled = resize_shorter_side(image, size, "nearest" if nearest else "area")
    return center_crop(scaled if scaled.ndim == image.ndim else scaled[..., 0], (size, size))


def _mask_for(root: Path, split: str, kind: str, image: Path) -> Optional[Path]:
    for candidate in (
        image.with_name(f"{image.stem}_mask.png"),
        root / "ground_truth" / kind / f"{image.stem}_mask.png",
        root / split / "ground_truth" / kind / f"{image.stem}_mask.png",
    ):
        if candidate.is_file():
            return candidate
    return None


def _read(path: Path) -> np.ndarray:
    image = read_image(path)
    if image is None:
        raise DataError(f"'{path}' cannot be decoded as an image: remove or replace it")
    return image


def load_split(root: Path, split: str, size: int) -> Optional[AnomalySplit]:
    """One split folder (None when absent); ``train`` must hold ``good/`` alone."""
    folder = root / split
    if not folder.is_dir():
        return None
    kinds = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "ground_truth")
    if split == "train" and kinds != [GOOD]:
        raise DataError(
            f"'{folder}' holds class folders {kinds}: task: anomaly trains on good parts only, from "
            f"'{folder / GOOD}'. Move the defect kinds under val/ or test/ (they only measure), or use "
            "task: classification to learn labelled defects"
        )
    images, kind, masks, has_mask, files, skipped = [], [], [], [], [], []
    for name in kinds:
        for path in _images(folder / name):
            image = _read(path)
            images.append(_resize(image, size))
            kind.append(name)
            files.append(str(path))
            mask = np.zeros((size, size), np.uint8)
            ok = name == GOOD
            if name != GOOD:
                mask_path = _mask_for(root, split, name, path)
                if mask_path is None:
                    skipped.append(f"{path}: no mask")
                else:
                    raw = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
                    if raw is None:
                        skipped.append(f"{mask_path}: cannot be decoded")
                    elif raw.shape != image.shape[:2]:
                        skipped.append(
                            f"{mask_path}: {raw.shape[1]}x{raw.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"
                        )
                    else:
                        mask = (_resize(raw, size, nearest=True) > 0).astype(np.uint8)
                        ok = True
            masks.append(mask)
            has_mask.append(ok)
    if not images:
        raise DataError(f"'{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if skipped:
        log.warning(
            "%s: %d defect mask(s) skipped from the pixel metrics (first: %s)", folder, len(skipped), skipped[0]
        )
    return AnomalySplit(np.stack(images), kind, np.stack(masks), np.array(has_mask), files, skipped)


@dataclass
class AnomalyData:
    train: AnomalySplit
    val: AnomalySplit
    test: Optional[AnomalySplit]


def load_anomaly_folders(root: str | Path, size: int) -> AnomalyData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder (task: anomaly reads train/good/, val/ and test/)")
    train = load_split(root, "train", size)
    if train is None:
        raise DataError(f"data.root '{root}' has no train/ folder: task: anomaly trains on '{root}/train/good/'")
    val = load_split(root, "val", size)
    if val is None or not (~val.is_defective).any():
        raise DataError(
            f"'{root}/val/good/' is missing or empty: task: anomaly normalises its maps and picks its threshold on "
            "good images it did not train on"
        )
    return AnomalyData(train, val, load_split(root, "test", size))
