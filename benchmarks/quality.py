"""Distillation quality, 3 seeds: teacher, KD student, baseline (mean ± std), retention, KD gain.

    python benchmarks/quality.py /path/to/cifar10-jpeg.tar.gz [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/quality.py --recipe recipes/demo-digits.yaml --results-name demo \
        --target-retention 97 --target-gain 1          # the embedded demo: no data argument

Targets on the CPU-budget recipe (recipes/cifar10.yaml): retention >= 95% and KD gain > 0 on the mean
of 3 seeds, the student >= 10x fewer parameters than the teacher; the demo: retention >= 97% and a gain of
at least +1 point. The table (benchmarks/results/<name>.md) reports what was measured, met or not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, write_table  # noqa: E402

from edgedistill.cli import main as edgedistill_main  # noqa: E402
from edgedistill.judge.report import epoch_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def training_seconds(run: Path) -> float:
    """Seconds spent training (teacher, distill, baseline epochs, validation included), from metrics.jsonl,
    so a table re-rendered from finished (skipped) stages still reports the training cost."""
    return sum(
        r.get("seconds", 0.0)
        for stage in ("teacher", "student", "baseline")
        for r in epoch_records(run / stage / "metrics.jsonl")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "data",
        nargs="?",
        help="cifar10-jpeg.tar.gz or its extracted cifar10/ folder (recipes with "
        "their own data, like the demo's digits, take none)",
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results-name", default="quality", help="table file benchmarks/results/<name>.md")
    parser.add_argument("--target-retention", type=float, default=95.0, help="percent, on the mean of the seeds")
    parser.add_argument("--target-gain", type=float, default=0.0, help="points the mean KD gain must exceed")
    args = parser.parse_args()

    summaries = []
    for seed in args.seeds:
        data = ["--set", f"data.root={args.data}"] if args.data else []
        code = edgedistill_main(
            [
                "run",
                args.recipe,
                "--stages",
                "teacher,distill,baseline,evaluate",
                *data,
                "--set",
                f"seed={seed}",
                "--set",
                f"output={args.output}/seed{seed}",
                *sum((["--set", o] for o in args.overrides), []),
            ]
        )
        if code != 0:
            print(f"seed {seed}: the run failed (exit {code}); see {args.output}/seed{seed}/run.log")
            return code
        summary = json.loads(Path(f"{args.output}/seed{seed}/summary.json").read_text())
        summary["train_s"] = training_seconds(Path(f"{args.output}/seed{seed}"))
        summaries.append(summary)

    pct = lambda key, role=None: [100 * (s[role][key] if role else s[key]) for s in summaries]  # noqa: E731
    retention, gain = pct("retention"), pct("kd_gain")
    s0 = summaries[0]
    rows = [
        [
            f"{s0['teacher']['model']} → {s0['student']['model']}",
            mean_std(pct("top1", "teacher")),
            mean_std(pct("top1", "student")),
            mean_std(pct("top1", "baseline")),
            mean_std(retention),
            mean_std(gain),
            f"{s0['teacher']['params'] / 1e6:.2f}M / {s0['student']['params'] / 1e6:.2f}M "
            f"({s0['param_reduction']:.1f}x)",
            f"{statistics.mean(s['speedup'] for s in summaries):.2f}x",
            f"{statistics.mean(s['train_s'] for s in summaries):.0f}",
        ]
    ]
    checks = [
        (f"retention >= {args.target_retention:g}% (mean)", statistics.mean(retention) >= args.target_retention),
        (
            f"KD gain {'>= +' + format(args.target_gain, 'g') if args.target_gain else '> 0'} points (mean)",
            statistics.mean(gain) >= args.target_gain if args.target_gain else statistics.mean(gain) > 0,
        ),
        ("student >= 10x fewer parameters", s0["param_reduction"] >= 10),
    ]
    notes = [
        f"seeds {args.seeds}; evaluated on {s0['eval_split']} ({s0['eval_samples']} images); "
        "top-1 in %, mean ± std over seeds; speedup = host latency at batch 1, teacher / student "
        "(ONNX Runtime CPU from this revision on, PyTorch eager before)"
    ]
    notes += [f"target {name}: {'MET' if ok else 'NOT MET'}" for name, ok in checks]
    notes += [
        f"seed {seed}: teacher {s['teacher']['top1'] * 100:.2f}%, KD student {s['student']['top1'] * 100:.2f}%, "
        f"baseline {s['baseline']['top1'] * 100:.2f}% — {s['verdict']}"
        for seed, s in zip(args.seeds, summaries)
    ]
    if args.overrides:
        notes.append("recipe overrides: " + ", ".join(args.overrides))
    title = f"Distillation quality: {s0['name']} (benchmarks/quality.py)"
    write_table(
        args.results_name,
        title,
        [
            "teacher → student",
            "teacher top-1",
            "KD student top-1",
            "baseline top-1",
            "retention %",
            "KD gain (points)",
            "params",
            "speedup",
            "training s / seed",
        ],
        rows,
        notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
