"""Serving cost: instances needed at a target utilization, cost per month for teacher and student, the saving
and the payback time of the distillation work ("it pays for itself in two months"). Pure arithmetic; prices are
the user's inputs (recipe ``evaluate.cost`` or ``edgedistill cost`` flags)."""

from __future__ import annotations

import math
from typing import Any, Optional

from edgedistill.recipe.outputs import CostConfig

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


def monthly_cost(latency_s: float, cost: CostConfig, price_per_hour: float) -> dict[str, float]:
    """Instances to serve ``requests_per_month`` at batch-1 latency and the target utilization, and their price.

    Busy seconds per month = requests * latency; one instance gives 730 h * 3600 s * utilization of them.
    """
    busy_seconds = cost.requests_per_month * latency_s
    capacity = HOURS_PER_MONTH * 3600.0 * cost.utilization
    instances = max(1, math.ceil(busy_seconds / capacity))
    return {
        "instances": instances,
        "price_per_hour": price_per_hour,
        "monthly_cost": round(instances * price_per_hour * HOURS_PER_MONTH, 2),
        "compute_hours": round(busy_seconds / 3600.0, 2),
    }


def cost_comparison(
    teacher_latency: float, student_latency: float, cost: Optional[CostConfig]
) -> Optional[dict[str, Any]]:
    if cost is None:
        return None
    teacher = monthly_cost(teacher_latency, cost, cost.price_per_hour)
    student = monthly_cost(student_latency, cost, cost.student_price_per_hour or cost.price_per_hour)
    saving = round(teacher["monthly_cost"] - student["monthly_cost"], 2)
    payback = None
    if cost.distillation_cost is not None and saving > 0:
        payback = round(cost.distillation_cost / saving, 2)
    return {
        "teacher": teacher,
        "student": student,
        "monthly_saving": saving,
        "annual_saving": round(12 * saving, 2),
        "distillation_cost": cost.distillation_cost,
        "payback_months": payback,
        "requests_per_month": cost.requests_per_month,
        "utilization": cost.utilization,
        "latency_source": "host batch-1 median latency (ONNX Runtime CPU) of the run's summary",
    }


def run_costs(run_dir, overrides: dict[str, Any]) -> dict[str, Any]:
    """Costs of a finished run: its summary's host latencies, the recipe's prices with ``overrides`` on top."""
    from pathlib import Path

    from pydantic import ValidationError

    from edgedistill.errors import EdgedistillError
    from edgedistill.judge.evaluate import load_summary
    from edgedistill.recipe.loading import safe_yaml

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    recipe_cost: dict[str, Any] = {}
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.exists():
        recipe_cost = ((safe_yaml(recipe_path.read_text()) or {}).get("evaluate") or {}).get("cost") or {}
    values = {**recipe_cost, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        cfg = CostConfig(**values)
    except ValidationError as exc:
        missing = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing"]
        hint = f"; give --{missing[0].replace('_', '-')} (the recipe's evaluate.cost has none)" if missing else ""
        raise EdgedistillError(f"cost inputs: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc'][0]}){hint}") from exc
    teacher_s = summary["teacher"]["latency_ms_b1"] / 1e3
    student_s = summary["student"]["latency_ms_b1"] / 1e3
    result = cost_comparison(teacher_s, student_s, cfg)
    result["inputs"] = {"recipe": recipe_cost, "used": cfg.model_dump()}
    result["latency_ms"] = {
        "teacher": teacher_s * 1e3,
        "student": student_s * 1e3,
        "runtime": (summary.get("host") or {}).get("runtime", "PyTorch eager"),
    }
    return result


def cost_text(c: dict[str, Any]) -> str:
    used, recipe = c["inputs"]["used"], c["inputs"]["recipe"]

    def shown(key: str) -> str:
        value = used.get(key)
        note = "" if key not in recipe else (" (recipe)" if recipe[key] == value else f" (recipe: {recipe[key]})")
        return f"{value}{note}"

    lines = [
        f"inputs: {c['requests_per_month']:,.0f} requests/month, utilization {shown('utilization')}, "
        f"teacher instance {shown('price_per_hour')}/h, student instance "
        f"{shown('student_price_per_hour') if used.get('student_price_per_hour') else 'same price'}/h, "
        f"batch-1 latency teacher {c['latency_ms']['teacher']:.2f} ms, student {c['latency_ms']['student']:.2f} "
        f"ms ({c['latency_ms']['runtime']})",
        "",
        f"{'':10} {'instances':>9} {'busy h/month':>12} {'cost/month':>12}",
    ]
    for role in ("teacher", "student"):
        r = c[role]
        lines.append(f"{role:10} {r['instances']:9d} {r['compute_hours']:12,.0f} {r['monthly_cost']:12,.2f}")
    lines.append("")
    lines.append(f"saving: {c['monthly_saving']:,.2f} a month, {c['annual_saving']:,.2f} a year")
    if c["distillation_cost"] is None:
        lines.append("payback: give --distillation-cost (what the distillation work cost) to see it")
    elif c["payback_months"] is None:
        lines.append(f"payback: never; the student saves nothing against {c['distillation_cost']:,.2f} spent")
    else:
        lines.append(
            f"payback: the distillation work ({c['distillation_cost']:,.2f}) pays for itself in "
            f"{c['payback_months']:.1f} month(s)"
        )
    return "\n".join(lines)
