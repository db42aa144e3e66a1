"""Data-free distillation on the CIFAR-10 recipe's teacher: the student learns from synthetic images only.

    python benchmarks/datafree.py ../shared/data/cifar10-jpeg.tar.gz --teacher-run runs/methods-cpu6/seed0/kd \
        [--sizes 10 30] [--steps 200] [--epochs 30] [--set datafree.bn_weight=0.01] [--results-name datafree]

``--teacher-run`` is a finished data-driven run of ``recipes/cifar10.yaml`` (teacher, KD student, baseline
evaluated on the 10,000 real test images); its teacher's weights are the only thing the data-free runs take
from it. For each size (synthetic images per class) one run synthesizes the set with DeepInversion (Yin et al.,
CVPR 2020; ``data.source: datafree``), distills the student on it and trains the baseline on it (cross-entropy
on the classes the images were synthesized for), then evaluates on the real test images. The table sets the
data-free student next to the data-driven student and baseline and chance (10%). Target: data-free >= chance +
20 points. Each finished size is a row in ``OUTPUT/rows.jsonl``; a rerun resumes from them (and a killed
synthesis resumes by batch). Writes benchmarks/results/datafree.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, resume, write_table  # noqa: E402

from edgedistill.cli import main as edgedistill_main  # noqa: E402
from edgedistill.judge.evaluate import load_summary  # noqa: E402
from edgedistill.judge.report import epoch_records  # noqa: E402
from edgedistill.recipe.loading import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="cifar10-jpeg.tar.gz or its extracted folder (only its test/ split is read)")
    parser.add_argument("--teacher-run", required=True, help="a finished run of recipes/cifar10.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30], help="synthetic images per class")
    parser.add_argument("--steps", type=int, default=200, help="DeepInversion steps per batch")
    parser.add_argument("--epochs", type=int, default=30, help="student and baseline epochs on the synthetic set")
    parser.add_argument("--output", default="runs/datafree")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="more recipe overrides, e.g. datafree.bn_weight=0.01",
    )
    parser.add_argument("--results-name", default="datafree", help="table file benchmarks/results/<name>.md")
    args = parser.parse_args()
    teacher_run = Path(args.teacher_run)
    driven = load_summary(teacher_run)
    base = load_recipe(teacher_run / "recipe.yaml")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done, todo = resume(rows_path, "size", args.sizes)
    for size in todo:
        run = out / f"per-class-{size}"
        overrides = [
            f"output={run}",
            f"name=datafree-{size}",
            "data.source=datafree",
            f"data.root={args.data}",
            "data.train_per_class=null",
            f"teacher.pretrained_path={teacher_run / 'teacher' / 'model.safetensors'}",
            "teacher.epochs=0",
            f"student.epochs={args.epochs}",
            f"datafree.images_per_class={size}",
            f"datafree.steps={args.steps}",
            "datafree.batch_size=100",
            "export.int8=false",
            *args.overrides,
        ]
        code = edgedistill_main(
            [
                "run",
                str(teacher_run / "recipe.yaml"),
                "--stages",
                "datafree,teacher,distill,baseline,evaluate",
                *sum((["--set", o] for o in overrides), []),
            ]
        )
        row = {"size": size, "status": "ok" if code == 0 else f"failed (exit {code})"}
        if code == 0:
            s = load_summary(run)
            synth = json.loads((run / "datafree" / "synthesis.json").read_text())
            row.update(
                {
                    "images": synth["images"],
                    "teacher": s["teacher"]["top1"],
                    "student": s["student"]["top1"],
                    "baseline": s["baseline"]["top1"],
                    "bn_loss": [synth["bn_loss_first"], synth["bn_loss_last"]],
                    "confidence": synth["teacher_confidence"],
                    "train_s": sum(
                        r.get("seconds", 0.0)
                        for st in ("student", "baseline")
                        for r in epoch_records(run / st / "metrics.jsonl")
                    ),
                }
            )
        done[size] = row
        append_row(rows_path, row)
    table = [
        [
            "data-driven (real training images)",
            f"{base.data.train_per_class or 'all'} real per class",
            f"{100 * driven['teacher']['top1']:.1f}",
            f"{100 * driven['student']['top1']:.1f}",
            f"{100 * driven['baseline']['top1']:.1f}",
            "-",
            "-",
        ]
    ]
    met = []
    for size in args.sizes:
        r = done[size]
        if r["status"] != "ok":
            table.append([f"data-free, {size} synthetic per class", "-", "-", r["status"], "-", "-", "-"])
            continue
        met.append(r["student"] >= CHANCE + 0.20)
        table.append(
            [
                f"data-free, {size} synthetic per class",
                f"{r['images']} synthetic",
                f"{100 * r['teacher']:.1f}",
                f"{100 * r['student']:.1f}",
                f"{100 * r['baseline']:.1f}",
                f"{r['bn_loss'][0]:.2f} -> {r['bn_loss'][1]:.2f}",
                f"{r['confidence']:.2f}",
            ]
        )
    table.append(["chance", "-", "-", f"{100 * CHANCE:.1f}", "-", "-", "-"])
    notes = [
        f"teacher {base.teacher.model} from {teacher_run} (its own run: {driven['eval_samples']} real test "
        f"images); student {base.student.model}; data-free runs: {args.steps} DeepInversion steps per batch of "
        f"100, student and baseline {args.epochs} epochs on the synthetic set; the data-driven student trained "
        f"{base.student.epochs} epochs on real images",
        "every accuracy is top-1 on the same real test images; the data-free baseline is the student trained "
        "with cross-entropy on the synthetic images' intended classes, without the teacher",
        f"target: data-free student >= chance + 20 points ({100 * (CHANCE + 0.2):.0f}%): "
        + ("met" if met and all(met) else "NOT met" if met else "not measured")
        + (f" ({sum(met)} of {len(met)} sizes)" if met else ""),
    ]
    if args.overrides:
        notes.append("recipe overrides: " + " ".join(f"--set {o}" for o in args.overrides))
    write_table(
        args.results_name,
        "Data-free distillation (DeepInversion) on the CIFAR-10 recipe's teacher (benchmarks/datafree.py)",
        [
            "student trained on",
            "images",
            "teacher top-1",
            "student top-1",
            "baseline top-1",
            "BN-statistics loss",
            "teacher confidence",
        ],
        table,
        notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
