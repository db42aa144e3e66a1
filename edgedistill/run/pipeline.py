"""The stages of a run: teacher -> (assistants) -> distill -> (self-distill) -> baseline -> evaluate (-> export).

A stage trains one or more *steps* (one model each: the teacher, each teacher assistant of the chain, the
student, each born-again generation, the baseline). Every step writes into its own folder of the run next
to the resolved recipe and finishes by writing ``done.json`` with the fingerprint of the recipe sections
it depends on. A step whose ``done.json`` matches the current recipe is skipped; one that was killed
resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from edgedistill.run.context import RunContext
from edgedistill.run.evaluation import stage_evaluate
from edgedistill.run.export import stage_export
from edgedistill.run.training import (
    stage_assistant,
    stage_baseline,
    stage_datafree,
    stage_distill,
    stage_self_distill,
    stage_teacher,
)
from edgedistill.train import distributed

log = logging.getLogger(__name__)


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], Any]] = {
    "datafree": stage_datafree,
    "teacher": stage_teacher,
    "assistant": stage_assistant,
    "distill": stage_distill,
    "self-distill": stage_self_distill,
    "baseline": stage_baseline,
    "evaluate": stage_evaluate,
    "export": stage_export,
}

PIPELINE = ["datafree", "teacher", "assistant", "distill", "self-distill", "baseline", "evaluate", "export"]

TRAINING_STAGES = ("teacher", "assistant", "distill", "self-distill", "baseline")  # skip per step, inside


def run_stage(ctx: RunContext, stage: str) -> Any:
    """Run one stage. Under torchrun every process trains; the stages after training run on rank 0 while the
    others wait."""
    if stage not in TRAINING_STAGES and not distributed.world().is_main:
        distributed.barrier()
        return None
    ok = False
    try:
        result = _run_stage(ctx, stage)
        ok = True
        return result
    finally:
        if stage not in TRAINING_STAGES:
            if stage != "datafree" or ctx.recipe.data.source == "datafree":
                ctx.tracker.end_stage(stage, ok, create=True)  # its nested run (training steps make their own)
            distributed.barrier()


def _run_stage(ctx: RunContext, stage: str) -> Any:
    if stage == "datafree" and ctx.recipe.data.source != "datafree":
        return None
    if stage not in TRAINING_STAGES and ctx.is_done(stage):
        log.info(
            "%s: outputs in '%s' match this recipe; skipped (delete %s to redo)",
            stage,
            ctx.stage_dir(stage),
            ctx.done_path(stage).name,
        )
        return None
    log.info("%s: starting", stage)
    return STAGE_FUNCTIONS[stage](ctx)
