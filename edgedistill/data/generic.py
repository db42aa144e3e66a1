"""Everyday photographs for the anomaly detectors' "other images": EfficientAD's penalty and the images that teach
its small teacher to describe patches in general (the paper uses ImageNet; nothing may be downloaded here).

The photographs are the natural images scikit-image installs with itself (an astronaut, a camera man, a cat,
coffee, coins, the moon, a rocket, the Hubble deep field, a stained tissue section): random crops, rescaled by a
random factor and flipped, so that patches of many scales and subjects reach the networks. The texture bench's
photographs (brick, grass, gravel) are left out: they are its test images.
"""

from __future__ import annotations

import cv2
import numpy as np

PHOTOGRAPHS = ("astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
               "immunohistochemistry")  # fmt: skip


def _photographs() -> list:
    try:
        from skimage import data
    except ImportError as exc:  # the [anomaly] extra
        raise ImportError(
            "efficientad's penalty images come from scikit-image's bundled photographs: "
            "pip install 'edgedistill[anomaly]'"
        ) from exc
    out = []
    for name in PHOTOGRAPHS:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return out


def generic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` uint8 (size, size, 3) crops of the photographs: each a random photograph, a random scale (the
    crop's side 0.15-0.6 of the photograph's short side, resized to ``size``), a random position and flip."""
    if count < 1 or size < 8:
        raise ValueError(f"generic_images needs count >= 1 and size >= 8 (got {count}, {size})")
    rng = np.random.default_rng(seed)
    photos = _photographs()
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = max(8, int(rng.uniform(0.15, 0.6) * min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out
