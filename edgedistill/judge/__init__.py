"""Judging a run: pure metrics, reports per model, comparisons, summary, report, plots, cost."""
