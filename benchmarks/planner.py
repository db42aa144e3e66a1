"""The planner's own error: every published Jetson point predicted by factors fitted without it (leave-one-out).

    python benchmarks/planner.py

Targets: median absolute relative error <= 25% on the Jetson Nano points and <= 35% over all points. Not a
timed test: it computes, per board and per point, the published latency, the leave-one-out estimate and the
error, and writes benchmarks/results/planner.md. The points are those of edgedistill/planner_calibration.csv.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_table  # noqa: E402

from edgedistill.planner import factors_for, leave_one_out, load_calibration  # noqa: E402

TARGETS = {"jetson-nano-jp4": 0.25, "all": 0.35}


def main() -> int:
    points = load_calibration()
    loo = leave_one_out(points)
    rows = [[r["board"], r["model"], r["precision"], f"{r['published_ms']:.2f}", f"{r['estimated_ms']:.2f}",
             f"{r['relative_error'] * 100:+.0f}%"] for r in loo]
    notes, verdicts = [], []
    for board in sorted({r["board"] for r in loo}) + ["all"]:
        errors = [abs(r["relative_error"]) for r in loo if board == "all" or r["board"] == board]
        median = statistics.median(errors)
        line = f"{board}: {len(errors)} points, median |error| {median * 100:.1f}%, max {max(errors) * 100:.0f}%"
        if board in TARGETS:
            met = median <= TARGETS[board]
            verdicts.append(met)
            line += f" (target <= {TARGETS[board] * 100:.0f}%: {'met' if met else 'NOT MET'})"
        notes.append(line)
    for board in sorted({p.board for p in points}):
        f = factors_for(board, use_measured=False)
        notes.append(f"{board} factors on all its points: compute {f.compute:.2f} of peak, memory {f.memory:.2f} of "
                     f"bandwidth, {f.overhead_ms * 1000:.0f} us per kernel")
    notes.append("sources and conditions: edgedistill/planner_calibration.csv (torch2trt's published Jetson Nano and "
                 "AGX Xavier tables: FP16, batch 1, 224 px, 2019 TensorRT). All are dense CNNs: the error of "
                 "depthwise models (MobileNet, EfficientNet) is not measured by this table. vggN and vggN_bn are one "
                 "network once TensorRT folds BatchNorm, so leaving one out keeps its twin: their rows are optimistic.")
    write_table("planner", "Planner leave-one-out error on published Jetson measurements",
                ["board", "model", "precision", "published ms", "LOO estimate ms", "error"], rows, notes)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
