"""Regression targets over seeds: teacher, distilled student and baseline MAE / R² (mean ± std).

    python benchmarks/regression.py [--seeds 0 1 2] [--recipe recipes/regression-digits.yaml] [--set key=value ...]
                                    [--results-name regression]

Data: scikit-learn's digits with each image's ink area and mean intensity as the targets
(``edgedistill.data.demodata``; 1,200 training and 597 validation images), written once under OUTPUT/data.
Targets: student R² >= 0.95 x teacher R² and student MAE < baseline MAE, on the mean of the seeds. Each
finished seed is a row in OUTPUT/rows.jsonl; a rerun resumes from them. Writes benchmarks/results/regression.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, mean_std, resume, write_table  # noqa: E402

from edgedistill.cli import main as edgedistill_main  # noqa: E402
from edgedistill.data.demodata import write_digits_regression  # noqa: E402
from edgedistill.judge.evaluate import load_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "regression-digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/regression")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results-name", default="regression", help="table file benchmarks/results/<name>.md")
    args = parser.parse_args()
    out = Path(args.output)
    data = out / "data"
    if not (data / "val" / "targets.csv").exists():
        write_digits_regression(data)
    rows_path = out / "rows.jsonl"
    done, todo = resume(rows_path, "seed", args.seeds)
    for seed in todo:
        run = out / f"seed{seed}"
        code = edgedistill_main(
            [
                "run",
                args.recipe,
                "--stages",
                "teacher,distill,baseline,evaluate",
                "--set",
                f"data.root={data}",
                "--set",
                f"seed={seed}",
                "--set",
                f"output={run}",
                *sum((["--set", o] for o in args.overrides), []),
            ]
        )
        row = {"seed": seed, "status": "ok" if code == 0 else f"failed (exit {code})"}
        if code == 0:
            s = load_summary(run)
            row.update(
                {
                    role: {k: s[role][k] for k in ("model", "mae", "rmse", "r2")}
                    for role in ("teacher", "student", "baseline")
                }
            )
            row.update(
                {
                    "retention": s["retention"],
                    "kd_gain": s["kd_gain"],
                    "kd_gain_interval": s["intervals"]["kd_gain"],
                    "eval_samples": s["eval_samples"],
                }
            )
        done[seed] = row
        append_row(rows_path, row)
    ok = [done[s] for s in args.seeds if done[s]["status"] == "ok"]
    table = []
    for r in (done[s] for s in args.seeds):
        if r["status"] != "ok":
            table.append([str(r["seed"]), r["status"], "-", "-", "-", "-"])
            continue
        table.append(
            [str(r["seed"])]
            + [f"{r[role]['mae']:.4f} / {r[role]['r2']:.4f}" for role in ("teacher", "student", "baseline")]
            + [
                f"{100 * r['retention']:.1f}%",
                f"{r['kd_gain']:+.4f} [{r['kd_gain_interval'][0]:+.4f}, {r['kd_gain_interval'][1]:+.4f}]",
            ]
        )
    notes = []
    if ok:
        mean = {
            role: {k: statistics.mean(r[role][k] for r in ok) for k in ("mae", "r2")}
            for role in ("teacher", "student", "baseline")
        }
        table.append(
            ["mean ± std"]
            + [
                f"{mean_std([r[role]['mae'] for r in ok], '.4f')} / {mean_std([r[role]['r2'] for r in ok], '.4f')}"
                for role in ("teacher", "student", "baseline")
            ]
            + [f"{mean_std([100 * r['retention'] for r in ok], '.1f')}%", mean_std([r["kd_gain"] for r in ok], "+.4f")]
        )
        r2_met = mean["student"]["r2"] >= 0.95 * mean["teacher"]["r2"]
        mae_met = mean["student"]["mae"] < mean["baseline"]["mae"]
        notes.append(
            f"target student R² >= 0.95 x teacher R²: {mean['student']['r2']:.4f} vs "
            f"{0.95 * mean['teacher']['r2']:.4f}: {'met' if r2_met else 'NOT met'}"
        )
        notes.append(
            f"target student MAE < baseline MAE: {mean['student']['mae']:.4f} vs "
            f"{mean['baseline']['mae']:.4f}: {'met' if mae_met else 'NOT met'}"
        )
        notes.append(
            f"models {ok[0]['teacher']['model']} -> {ok[0]['student']['model']}; {ok[0]['eval_samples']} "
            "validation images; MAE and R² are means over the two targets (ink area and mean intensity, "
            "both on a 0-1 scale; per-target figures in each run's summary); KD gain = baseline MAE - "
            "student MAE with its 95% bootstrap interval"
        )
    if args.overrides:
        notes.append("recipe overrides: " + " ".join(f"--set {o}" for o in args.overrides))
    write_table(
        args.results_name,
        "Regression targets: digits' ink area and mean intensity (benchmarks/regression.py)",
        ["seed", "teacher MAE / R²", "student MAE / R²", "baseline MAE / R²", "retention (R²)", "KD gain (MAE)"],
        table,
        notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
