"""Real texture photographs with synthetic defects and their masks: the anomaly detectors' test bench.

The photographs are scikit-image's bundled ``brick``, ``grass`` and ``gravel`` (512 x 512 grayscale, installed with
the package: nothing is downloaded). Good parts are random crops; defective ones are crops with one defect drawn
the way published work synthesises them (DRAEM, CutPaste, MVTec's own categories): a **scratch** (a thin bright or
dark line at a random angle), a **spot** (a blurred disc of another brightness), or a **patch** cut from another
texture and pasted in. Each defect comes with its pixel mask. Seeded: the same seed gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "spot", "patch")


def texture(name: str) -> np.ndarray:
    """The bundled photograph as uint8 (H, W, 3)."""
    try:
        from skimage import data
    except ImportError as exc:  # the [anomaly] extra
        raise ImportError("the texture bench needs scikit-image: pip install 'edgedistill[anomaly]'") from exc
    if name not in TEXTURES:
        raise ValueError(f"texture '{name}': choose one of {', '.join(TEXTURES)}")
    gray = getattr(data, name)()
    return np.repeat(gray[..., None], 3, axis=2)


@dataclass
class TextureSet:
    """``images`` uint8 (N, size, size, 3); ``masks`` uint8 (N, size, size), 1 on defect pixels; ``defect`` the
    kind per image ('' for a good part)."""

    images: np.ndarray
    masks: np.ndarray
    defect: list

    @property
    def is_defective(self) -> np.ndarray:
        return np.array([bool(d) for d in self.defect])


def _crop(source: np.ndarray, size: int, rng: np.random.Generator, region: tuple[float, float]) -> np.ndarray:
    """A crop whose top-left corner lies in the ``region`` (fractions) of the photograph's rows: train, calibration
    and test crops come from different bands of the photograph, so no test pixel was seen in training."""
    h, w = source.shape[:2]
    lo, hi = int(region[0] * (h - size)), int(region[1] * (h - size))
    y = int(rng.integers(lo, max(lo + 1, hi)))
    x = int(rng.integers(0, w - size))
    return source[y : y + size, x : x + size].copy()


def _scratch(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    length = rng.uniform(0.3, 0.7) * size
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    p1, p2 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
    thickness = max(1, int(round(size / 40)))
    value = 255 if img.mean() < 128 else 0
    cv2.line(img, p1, p2, (value, value, value), thickness)
    cv2.line(mask, p1, p2, 1, thickness)


def _spot(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    radius = int(rng.uniform(0.06, 0.14) * size)
    centre = tuple(int(v) for v in rng.uniform(0.25, 0.75, size=2) * size)
    disc = np.zeros(img.shape[:2], np.float32)
    cv2.circle(disc, centre, radius, 1.0, -1)
    soft = cv2.GaussianBlur(disc, (0, 0), max(1.0, radius / 3))
    shade = 40.0 if img.mean() > 128 else 220.0
    out = img.astype(np.float32) * (1 - soft[..., None]) + shade * soft[..., None]
    img[:] = np.clip(out, 0, 255).astype(np.uint8)
    mask[disc > 0] = 1


def _patch(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> None:
    size = img.shape[0]
    side = int(rng.uniform(0.18, 0.3) * size)
    piece = _crop(other, side, rng, (0.0, 1.0))
    y, x = (int(v) for v in rng.integers(int(0.1 * size), int(0.9 * size) - side, size=2))
    img[y : y + side, x : x + side] = piece
    mask[y : y + side, x : x + side] = 1


def texture_set(
    name: str, good: int, defective: int, size: int = 64, seed: int = 0, region: tuple[float, float] = (0.0, 1.0)
) -> TextureSet:
    """``good`` clean crops and ``defective`` crops with one defect each (kinds in turn), from ``region`` of the
    photograph's rows, shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    source = texture(name)
    others = [texture(t) for t in TEXTURES if t != name]
    images, masks, kinds = [], [], []
    for i in range(good + defective):
        img = _crop(source, size, rng, region)
        mask = np.zeros((size, size), np.uint8)
        kind = "" if i < good else DEFECTS[(i - good) % len(DEFECTS)]
        if kind == "scratch":
            _scratch(img, mask, rng)
        elif kind == "spot":
            _spot(img, mask, rng)
        elif kind == "patch":
            _patch(img, mask, rng, others[(i - good) % len(others)])
        images.append(img)
        masks.append(mask)
        kinds.append(kind)
    order = rng.permutation(len(images))
    return TextureSet(np.stack(images)[order], np.stack(masks)[order], [kinds[i] for i in order])
