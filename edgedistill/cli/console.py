"""What the command line shows: logging to the console and the run's run.log, the summary table, the planner's
estimate before training."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)


def setup_logging(run_dir: Optional[Path], verbose: bool = False, quiet: bool = False) -> None:
    """Log to the console and, with ``run_dir``, to its run.log; ``quiet``: warnings only (torchrun's other
    ranks)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "run.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("timm", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(summary: dict) -> None:
    from edgedistill.judge.summary import summary_facts, summary_rows

    rows = summary_rows(summary, summary["latency_batch"])
    table = Table(title=f"{summary['name']}: evaluated on {summary['eval_split']} ({summary['eval_samples']} images)")
    for head in rows[0]:
        table.add_column(head, justify="right" if head != "model" else "left")
    for row in rows[1:]:
        table.add_row(*row)
    out = Console(width=None if sys.stdout.isatty() else 120)
    out.print(table)
    for fact in summary_facts(summary):
        out.print(fact, highlight=False, markup=False)  # facts hold recipe lines such as distill.chain=[...]
    style = "bold green" if not summary["kd_gain_flag"] else "bold yellow"
    out.print(Text(summary["verdict"], style=style))


def print_device_plan(ctx) -> None:
    """Before training: the planner's estimate of the recipe's teacher and student on the export target."""
    from edgedistill.plan.estimate import recipe_estimate

    datafree = ctx.recipe.data.source == "datafree"
    est = recipe_estimate(ctx.recipe, len(ctx.datafree_classes() if datafree else ctx.data.classes))
    if not est:
        return
    out = Console(stderr=True)
    out.print(
        f"[bold]plan[/bold] on {est['device']} ({est['target']}), FP16, {est['image_size']} px "
        "[yellow](ESTIMATES from edgedistill plan, not measurements)[/yellow]:",
        highlight=False,
    )
    for role in ("teacher", "student"):
        e = est[role]
        out.print(
            f"  {role:8} {e['model']:24} {e['est_fps']:8.1f} FPS ({e['est_fps_lo']:.0f}-{e['est_fps_hi']:.0f}, 90%)  "
            f"{e['est_latency_ms']:7.2f} ms  {e['est_memory_mb']:6.0f} MB",
            highlight=False,
        )
