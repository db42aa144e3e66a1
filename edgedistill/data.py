"""Labelled image data: folders of class sub-folders, scikit-learn's digits, Fashion-MNIST IDX files, regression
folders with a targets.csv, a synthetic (data-free) set; decoding once, checks, caching.

Images are decoded with OpenCV into RGB uint8 arrays; ``loaders`` augments and batches them. Evaluation images
are held as ``edgerun.preprocess`` crops them (``eval_spec``), the very function the device runs, so host
accuracy and device accuracy are measured on the same pixels.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from edgerun.archive import safe_extract
from edgerun.manifest import sha256_file
from edgerun.preprocess import PreprocessSpec, geometric

from .errors import DataError
from .losses import UNLABELED
from .recipe import DataConfig

log = logging.getLogger(__name__)
UNLABELED_REST = "rest"  # data.unlabeled: the source's training images beyond train_per_class, labels withheld

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Folders of at most this many decoded pixels (all images together) are held in memory by default.
CACHE_PIXELS = 600_000_000


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
        """The image as its file decodes (an evaluation split may hold it already cropped)."""
        if self.prepared is None or not self.paths:
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


@dataclass(frozen=True)
class TargetScaling:
    """Regression targets are learned standardized: ``(y - mean) / std`` with the training split's statistics."""

    names: list[str]
    mean: list[float]
    std: list[float]

    def restore(self, standardized: np.ndarray) -> np.ndarray:
        from edgerun.regression import restore

        return restore(self.as_dict(), standardized)

    def as_dict(self) -> dict:
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std)}


TARGETS_FILE = "targets.csv"


def read_targets(split_dir: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """A regression split: ``targets.csv`` in the split folder, header ``file,NAME[,NAME2...]``, one row per
    image (paths relative to the folder). Every bad row is named (line, file, reason) before anything trains."""
    import csv

    path = split_dir / TARGETS_FILE
    if not path.is_file():
        raise DataError(f"task: regression: '{path}' is missing: each split folder holds its images and a "
                        f"{TARGETS_FILE} with a header row 'file,<target name>[,<target 2>...]' and one row per image")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "file":
        raise DataError(f"'{path}': the first row must be the header 'file,<target name>[,...]' (found "
                        f"{rows[0] if rows else 'an empty file'})")
    names = [n.strip() for n in rows[0][1:]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"'{path}': target names in the header must be non-empty and distinct (found {names})")
    paths, values, bad = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(names) + 1:
            bad.append(f"line {line}: {len(row)} fields, the header has {len(names) + 1}")
            continue
        file = split_dir / row[0].strip()
        if not file.is_file():
            bad.append(f"line {line}: file '{row[0].strip()}' does not exist in {split_dir}")
            continue
        try:
            numbers = [float(cell) for cell in row[1:]]
        except ValueError:
            bad.append(f"line {line}: '{row[0].strip()}' has a non-numeric target ({row[1:]})")
            continue
        if not all(math.isfinite(v) for v in numbers):
            bad.append(f"line {line}: '{row[0].strip()}' has a NaN or infinite target")
            continue
        paths.append(file)
        values.append(numbers)
    if bad:
        raise DataError(f"'{path}': {len(bad)} bad row(s), fix them before training:\n  " + "\n  ".join(bad[:20])
                        + ("\n  ..." if len(bad) > 20 else ""))
    if not paths:
        raise DataError(f"'{path}' lists no image")
    return paths, np.asarray(values, dtype=np.float64), names


def load_regression_folder(cfg: DataConfig, seed: int) -> DataBundle:
    """``task: regression``: train/, val/ (and test/) folders, each with a targets.csv; targets standardized with
    the training split's mean and standard deviation (kept in ``DataBundle.scaling``)."""
    if not cfg.root:
        raise DataError("data.root is not set: give the image folder with --set data.root=/path/to/data")
    root = resolve_root(cfg.root)
    raw = {}
    for name, folder in (("train", cfg.train_dir), ("val", cfg.val_dir), ("test", cfg.test_dir)):
        if folder is None:
            continue
        split_dir = root / folder
        if not split_dir.is_dir():
            raise DataError(f"'{split_dir}' is missing: a regression data folder holds {cfg.train_dir}/ and "
                            f"{cfg.val_dir}/, each with its images and a {TARGETS_FILE}")
        raw[name] = read_targets(split_dir)
    names = raw["train"][2]
    for name, (_, _, other) in raw.items():
        if other != names:
            raise DataError(f"the targets of split '{name}' ({other}) differ from train's ({names})")
    mean = raw["train"][1].mean(0)
    std = raw["train"][1].std(0)
    std = np.where(std > 0, std, 1.0)  # a constant target stays as it is
    scaling = TargetScaling(names, [float(v) for v in mean], [float(v) for v in std])
    splits = {}
    for name, (paths, values, _) in raw.items():
        labels = ((values - mean) / std).astype(np.float32)
        split = Split(name=name, classes=names, labels=labels, paths=paths)
        if name == "train":
            if cfg.train_per_class:
                log.warning("data.train_per_class has no classes to cap under task: regression; ignored")
            splits[name] = verify_and_cache(split, cfg.cache, labelled=False, max_side=training_side(cfg),
                                            max_pixels=cfg.max_pixels)
        else:
            splits[name] = verify_and_cache(split, cfg.cache, labelled=False, prepared=eval_spec(cfg),
                                            max_pixels=cfg.max_pixels)
    return DataBundle(splits["train"], splits["val"], splits.get("test"), source=str(root), scaling=scaling)


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
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return width, height
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 2 if marker != 0xFF else 1
                continue
            if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
                return None
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
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
        return (f"{size[0]}x{size[1]} pixels, over data.max_pixels {max_pixels:,} (raise it if such images are "
                "genuine)")
    return None


def read_image(path: Path, reduced: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
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


def resolve_root(root: str | os.PathLike, cache_dir: Optional[Path] = None) -> Path:
    """A folder as is; an archive is unpacked (checked member by member) once into a cache."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root '{path}' does not exist: point it at a folder with train/ and val/, or an archive")
    if path.is_dir():
        return path
    if not str(path).endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"data.root '{path}' is a file but not a .tar/.tar.gz/.tgz archive")
    cache_dir = cache_dir or cache_root()
    dest = cache_dir / "datasets" / f"{path.name.split('.')[0]}-{sha256_file(str(path))[:12]}"
    if not (dest / ".complete").exists():
        log.info("unpacking %s into %s", path, dest)
        safe_extract(path, dest)
        (dest / ".complete").touch()
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    # An archive that holds one top folder (cifar10/train, ...) is entered.
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder_split(root: Path, split: str, cap_per_class: Optional[int], seed: int) -> Split:
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"'{split_dir}' is missing (found: {present or 'no folders'}); a data folder holds "
                        f"train/ and val/ with one sub-folder per class (set data.val_dir if yours is named otherwise)")
    folders = _class_folders(split_dir)
    if not folders:
        raise DataError(f"'{split_dir}' has no class sub-folders: put each class's images in {split_dir}/<class>/")
    paths, labels = [], []
    rng = np.random.default_rng(seed)
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"class folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                            f"add images or remove the folder")
        if cap_per_class and len(files) > cap_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), cap_per_class, replace=False))]
        paths.extend(files)
        labels.extend([label] * len(files))
    return Split(name=split, classes=[p.name for p in folders], labels=np.asarray(labels, dtype=np.int64),
                 paths=paths)


def verify_and_cache(split: Split, cache: Optional[bool], labelled: bool = True,
                     max_side: Optional[int] = None, prepared: Optional[PreprocessSpec] = None,
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Split:
    """Decode every image once; unreadable files are dropped, counted and listed (never fatal alone).

    Folder images go to the on-disk decoded cache (``imagecache``) unless ``cache`` is false: training splits
    (``max_side``) with their shorter side shrunk to what the training augmentation reads, evaluation splits
    (``prepared``) resized and cropped by the evaluation spec, exactly the pixels evaluation would compute from
    the full-resolution file (the device sees the full frame: bundles take the originals).
    """
    if (max_side or prepared) and cache is not False and split.paths:
        return _from_disk_cache(split, labelled, max_side, prepared, max_pixels)
    keep, images, skipped, pixels = [], [], [], 0
    hold = cache is not False
    for i, path in enumerate(split.paths):
        image = read_image(path, reduced=not hold, max_pixels=max_pixels)
        if image is None:
            skipped.append(str(path))
            continue
        keep.append(i)
        if hold:
            image = fit_shorter_side(image, max_side)
            images.append(image)
            pixels += image.size
            if cache is None and pixels > CACHE_PIXELS:  # too big to hold: fall back to lazy decoding
                hold, images = False, []
    return _finish(split, keep, images if hold else None, skipped, labelled, max_side, max_pixels=max_pixels)


def _from_disk_cache(split: Split, labelled: bool, max_side: Optional[int],
                     prepared: Optional[PreprocessSpec], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Split:
    """Images from the on-disk decoded cache (``imagecache``), decoding only on a miss."""
    from . import imagecache

    if prepared is not None:
        variant = f"eval resize {prepared.resize} crop {prepared.crop} {prepared.interpolation}"
        form = lambda image: geometric(image, prepared)  # noqa: E731
    else:
        variant = f"train side {max_side} area"
        form = lambda image: fit_shorter_side(image, max_side)  # noqa: E731
    if max_pixels != DEFAULT_MAX_PIXELS:  # which images are skipped depends on the limit
        variant += f" max pixels {max_pixels}"
    key = imagecache.entry_key(split.paths, variant)
    entry = imagecache.load(key)
    if entry is None:
        log.info("split %s: decoding %d images once (%s) into %s", split.name, len(split), variant,
                 imagecache.cache_dir())

        def decode(i: int) -> Optional[np.ndarray]:
            image = read_image(split.paths[i], max_pixels=max_pixels)
            return None if image is None else form(image)

        entry = imagecache.build(key, len(split), decode)
    keep, images = entry
    kept = set(keep)
    skipped = [str(p) for i, p in enumerate(split.paths) if i not in kept]
    return _finish(split, keep, images, skipped, labelled, max_side, prepared, max_pixels)


def _finish(split: Split, keep: list[int], images: Optional[list[np.ndarray]], skipped: list[str], labelled: bool,
            max_side: Optional[int], prepared: Optional[PreprocessSpec] = None,
            max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Split:
    if not keep:
        raise DataError(f"no readable image in '{split.paths[0].parent.parent}' ({len(skipped)} unreadable)")
    out = split.subset(keep)
    out.images = images
    out.skipped = skipped
    out.max_side = max_side
    out.prepared = prepared
    for cls in range(len(split.classes) if labelled else 0):
        if not np.any(out.labels == cls):
            raise DataError(f"class '{split.classes[cls]}' of split '{split.name}' has no readable image left")
    if skipped:
        reasons = [f"{p} ({image_problem(Path(p), max_pixels) or 'not a decodable image'})" for p in skipped[:5]]
        log.warning("split %s: skipped %d unreadable image(s): %s%s", split.name, len(skipped), ", ".join(reasons),
                    " ..." if len(skipped) > 5 else "")
    return out


def load_folder(cfg: DataConfig, seed: int) -> DataBundle:
    if not cfg.root:
        raise DataError("data.root is not set: give the image folder with --set data.root=/path/to/data")
    root = resolve_root(cfg.root)
    train = scan_folder_split(root, cfg.train_dir, cfg.train_per_class, seed)
    val = scan_folder_split(root, cfg.val_dir, cfg.val_per_class, seed)
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"class folders of '{root / cfg.val_dir}' differ from '{root / cfg.train_dir}': "
                        f"only in train: {only_train or '-'}, only in val: {only_val or '-'}; "
                        f"both splits need the same class sub-folders")
    test = calib = None
    if cfg.test_dir:
        test = scan_folder_split(root, cfg.test_dir, cfg.val_per_class, seed)
        if test.classes != train.classes:
            raise DataError(f"class folders of '{root / cfg.test_dir}' differ from '{root / cfg.train_dir}'")
    if cfg.calib_dir:
        calib = scan_folder_split(root, cfg.calib_dir, None, seed)
        if calib.classes != train.classes:
            raise DataError(f"class folders of '{root / cfg.calib_dir}' (data.calib_dir) differ from "
                            f"'{root / cfg.train_dir}': the threshold is picked per class, so both need the same "
                            "class sub-folders")
    rest = None
    if cfg.train_per_class and cfg.unlabeled == UNLABELED_REST:
        kept = set(train.paths)
        everything = scan_folder_split(root, cfg.train_dir, None, seed)
        left = [i for i, p in enumerate(everything.paths) if p not in kept]
        rest = (verify_and_cache(everything.subset(left), cfg.cache, labelled=False, max_side=training_side(cfg),
                                 max_pixels=cfg.max_pixels)
                if left else None)
    train = verify_and_cache(train, cfg.cache, max_side=training_side(cfg), max_pixels=cfg.max_pixels)
    val = verify_and_cache(val, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    test = verify_and_cache(test, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels) if test else None
    calib = verify_and_cache(calib, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels) if calib else None
    return DataBundle(train, val, test, source=str(root), rest=rest, calib=calib)


def load_unlabeled(source: str, data: DataBundle, cache: Optional[bool], max_side: Optional[int] = None) -> Split:
    """Unlabeled images (``data.unlabeled``): every image file under a folder or archive, any layout, label -1;
    or ``rest``: the source's own training images beyond ``data.train_per_class``, their labels withheld.

    Files that are labelled images of the run are left out: training images so that none counts twice (the
    folder may be the full data set of which the recipe keeps ``train_per_class``), validation and test
    images so that no evaluation image is ever trained on.
    """
    if source == UNLABELED_REST:
        if data.rest is None or not len(data.rest):
            raise DataError("data.unlabeled: rest takes the training images that data.train_per_class leaves out, "
                            "and this recipe leaves none out: set data.train_per_class below the images per class, "
                            "or point data.unlabeled at a folder")
        rest = data.rest
        return Split(name="unlabeled", classes=rest.classes, labels=np.full(len(rest), UNLABELED, dtype=np.int64),
                     paths=list(rest.paths) if rest.paths else [], images=rest.images)
    root = resolve_root(source)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    known = {Path(p).resolve() for split in (data.train, data.val, data.test, data.calib) if split is not None
             for p in split.paths if p is not None}
    fresh = [p for p in files if p.resolve() not in known]
    if not fresh:
        raise DataError(f"data.unlabeled '{source}' holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) that is not "
                        f"already a labelled image of this run ({len(files)} found in all)")
    if len(fresh) < len(files):
        log.info("data.unlabeled: %d of %d images are labelled images of this run (train/val/test) and are left out",
                 len(files) - len(fresh), len(files))
    split = Split(name="unlabeled", classes=data.classes, labels=np.full(len(fresh), UNLABELED, dtype=np.int64),
                  paths=fresh)
    return verify_and_cache(split, cache, labelled=False, max_side=max_side)


def with_unlabeled(train: Split, unlabeled: Split) -> Split:
    """The training split followed by the unlabeled images (targets -1): one shuffled stream for distillation."""
    n, m = len(train), len(unlabeled)
    images = None
    if train.images is not None or unlabeled.images is not None:
        images = (list(train.images) if train.images is not None else [None] * n) + \
                 (list(unlabeled.images) if unlabeled.images is not None else [None] * m)
    paths = (list(train.paths) or [None] * n) + (list(unlabeled.paths) or [None] * m)
    return Split(name=f"{train.name}+unlabeled", classes=train.classes,
                 labels=np.concatenate([train.labels, unlabeled.labels]), paths=paths, images=images,
                 skipped=train.skipped + unlabeled.skipped, max_side=train.max_side or unlabeled.max_side)


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(train_idx), np.sort(val_idx)


def _array_split(name: str, images: np.ndarray, labels: np.ndarray, classes: list[str],
                 cap: Optional[int], seed: int) -> tuple[Split, Optional[Split]]:
    """(the split capped at ``cap`` images per class, the images the cap left out or None)."""
    rest = None
    if cap:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cap]
                                       for c in range(len(classes))]))
        dropped = np.setdiff1d(np.arange(len(labels)), keep)
        if len(dropped):
            rest = Split(name=f"{name}-rest", classes=classes, labels=labels[dropped].astype(np.int64),
                         images=list(images[dropped]))
        images, labels = images[keep], labels[keep]
    return Split(name=name, classes=classes, labels=labels.astype(np.int64), images=list(images)), rest


def load_digits_source(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0-16) as uint8 grayscale; fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = _stratified_split(labels, 0.2, seed=0)  # split fixed across training seeds
    classes = [str(c) for c in digits.target_names]
    train, rest = _array_split("train", images[train_idx], labels[train_idx], classes, cfg.train_per_class, 0)
    return DataBundle(
        train=train,
        val=_array_split("val", images[val_idx], labels[val_idx], classes, cfg.val_per_class, 0)[0],
        test=None,
        source="sklearn.datasets.load_digits",
        rest=rest,
    )


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), optionally gzip-compressed."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file '{path}': {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"IDX file '{path}' is truncated: header says {shape}, holds {data.size} values")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"IDX file '{stem}[.gz]' not found in '{root}' (Fashion-MNIST: apt-get install "
                    f"dataset-fashion-mnist; dpkg -L dataset-fashion-mnist shows the folder)")


def load_idx_source(cfg: DataConfig) -> DataBundle:
    if not cfg.root:
        raise DataError("data.root must name the folder holding the IDX files (train-images-idx3-ubyte.gz, ...)")
    root = Path(cfg.root)
    x_train = read_idx(_find_idx(root, "train-images-idx3-ubyte"))
    y_train = read_idx(_find_idx(root, "train-labels-idx1-ubyte")).astype(np.int64)
    x_test = read_idx(_find_idx(root, "t10k-images-idx3-ubyte"))
    y_test = read_idx(_find_idx(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
    n_classes = int(y_train.max()) + 1
    classes = FASHION_CLASSES if n_classes == 10 else [str(i) for i in range(n_classes)]
    train, rest = _array_split("train", x_train, y_train, classes, cfg.train_per_class, 0)
    return DataBundle(
        train=train,
        val=_array_split("val", x_test, y_test, classes, cfg.val_per_class, 0)[0],
        test=None,
        source=str(root),
        rest=rest,
    )


def folder_classes(cfg: DataConfig, seed: int) -> list[str]:
    """The class names of ``data.root``'s validation folder, from its sub-folders alone (nothing decoded)."""
    return scan_folder_split(resolve_root(cfg.root), cfg.val_dir, cfg.val_per_class, seed).classes


def real_evaluation_splits(cfg: DataConfig, seed: int) -> tuple[Optional[Split], Optional[Split]]:
    """``data.source: datafree``: the real validation (and test) images of ``data.root``, if it is set. Only
    ``val_dir`` and ``test_dir`` are scanned: no file of the training folder is ever read."""
    if not cfg.root:
        return None, None
    root = resolve_root(cfg.root)
    val = verify_and_cache(scan_folder_split(root, cfg.val_dir, cfg.val_per_class, seed), cfg.cache,
                           prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    test = None
    if cfg.test_dir:
        test = verify_and_cache(scan_folder_split(root, cfg.test_dir, cfg.val_per_class, seed), cfg.cache,
                                prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    return val, test


def load_datafree(cfg: DataConfig, seed: int, folder: Path, files: Sequence[str], labels: np.ndarray,
                  classes: list[str]) -> DataBundle:
    """``data.source: datafree``: the synthetic images (``files`` under ``folder``) for training, the real
    validation images of ``data.root`` for evaluation (else the synthetic images, which say nothing about real
    ones: warned)."""
    train = Split(name="synthetic", classes=classes, labels=np.asarray(labels, dtype=np.int64),
                  paths=[folder / f for f in files])
    train = verify_and_cache(train, cfg.cache, max_side=training_side(cfg), max_pixels=cfg.max_pixels)
    val, test = real_evaluation_splits(cfg, seed)
    if val is not None and val.classes != classes:
        raise DataError(f"data.source: datafree: the class folders of '{cfg.root}/{cfg.val_dir}' ({val.classes}) "
                        f"differ from the synthetic set's classes ({classes})")
    if val is None:
        log.warning("data.source: datafree without data.root: validating on the synthetic images, which says "
                    "nothing about real ones; give real validation images with data.root (a folder with %s/)",
                    cfg.val_dir)
        val = Split(name="synthetic", classes=classes, labels=train.labels, paths=list(train.paths),
                    images=None)
        val = verify_and_cache(val, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    return DataBundle(train, val, test, source=f"synthetic ({folder})")


def load_data(cfg: DataConfig, seed: int = 0, task: str = "classification") -> DataBundle:
    if task == "regression":
        bundle = load_regression_folder(cfg, seed)
        log.info("data %s (regression, targets %s): %d train / %d val images", bundle.source, bundle.classes,
                 len(bundle.train), len(bundle.val))
        return bundle
    if cfg.source == "datafree":
        raise DataError("data.source: datafree: the training images are synthesized by `edgedistill datafree "
                        "RECIPE` (the stages load them from the run folder)")
    loaders: dict[str, Callable[[], DataBundle]] = {
        "folder": lambda: load_folder(cfg, seed),
        "digits": lambda: load_digits_source(cfg),
        "idx": lambda: load_idx_source(cfg),
    }
    if cfg.calib_dir and cfg.source != "folder":
        raise DataError(f"data.calib_dir is a split folder of data.root, and data.source: {cfg.source} has none: use "
                        "data.calib_fraction (a held-out share of train) instead")
    bundle = loaders[cfg.source]()
    if cfg.calib_fraction and bundle.calib is None:
        bundle = hold_out_calibration(bundle, cfg.calib_fraction, seed)
    if len(bundle.classes) < 2:
        raise DataError(f"data {bundle.source}: one class ({bundle.classes[0]}): a classifier needs at least two")
    log.info("data %s: %d classes, %d train / %d val images%s%s", bundle.source, len(bundle.classes),
             len(bundle.train), len(bundle.val), f" / {len(bundle.test)} test" if bundle.test else "",
             f" / {len(bundle.calib)} calibration" if bundle.calib is not None else "")
    return bundle


def hold_out_calibration(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``data.calib_fraction``: a stratified share of the labelled training images (at least one per class, fixed
    by seed) held out for the operating point's threshold; no model trains on them."""
    keep, held = _stratified_split(bundle.train.labels, fraction, seed)
    if len(keep) == 0 or any(not np.any(bundle.train.labels[keep] == c) for c in range(len(bundle.classes))):
        raise DataError(f"data.calib_fraction {fraction}: holding out {len(held)} of {len(bundle.train)} training "
                        "images leaves a class without training images: add images or set data.calib_dir")
    calib = bundle.train.subset(held)
    calib.name = "calib"
    log.info("data.calib_fraction %.2f: %d training images held out (stratified, seed %d) to pick the operating "
             "point's threshold; %d remain for training", fraction, len(held), seed, len(keep))
    return DataBundle(bundle.train.subset(keep), bundle.val, bundle.test, bundle.source, rest=bundle.rest,
                      calib=calib, scaling=bundle.scaling)


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
