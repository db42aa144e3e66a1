"""Where a run's images come from (``data.source``): folders of class sub-folders (``data.folders``), regression
folders with a targets.csv (``data.targets``), scikit-learn's digits, Fashion-MNIST IDX files, a synthetic
(data-free) set; ``load_data`` picks the source and holds out the calibration split.

Images are decoded with OpenCV into RGB uint8 arrays; ``loaders`` augments and batches them. Evaluation images
are held as ``edgerun.preprocess`` crops them (``eval_spec``), the very function the device runs, so host
accuracy and device accuracy are measured on the same pixels.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgedistill.data.folders import load_folder, real_evaluation_splits, verify_and_cache
from edgedistill.data.images import eval_spec, training_side
from edgedistill.data.splits import DataBundle, Split, _array_split, _stratified_split
from edgedistill.data.targets import load_regression_folder
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig

log = logging.getLogger(__name__)


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


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


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
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"IDX file '{path}' is truncated: header says {shape}, holds {data.size} values")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"IDX file '{stem}[.gz]' not found in '{root}' (Fashion-MNIST: apt-get install "
        f"dataset-fashion-mnist; dpkg -L dataset-fashion-mnist shows the folder)"
    )


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


def load_datafree(
    cfg: DataConfig, seed: int, folder: Path, files: Sequence[str], labels: np.ndarray, classes: list[str]
) -> DataBundle:
    """``data.source: datafree``: the synthetic images (``files`` under ``folder``) for training, the real
    validation images of ``data.root`` for evaluation (else the synthetic images, which say nothing about real
    ones: warned)."""
    train = Split(
        name="synthetic", classes=classes, labels=np.asarray(labels, dtype=np.int64), paths=[folder / f for f in files]
    )
    train = verify_and_cache(train, cfg.cache, max_side=training_side(cfg), max_pixels=cfg.max_pixels)
    val, test = real_evaluation_splits(cfg, seed)
    if val is not None and val.classes != classes:
        raise DataError(
            f"data.source: datafree: the class folders of '{cfg.root}/{cfg.val_dir}' ({val.classes}) "
            f"differ from the synthetic set's classes ({classes})"
        )
    if val is None:
        log.warning(
            "data.source: datafree without data.root: validating on the synthetic images, which says "
            "nothing about real ones; give real validation images with data.root (a folder with %s/)",
            cfg.val_dir,
        )
        val = Split(name="synthetic", classes=classes, labels=train.labels, paths=list(train.paths), images=None)
        val = verify_and_cache(val, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    return DataBundle(train, val, test, source=f"synthetic ({folder})")


def load_data(cfg: DataConfig, seed: int = 0, task: str = "classification") -> DataBundle:
    if task == "regression":
        bundle = load_regression_folder(cfg, seed)
        log.info(
            "data %s (regression, targets %s): %d train / %d val images",
            bundle.source,
            bundle.classes,
            len(bundle.train),
            len(bundle.val),
        )
        return bundle
    if cfg.source == "datafree":
        raise DataError(
            "data.source: datafree: the training images are synthesized by `edgedistill datafree "
            "RECIPE` (the stages load them from the run folder)"
        )
    loaders: dict[str, Callable[[], DataBundle]] = {
        "folder": lambda: load_folder(cfg, seed),
        "digits": lambda: load_digits_source(cfg),
        "idx": lambda: load_idx_source(cfg),
    }
    if cfg.calib_dir and cfg.source != "folder":
        raise DataError(
            f"data.calib_dir is a split folder of data.root, and data.source: {cfg.source} has none: use "
            "data.calib_fraction (a held-out share of train) instead"
        )
    bundle = loaders[cfg.source]()
    if cfg.calib_fraction and bundle.calib is None:
        bundle = hold_out_calibration(bundle, cfg, seed)
    if len(bundle.classes) < 2:
        raise DataError(f"data {bundle.source}: one class ({bundle.classes[0]}): a classifier needs at least two")
    log.info(
        "data %s: %d classes, %d train / %d val images%s%s",
        bundle.source,
        len(bundle.classes),
        len(bundle.train),
        len(bundle.val),
        f" / {len(bundle.test)} test" if bundle.test else "",
        f" / {len(bundle.calib)} calibration" if bundle.calib is not None else "",
    )
    return bundle


def hold_out_calibration(bundle: DataBundle, cfg: DataConfig, seed: int) -> DataBundle:
    """``data.calib_fraction``: a stratified share of the labelled training images (at least one per class, fixed
    by seed) held out for the operating point's threshold; no model trains on them. Held-out files are decoded again
    as an evaluation split (full frame, the device's resize and crop), never used in their training form (shorter
    side shrunk for augmentation), so a threshold is picked on the pixels the device will see."""
    fraction = cfg.calib_fraction
    keep, held = _stratified_split(bundle.train.labels, fraction, seed)
    if len(keep) == 0 or any(not np.any(bundle.train.labels[keep] == c) for c in range(len(bundle.classes))):
        raise DataError(
            f"data.calib_fraction {fraction}: holding out {len(held)} of {len(bundle.train)} training "
            "images leaves a class without training images: add images or set data.calib_dir"
        )
    calib = bundle.train.subset(held)
    calib.name = "calib"
    if calib.paths:
        fresh = Split(name="calib", classes=calib.classes, labels=calib.labels, paths=list(calib.paths))
        calib = verify_and_cache(fresh, cfg.cache, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels)
    log.info(
        "data.calib_fraction %.2f: %d training images held out (stratified, seed %d) to pick the operating "
        "point's threshold; %d remain for training",
        fraction,
        len(held),
        seed,
        len(keep),
    )
    return DataBundle(
        bundle.train.subset(keep),
        bundle.val,
        bundle.test,
        bundle.source,
        rest=bundle.rest,
        calib=calib,
        scaling=bundle.scaling,
    )
