"""Distillation methods compared on CIFAR-10: same teacher, same student, same baseline, 3 seeds.

    python benchmarks/methods.py /path/to/cifar10-jpeg.tar.gz [--seeds 0 1 2] [--jobs N] [--set key=value ...]

Rows: baseline (no KD), KD, DKD, KD + auto features, DKD + auto features, chain (one assistant), born-again
(one generation), KD + unlabeled (the CIFAR-10 training images beyond the recipe's 1,000 per class, labels
withheld). Per seed the teacher is trained once (``seed<N>/shared``) and the baseline once, and both are
copied into every method's run folder, where the stage fingerprints let them be reused as they are. Three
phases: teachers; then every training (baselines and methods, ``--jobs`` side by side, longest first); then
each method's evaluation. Each (seed, method) row is appended to ``<output>/rows.jsonl`` when it is evaluated
and is never run again, and a killed training resumes from its last epoch, so the table spans sessions.

Targets (mean of the seeds, the recipe's schedule): the best labelled-data method keeps >= 96% of the teacher
and beats the baseline by >= +5 points; KD + unlabeled keeps >= 100%. The table reports every row, won or lost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, load_rows, mean_std, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSISTANT = "{model: mobilenetv2_100, model_kwargs: {output_stride: 8}}"
# method -> recipe overrides on top of recipes/cifar10.yaml (DKD: the paper's CIFAR setting, T 4, CE and the
# DKD term weighted equally, beta 8)
METHODS = {
    "kd": [],
    "dkd": ["distill.method=dkd", "distill.temperature=4", "distill.alpha=0.5"],
    "kd+features": ["distill.features=auto"],
    "dkd+features": ["distill.method=dkd", "distill.temperature=4", "distill.alpha=0.5", "distill.features=auto"],
    "chain": [f"distill.chain=[{ASSISTANT}]"],
    "born-again": ["self_distill.generations=1"],
    "kd+unlabeled": ["data.unlabeled={unlabeled}"],
}
LABELLED = ["kd", "dkd", "kd+features", "dkd+features", "chain", "born-again"]
LONGEST_FIRST = ["kd+unlabeled", "chain", "born-again", "dkd+features", "kd+features", "dkd", "kd"]


def unlabeled_folder(data: str) -> str:
    """The archive's training folder: the run leaves out its own labelled images, the rest are unlabeled."""
    from edgedistill.data.folders import resolve_root

    return str(resolve_root(data) / "train")


def edgedistill(args, out: Path, seed: int, stages: str, overrides: list, threads: int) -> int:
    cmd = [
        sys.executable,
        "-m",
        "edgedistill",
        "run",
        args.recipe,
        "--stages",
        stages,
        "--set",
        f"data.root={args.data}",
        "--set",
        f"seed={seed}",
        "--set",
        f"output={out}",
        *sum((["--set", o] for o in overrides + list(args.overrides)), []),
    ]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "console.log", "a") as console:
        return subprocess.call(
            cmd,
            stdout=console,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1"),
        )


def method_overrides(args, method: str) -> list:
    return [o.replace("{unlabeled}", args.unlabeled) for o in METHODS[method]]


def copy_stage(src: Path, dst: Path) -> None:
    if (src / "done.json").exists() and not (dst / "done.json").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def train_job(args, seed: int, job: str, threads: int) -> int:
    """Phase 2: the seed's baseline (in shared/) or one method's distillation stages."""
    shared = Path(args.output) / f"seed{seed}" / "shared"
    if job == "baseline":
        return edgedistill(args, shared, seed, "baseline", [], threads)
    out = Path(args.output) / f"seed{seed}" / job
    copy_stage(shared / "teacher", out / "teacher")
    return edgedistill(args, out, seed, "teacher,assistant,distill,self-distill", method_overrides(args, job), threads)


def evaluate_job(args, seed: int, method: str, threads: int) -> dict:
    """Phase 3: evaluate one method against the seed's baseline; the row for rows.jsonl."""
    out = Path(args.output) / f"seed{seed}" / method
    copy_stage(Path(args.output) / f"seed{seed}" / "shared" / "baseline", out / "baseline")
    overrides = method_overrides(args, method)
    code = edgedistill(args, out, seed, "teacher,assistant,distill,self-distill,baseline,evaluate", overrides, threads)
    row = {"seed": seed, "method": method, "overrides": overrides}
    if code != 0 or not (out / "summary.json").exists():
        tail = (out / "console.log").read_text().strip().splitlines()[-1:] or ["no output"]
        return {**row, "status": f"failed (exit {code}): {tail[0][:160]}"}
    s = json.loads((out / "summary.json").read_text())
    trained = ["student"] + [f for f in os.listdir(out) if f.startswith(("assistant", "student-gen"))]
    train_s = sum(
        json.loads(line).get("seconds", 0.0)
        for f in trained
        if (out / f / "metrics.jsonl").exists()
        for line in (out / f / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in line
    )
    return {
        **row,
        "status": "ok",
        "teacher": s["teacher"]["top1"],
        "student": s["student"]["top1"],
        "baseline": s["baseline"]["top1"],
        "retention": s["retention"],
        "kd_gain": s["kd_gain"],
        "p_value": s["significance"]["p_value"],
        "train_s": round(train_s, 1),
        "eval_samples": s["eval_samples"],
        "verdict": s["verdict"],
        "unlabeled_images": s.get("unlabeled_images", 0),
        "device": s["host"]["device"],
    }


def render(args, rows: dict) -> None:
    seeds = args.seeds
    table, notes = [], []
    pct = lambda xs: mean_std([100 * x for x in xs])  # noqa: E731
    ok = {m: [rows[(s, m)] for s in seeds if (s, m) in rows] for m in METHODS}
    anchor = next((rs for rs in ok.values() if rs), [])
    if anchor:
        table.append(["teacher (resnet18)", pct([r["teacher"] for r in anchor]), "100", "–", "–", "–", "–"])
        table.append(
            [
                "baseline (no KD)",
                pct([r["baseline"] for r in anchor]),
                pct([r["baseline"] / r["teacher"] for r in anchor]),
                "0",
                "–",
                "–",
                "–",
            ]
        )
    for method in METHODS:
        got = ok[method]
        if not got:
            table.append([method, "not run", "", "", "", "", ""])
            continue
        helped = sum(r["p_value"] < 0.05 and r["kd_gain"] > 0 for r in got)
        table.append(
            [
                method,
                pct([r["student"] for r in got]),
                pct([r["retention"] for r in got]),
                mean_std([100 * r["kd_gain"] for r in got]),
                ", ".join(f"{r['p_value']:.2g}" for r in got),
                f"{helped}/{len(got)}",
                f"{statistics.mean(r['train_s'] for r in got):.0f}",
            ]
        )
    full = lambda m: len(ok[m]) == len(seeds)  # noqa: E731
    mean = lambda m, k: statistics.mean(r[k] for r in ok[m])  # noqa: E731
    done = [m for m in LABELLED if full(m)]
    if done:
        best = max(done, key=lambda m: mean(m, "student"))
        ret, gain = mean(best, "retention"), mean(best, "kd_gain")
        notes.append(
            f"best labelled-data method: {best} — retention {100 * ret:.2f}% (target >= 96%: "
            f"{'MET' if ret >= 0.96 else 'NOT MET'}), gain {100 * gain:+.2f} points (target >= +5: "
            f"{'MET' if gain >= 0.05 else 'NOT MET'})"
        )
    if full("kd+unlabeled"):
        ret = mean("kd+unlabeled", "retention")
        notes.append(
            f"KD + unlabeled: retention {100 * ret:.2f}% (target >= 100%: {'MET' if ret >= 1.0 else 'NOT MET'}); "
            f"{ok['kd+unlabeled'][0]['unlabeled_images']:,} unlabeled images"
        )
    if anchor:
        notes.append(
            f"seeds {seeds}; top-1 on {anchor[0]['eval_samples']} test images, mean ± std over seeds; gain = "
            f"student − the seed's baseline on the same images, McNemar p per seed; helped = seeds with "
            f"p < 0.05 and a positive gain; device {anchor[0]['device']}"
        )
    notes.append(
        f"training s = the row's distillation stages (assistant, student, generations), mean per seed, "
        f"{args.jobs} training(s) sharing the machine at a time (seconds include that contention)"
    )
    notes += [
        f"{m}: {' '.join(method_overrides(args, m)).replace(args.unlabeled, '<archive>/train') or 'the recipe'}"
        for m in METHODS
    ]
    notes += [
        f"seed {r['seed']} {r['method']}: {r['status']}"
        for r in load_rows(Path(args.output) / "rows.jsonl")
        if r["status"] != "ok" and (r["seed"], r["method"]) not in rows
    ]
    if args.overrides:
        notes.append("recipe overrides for every row: " + ", ".join(args.overrides))
    notes += args.notes
    write_table(
        args.results_name,
        "Distillation methods on CIFAR-10 (benchmarks/methods.py)",
        [
            "method",
            "student top-1 %",
            "retention %",
            "gain (points)",
            "McNemar p (per seed)",
            "helped",
            "training s / seed",
        ],
        table,
        notes,
    )


def _epochs(path: Path) -> list:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if '"kind": "epoch"' in line]
        if path.exists()
        else []
    )


def progress(args) -> None:
    """A table of what a cut-off run measured: every finished step's validation top-1 (done.json) and, for an
    unfinished one, its last epoch next to the KD student's and the baseline's at the same epoch."""
    out = Path(args.output)
    table, notes = [], []
    for seed in args.seeds:
        shared = out / f"seed{seed}" / "shared"
        kd_dirs = [out / f"seed{seed}" / m / "student" for m in ("kd", "born-again")]  # generation 0 is KD
        kd_curve = next((_epochs(d / "metrics.jsonl") for d in kd_dirs if (d / "done.json").exists()), [])
        base_curve = _epochs(shared / "baseline" / "metrics.jsonl")
        for metrics in sorted(out.glob(f"seed{seed}/*/*/metrics.jsonl")):
            step = metrics.parent
            if step.name == "teacher" and step.parent.name != "shared":
                continue  # copies of the shared teacher
            curve = _epochs(metrics)
            if not curve:
                continue
            record = json.loads((step / "done.json").read_text()) if (step / "done.json").exists() else None
            e = curve[-1]["epoch"]
            same = lambda c: f"{100 * c[e]['val_top1']:.2f}" if len(c) > e and step.name != "teacher" else "–"  # noqa
            model = record.get("model", "?") if record else args.student_name
            table.append(
                [
                    str(seed),
                    f"{step.parent.name}/{step.name}",
                    model,
                    f"{e + 1}" + ("" if record else " (unfinished)"),
                    f"{100 * (record['top1'] if record else curve[-1]['val_top1']):.2f}",
                    same(kd_curve),
                    same(base_curve),
                    f"{statistics.mean(c['seconds'] for c in curve):.1f}",
                ]
            )
    notes.append(
        "top-1 on the validation split (the recipe's val_dir) after the epochs shown; an unfinished step is "
        "mid-schedule (its learning rate not yet decayed), so compare it only with the KD student and the "
        "baseline at the same epoch, which the last two columns give"
    )
    notes += args.notes
    write_table(
        args.results_name,
        "Distillation methods on CIFAR-10, progress of a cut-off run (benchmarks/methods.py --progress)",
        [
            "seed",
            "step",
            "model",
            "epochs",
            "val top-1 %",
            "KD student at that epoch",
            "baseline at that epoch",
            "s / epoch",
        ],
        table,
        notes,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="cifar10-jpeg.tar.gz or its extracted cifar10/ folder")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="trainings side by side (default 1: a 2-core machine)")
    parser.add_argument("--output", default="runs/methods")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results-name", default="methods", help="table file benchmarks/results/<name>.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from rows.jsonl")
    parser.add_argument("--note", dest="notes", action="append", default=[], help="a line for the table's notes")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="table the finished steps and the last epoch of unfinished ones of a cut-off run (no training)",
    )
    args = parser.parse_args()
    if args.progress:
        import yaml

        args.student_name = yaml.safe_load(Path(args.recipe).read_text())["student"]["model"]
        progress(args)
        return 0
    args.unlabeled = unlabeled_folder(args.data)
    rows_path = Path(args.output) / "rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows = {(r["seed"], r["method"]): r for r in load_rows(rows_path) if r["status"] == "ok"}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def evaluate(seed_method):
        row = evaluate_job(args, *seed_method, threads)
        append_row(rows_path, row)
        print(
            f"seed {row['seed']} {row['method']}: {row['status']}"
            + (
                f" — student {100 * row['student']:.2f}%, gain {100 * row['kd_gain']:+.2f}"
                if row["status"] == "ok"
                else ""
            ),
            flush=True,
        )
        if row["status"] == "ok":
            rows[seed_method] = row

    if not args.render_only:
        pending = [(s, m) for m in LONGEST_FIRST if m in args.methods for s in args.seeds if (s, m) not in rows]
        seeds = sorted({s for s, _ in pending})
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            shared = lambda s: edgedistill(args, Path(args.output) / f"seed{s}" / "shared", s, "teacher", [], threads)  # noqa
            list(pool.map(shared, seeds))
            jobs = [(s, "baseline") for s in seeds] + pending
            for (seed, job), code in zip(jobs, pool.map(lambda sj: train_job(args, *sj, threads), jobs)):
                print(f"seed {seed} {job}: training exit {code}", flush=True)
            list(pool.map(evaluate, pending))
    render(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
