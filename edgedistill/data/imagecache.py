"""Decoded images on disk: each file decoded once, in the form a stage reads it (training images at the training
resolution, evaluation images resized and cropped), for every later stage and run that needs the same images in
the same form.

A cache entry is one flat uint8 file of every image and an index of (position in the split, offset, height,
width). Its name hashes the bytes of every source file and the form (size, crop, interpolation), so a changed image
or a recipe that needs another size never reads a stale entry. Entries are memory-mapped, so a data set larger than
memory costs disk, not RAM; they are written to a temporary name and renamed (the index last), so a killed run
never leaves a half entry that looks whole. Plain ``.npy``, no pickle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

FORMAT = b"edgedistill-decoded/2 RGB "
CHUNK = 64 << 20


def cache_dir() -> Path:
    from edgedistill.data.images import cache_root

    return cache_root() / "decoded"


def entry_key(paths: Sequence[Path], variant: str) -> str:
    """The entry of these files in this form (``variant`` names the size, crop and interpolation)."""
    h = hashlib.sha256(FORMAT + variant.encode())
    for path in paths:
        with open(path, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:24]


def load(key: str) -> Optional[tuple[list[int], list[np.ndarray]]]:
    """(positions, images as read-only memory-mapped views) of an entry, or None when there is none."""
    folder = cache_dir()
    index_path, data_path = folder / f"{key}.index.npy", folder / f"{key}.npy"
    if not (index_path.exists() and data_path.exists()):
        return None
    index = np.load(index_path, allow_pickle=False)
    data = np.load(data_path, mmap_mode="r", allow_pickle=False)
    images = [data[off : off + h * w * 3].reshape(h, w, 3) for _pos, off, h, w in index]
    return [int(p) for p in index[:, 0]], images


def build(key: str, count: int, decode: Callable[[int], Optional[np.ndarray]]) -> tuple[list[int], list[np.ndarray]]:
    """Decode positions 0..count-1 (``decode`` returns None for an unreadable file), appending each image to the
    entry as it comes (memory stays flat), then return the entry memory-mapped."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    rows, offset = [], 0
    raw = folder / f".{key}.{os.getpid()}.raw"
    with open(raw, "wb") as fh:
        for position in range(count):
            image = decode(position)
            if image is None:
                continue
            image = np.ascontiguousarray(image, dtype=np.uint8)
            fh.write(image.tobytes())
            rows.append((position, offset, image.shape[0], image.shape[1]))
            offset += image.size
    tmp_data = folder / f".{key}.{os.getpid()}.npy"
    out = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.uint8, shape=(offset,))
    if offset:
        source = np.memmap(raw, dtype=np.uint8, mode="r", shape=(offset,))
        for start in range(0, offset, CHUNK):  # copied in chunks: a data set larger than memory stays on disk
            out[start : start + CHUNK] = source[start : start + CHUNK]
        del source
    out.flush()
    del out
    raw.unlink()
    os.replace(tmp_data, folder / f"{key}.npy")
    tmp_index = folder / f".{key}.{os.getpid()}.index.npy"
    np.save(tmp_index, np.array(rows, dtype=np.int64).reshape(-1, 4))
    os.replace(tmp_index, folder / f"{key}.index.npy")  # last: its presence marks a whole entry
    return load(key)
