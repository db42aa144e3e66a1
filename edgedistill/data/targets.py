"""Regression targets: a ``targets.csv`` per split folder (``file,NAME[,NAME2...]``), every bad row named before
anything trains, targets standardized with the training split's statistics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.data.folders import resolve_root, verify_and_cache
from edgedistill.data.images import eval_spec, training_side
from edgedistill.data.splits import DataBundle, Split
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig

log = logging.getLogger(__name__)


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
        raise DataError(
            f"task: regression: '{path}' is missing: each split folder holds its images and a "
            f"{TARGETS_FILE} with a header row 'file,<target name>[,<target 2>...]' and one row per image"
        )
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "file":
        raise DataError(
            f"'{path}': the first row must be the header 'file,<target name>[,...]' (found "
            f"{rows[0] if rows else 'an empty file'})"
        )
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
        raise DataError(
            f"'{path}': {len(bad)} bad row(s), fix them before training:\n  "
            + "\n  ".join(bad[:20])
            + ("\n  ..." if len(bad) > 20 else "")
        )
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
            raise DataError(
                f"'{split_dir}' is missing: a regression data folder holds {cfg.train_dir}/ and "
                f"{cfg.val_dir}/, each with its images and a {TARGETS_FILE}"
            )
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
            splits[name] = verify_and_cache(
                split, cfg.cache, labelled=False, max_side=training_side(cfg), max_pixels=cfg.max_pixels
            )
        else:
            splits[name] = verify_and_cache(
                split, cfg.cache, labelled=False, prepared=eval_spec(cfg), max_pixels=cfg.max_pixels
            )
    return DataBundle(splits["train"], splits["val"], splits.get("test"), source=str(root), scaling=scaling)
