"""One image: its size from the PNG/JPEG/BMP header (checked against ``data.max_pixels`` before decoding), decoding
to RGB uint8, the shorter side a training image needs, the evaluation (and device) preprocessing of a recipe, and
where edgedistill keeps what it can recompute.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from edgedistill.recipe.sections import DataConfig
from edgerun.preprocess import PreprocessSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------- decoding
def training_side(cfg: DataConfig) -> int:
    """The shorter side a training image needs: random-resized-crop's smallest crop (area ``scale[0]``, the
    widest aspect ``ratio``) must still cover ``image_size`` pixels, so larger images are shrunk to this once,
    at decoding, instead of being cropped from full resolution every epoch."""
    aug = cfg.augment
    return int(math.ceil(cfg.image_size * math.sqrt(max(aug.ratio[1], 1 / aug.ratio[0]) / aug.scale[0])))


def fit_shorter_side(image: np.ndarray, side: Optional[int]) -> np.ndarray:
    """``image`` with its shorter side shrunk to ``side`` (area interpolation); smaller images unchanged."""
    if not side:
        return image
    h, w = image.shape[:2]
    short = min(h, w)
    if short <= side:
        return image
    size = (max(1, round(w * side / short)), max(1, round(h * side / short)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


DEFAULT_MAX_PIXELS = 100_000_000

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG, JPEG or BMP header without decoding the pixels; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in _JPEG_SOF:
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 2 if marker != 0xFF else 1
                continue
            if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
                return None
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def image_problem(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Why ``path`` is not read as an image (too many pixels for ``data.max_pixels``, empty, unreadable), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "empty file"
    size = header_size(head)
    if max_pixels and size and size[0] * size[1] > max_pixels:
        return f"{size[0]}x{size[1]} pixels, over data.max_pixels {max_pixels:,} (raise it if such images are genuine)"
    return None


def read_image(
    path: Path, reduced: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> Optional[np.ndarray]:
    """Decode to RGB uint8 (H, W, 3); grayscale becomes 3 channels; ``None`` when unreadable, when the header
    declares more than ``max_pixels`` pixels (checked before decoding) or when the decoder fails."""
    flag = cv2.IMREAD_REDUCED_COLOR_8 if reduced else cv2.IMREAD_COLOR
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    size = header_size(data[: 1 << 16].tobytes())
    if max_pixels and size and size[0] * size[1] > max_pixels:
        return None
    try:
        image = cv2.imdecode(data, flag)
    except cv2.error:  # OpenCV's own checks (its pixel limit, a broken header) raise instead of returning None
        return None
    if image is None or image.size == 0:
        return None
    if max_pixels and image.shape[0] * image.shape[1] > max_pixels * (64 if reduced else 1):
        return None  # a format whose header was not read here
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------- sources
def cache_root() -> Path:
    """Where edgedistill keeps what it can recompute (unpacked archives, decoded images, planner fits):
    $EDGEDISTILL_CACHE, else ~/.cache/edgedistill."""
    return Path(os.environ.get("EDGEDISTILL_CACHE", Path.home() / ".cache" / "edgedistill"))


# ----------------------------------------------------------------------------------------------- transforms
def eval_spec(cfg: DataConfig) -> PreprocessSpec:
    """The evaluation (and device) preprocessing of a recipe, as timm derives it from crop_pct."""
    return PreprocessSpec(
        resize=int(round(cfg.image_size / cfg.crop_pct)),
        crop=cfg.image_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )
