"""Real data that ships: scikit-learn's digits as a regression data set (each image's ink area and mean
intensity), written in the layout ``task: regression`` reads, for the tests, the benchmark and a first try.

    python -m edgedistill.data.demodata OUT_FOLDER       # then: edgedistill run RECIPE --set data.root=OUT_FOLDER
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

TARGETS = ("ink", "intensity")
SPLITS = (("train", 0, 1200), ("val", 1200, 1797))
SIDE = 24


def digit_targets(image: np.ndarray) -> tuple[float, float]:
    """The fraction of the image's pixels that carry ink (brighter than 96 of 255), and its mean brightness on a
    0-1 scale (both targets in the same range, so a mean MAE over them means something)."""
    return float((image > 96).mean()), float(image.mean() / 255)


def write_digits_regression(root: Path, splits=SPLITS) -> dict[str, np.ndarray]:
    """``root/<split>/imgs/*.png`` + ``root/<split>/targets.csv`` for each (split, first, stop) of the 1,797
    digits (upscaled to 24 px); returns each split's targets (N, 2)."""
    from sklearn.datasets import load_digits

    images = (load_digits().images * 255 / 16).astype(np.uint8)
    truth = {}
    for split, start, stop in splits:
        folder = Path(root) / split
        (folder / "imgs").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(start, stop):
            big = cv2.resize(images[i], (SIDE, SIDE), interpolation=cv2.INTER_LINEAR)
            name = f"imgs/{i}.png"
            cv2.imwrite(str(folder / name), big)
            rows.append([name, *(f"{v:.6f}" for v in digit_targets(big))])
        with open(folder / "targets.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["file", *TARGETS], *rows])
        truth[split] = np.array([[float(v) for v in r[1:]] for r in rows])
    return truth


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write_digits_regression(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}/train and {sys.argv[1]}/val (images + targets.csv: {', '.join(TARGETS)})")
