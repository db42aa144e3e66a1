"""Reading finished runs: ``report`` (report.html and report.md with plots), ``compare`` (runs side by side, mean ±
std) and ``cost`` (serving cost of teacher and student, payback)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgedistill.cli.console import setup_logging

COST_KEYS = ("requests_per_month", "price_per_hour", "student_price_per_hour", "utilization", "distillation_cost")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cost",
        help="serving cost of teacher and student from a finished run: instances, cost per "
        "month, saving, payback of the distillation work",
    )
    p.add_argument("run", help="run folder (runs/<name>) with summary.json")
    p.add_argument("--requests-per-month", type=float)
    p.add_argument("--price-per-hour", type=float, help="hourly price of an instance serving the teacher")
    p.add_argument("--student-price-per-hour", type=float, help="default: --price-per-hour")
    p.add_argument("--utilization", type=float, help="target busy fraction of each instance (recipe default 0.5)")
    p.add_argument("--distillation-cost", type=float, help="what the distillation work cost, for the payback time")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=cost)
    p = sub.add_parser("report", help="write RUN/report.html (one self-contained file) and RUN/report.md with plots")
    p.add_argument("run", help="evaluated run folder (runs/<name>)")
    p.add_argument(
        "--measured",
        nargs="+",
        default=[],
        metavar="JSON",
        help="`edgerun bench/validate/camera --json` files from the device, shown next to the estimates",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=report)
    p = sub.add_parser("compare", help="runs of one recipe side by side (e.g. seeds): retention, KD gain, mean ± std")
    p.add_argument("runs", nargs="+", help="evaluated run folders")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=compare)


def report(args: argparse.Namespace) -> int:
    from edgedistill.judge.report import write_report

    setup_logging(None, args.verbose)
    html_path, md_path = write_report(args.run, args.measured)
    print(f"report: {html_path} (self-contained) and {md_path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    from edgedistill.judge.compare import compare_text
    from edgedistill.judge.evaluate import load_summary

    setup_logging(None, args.verbose)
    print(compare_text([load_summary(run) for run in args.runs], args.runs))
    return 0


def cost(args: argparse.Namespace) -> int:
    from edgedistill.judge.cost import cost_text, run_costs

    setup_logging(None, args.verbose)
    result = run_costs(args.run, {k: getattr(args, k) for k in COST_KEYS})
    print(cost_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
