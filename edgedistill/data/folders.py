"""Image folders: ``data.root`` (a folder, or an archive unpacked safely once into the cache) with one sub-folder per
class in each split; every file checked and decoded once (through the on-disk cache), unreadable ones skipped and
listed; the unlabeled images of ``data.unlabeled``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from edgedistill.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    cache_root,
    eval_spec,
    fit_shorter_side,
    image_problem,
    read_image,
    training_side,
)
from edgedistill.data.splits import UNLABELED, DataBundle, Split
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig
from edgerun.bundle.archive import safe_extract
from edgerun.bundle.manifest import sha256_file
from edgerun.preprocess import PreprocessSpec, geometric

log = logging.getLogger(__name__)


UNLABELED_REST = "rest"  # data.unlabeled: the source's training images beyond train_per_class, labels withheld

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# Folders of at most this many decoded pixels (all images together) are held in memory by default.
CACHE_PIXELS = 600_000_000


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
        raise DataError(
            f"'{split_dir}' is missing (found: {present or 'no folders'}); a data folder holds "
            f"train/ and val/ with one sub-folder per class (set data.val_dir if yours is named otherwise)"
        )
    folders = _class_folders(split_dir)
    if not folders:
        raise DataError(f"'{split_dir}' has no class sub-folders: put each class's images in {split_dir}/<class>/")
    paths, labels = [], []
    rng = np.random.default_rng(seed)
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(
                f"class folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                f"add images or remove the folder"
            )
        if cap_per_class and len(files) > cap_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), cap_per_class, replace=False))]
        paths.extend(files)
        labels.extend([label] * len(files))
    return Split(name=split, classes=[p.name for p in folders], labels=np.asarray(labels, dtype=np.int64), paths=paths)


def verify_and_cache(
    split: Split,
    cache: Optional[bool],
    labelled: bool = True,
    max_side: Optional[int] = None,
    prepared: Optional[PreprocessSpec] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Split:
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


def _from_disk_cache(
    split: Split,
    labelled: bool,
    max_side: Optional[int],
    prepared: Optional[PreprocessSpec],
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Split:
    """Images from the on-disk decoded cache (``imagecache``), decoding only on a miss."""
    from edgedistill.data import imagecache

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
        log.info(
            "split %s: decoding %d images once (%s) into %s", split.name, len(split), variant, imagecache.cache_dir()
        )

        def decode(i: int) -> Optional[np.ndarray]:
            image = read_image(split.paths[i], max_pixels=max_pixels)
            return None if image is None else form(image)

        entry = imagecache.build(key, len(split), decode)
    keep, images = entry
    kept = set(keep)
    skipped = [str(p) for i, p in enumerate(split.paths) if i not in kept]
    return _finish(split, keep, images, skipped, labelled, max_side, prepared, max_pixels)


def _finish(
    split: Split,
    keep: list[int],
    images: Optional[list[np.ndarray]],
    skipped: list[str],
    labelled: bool,
    max_side: Optional[int],
    prepared: Optional[PreprocessSpec] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Split:
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
        log.warning(
            "split %s: skipped %d unreadable image(s): %s%s",
            split.name,
            len(skipped),
            ", ".join(reasons),
            " ..." if len(skipped) > 5 else "",
        )
    return out


def check_apart(split: Split, others: dict, key: str) -> None:
    """``split``'s images share no file content (sha256) with the other splits: a threshold picked on images a model
    trained on, or that are reported, promises nothing about new ones. A DataError names the first shared files."""
    import hashlib

    def digests(paths) -> dict[str, Path]:
        out = {}
        for path in paths:
            with open(path, "rb") as fh:
                out[hashlib.sha256(fh.read()).hexdigest()] = path
        return out

    mine = digests(split.paths)
    for name, other in others.items():
        if other is None or name is None:
            continue
        shared = [(mine[d], p) for d, p in digests(other.paths).items() if d in mine]
        if shared:
            shown = ", ".join(f"{a} = {b}" for a, b in shared[:5])
            raise DataError(
                f"{key}: {len(shared)} image(s) of '{split.paths[0].parent.parent}' are also in '{name}/' (same "
                f"bytes: {shown}{' ...' if len(shared) > 5 else ''}): thresholds must be picked on images no model "
                "trained on and no figure reports; remove them from one of the folders"
            )


def load_folder(cfg: DataConfig, seed: int) -> DataBundle:
    if not cfg.root:
        raise DataError("data.root is not set: give the image folder with --set data.root=/path/to/data")
    root = resolve_root(cfg.root)
    train = scan_folder_split(root, cfg.train_dir, cfg.train_per_class, seed)
    val = scan_folder_split(root, cfg.val_dir, cfg.val_per_class, seed)
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"class folders of '{root / cfg.val_dir}' differ from '{root / cfg.train_dir}': "
            f"only in train: {only_train or '-'}, only in val: {only_val or '-'}; "
            f"both splits need the same class sub-folders"
        )
    test = calib = None
    if cfg.test_dir:
        test = scan_folder_split(root, cfg.test_dir, cfg.val_per_class, seed)
        if test.classes != train.classes:
            raise DataError(f"class folders of '{root / cfg.test_dir}' differ from '{root / cfg.train_dir}'")
    if cfg.calib_dir:
        calib = scan_folder_split(root, cfg.calib_dir, None, seed)
        if calib.classes != train.classes:
            raise DataError(
                f"class folders of '{root / cfg.calib_dir}' (data.calib_dir) differ from "
                f"'{root / cfg.train_dir}': the threshold is picked per class, so both need the same "
                "class sub-folders"
            )
        check_apart(calib, {cfg.train_dir: train, cfg.val_dir: val, cfg.test_dir: test}, "data.calib_dir")
    rest = None
    if cfg.train_per_class and cfg.unlabeled == UNLABELED_REST:
        kept = set(train.paths)
        everything = scan_folder_split(root, cfg.train_dir, None, seed)
        left = [i for i, p in enumerate(everything.paths) if p not in kept]
        rest = (
            verify_and_cache(
                everything.subset(left),
                cfg.cache,
                labelled=False,
                max_side=training_side(cfg),
                max_pixels=cfg.max_pixels,
            )
            if left
            else None
        )
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
            raise DataError(
                "data.unlabeled: rest takes the training images that data.train_per_class leaves out, "
                "and this recipe leaves none out: set data.train_per_class below the images per class, "
                "or point data.unlabeled at a folder"
            )
        rest = data.rest
        return Split(
            name="unlabeled",
            classes=rest.classes,
            labels=np.full(len(rest), UNLABELED, dtype=np.int64),
            paths=list(rest.paths) if rest.paths else [],
            images=rest.images,
        )
    root = resolve_root(source)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    known = {
        Path(p).resolve()
        for split in (data.train, data.val, data.test, data.calib)
        if split is not None
        for p in split.paths
        if p is not None
    }
    fresh = [p for p in files if p.resolve() not in known]
    if not fresh:
        raise DataError(
            f"data.unlabeled '{source}' holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) that is not "
            f"already a labelled image of this run ({len(files)} found in all)"
        )
    if len(fresh) < len(files):
        log.info(
            "data.unlabeled: %d of %d images are labelled images of this run (train/val/test) and are left out",
            len(files) - len(fresh),
            len(files),
        )
    split = Split(
        name="unlabeled", classes=data.classes, labels=np.full(len(fresh), UNLABELED, dtype=np.int64), paths=fresh
    )
    return verify_and_cache(split, cache, labelled=False, max_side=max_side)


def folder_classes(cfg: DataConfig, seed: int) -> list[str]:
    """The class names of ``data.root``'s validation folder, from its sub-folders alone (nothing decoded)."""
    return scan_folder_split(resolve_root(cfg.root), cfg.val_dir, cfg.val_per_class, seed).classes


def real_evaluation_splits(cfg: DataConfig, seed: int) -> tuple[Optional[Split], Optional[Split]]:
    """``data.source: datafree``: the real validation (and test) images of ``data.root``, if it is set. Only
    ``val_dir`` and ``test_dir`` are scanned: no file of the training folder is ever read."""
    if not cfg.root:
        return None, None
    root = resolve_root(cfg.root)
    val = verify_and_cache(
        scan_folder_split(root, cfg.val_dir, cfg.val_per_class, seed),
        cfg.cache,
        prepared=eval_spec(cfg),
        max_pixels=cfg.max_pixels,
    )
    test = None
    if cfg.test_dir:
        test = verify_and_cache(
            scan_folder_split(root, cfg.test_dir, cfg.val_per_class, seed),
            cfg.cache,
            prepared=eval_spec(cfg),
            max_pixels=cfg.max_pixels,
        )
    return val, test
