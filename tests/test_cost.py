"""Cost arithmetic, checked by hand, and the `edgedistill cost` command on a finished run."""

from __future__ import annotations

import json

import pytest
import yaml

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.judge.cost import cost_comparison, monthly_cost, run_costs
from edgedistill.recipe.outputs import CostConfig


def test_costs_by_hand():
    cfg = CostConfig(requests_per_month=1e9, price_per_hour=0.17, utilization=0.5, distillation_cost=2000)
    # teacher: 1e9 requests x 10 ms = 1e7 busy s; one instance gives 730 h x 3600 s x 0.5 = 1,314,000 s
    teacher = monthly_cost(0.010, cfg, cfg.price_per_hour)
    assert teacher["instances"] == 8  # ceil(1e7 / 1.314e6) = ceil(7.61)
    assert teacher["monthly_cost"] == pytest.approx(8 * 0.17 * 730)  # 992.80
    assert teacher["compute_hours"] == pytest.approx(1e7 / 3600, abs=0.01)
    c = cost_comparison(0.010, 0.001, cfg)  # student: 1e6 busy s -> 1 instance, 124.10
    assert c["student"]["instances"] == 1 and c["student"]["monthly_cost"] == pytest.approx(124.10)
    assert c["monthly_saving"] == pytest.approx(992.80 - 124.10)
    assert c["annual_saving"] == pytest.approx(12 * 868.70)
    assert c["payback_months"] == pytest.approx(2000 / 868.70, abs=0.01)  # 2.30 months
    # a student on a cheaper instance, and one that saves nothing
    cheap = cost_comparison(
        0.010,
        0.010,
        CostConfig(requests_per_month=1e9, price_per_hour=0.17, student_price_per_hour=0.05, distillation_cost=100),
    )
    assert cheap["student"]["monthly_cost"] == pytest.approx(8 * 0.05 * 730)
    none = cost_comparison(0.001, 0.001, cfg)
    assert none["monthly_saving"] == 0 and none["payback_months"] is None


def test_cost_command_uses_the_run_and_shows_the_recipes_defaults(trained_run, tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert (
        main(
            [
                "cost",
                str(trained_run),
                "--requests-per-month",
                "1e9",
                "--price-per-hour",
                "0.5",
                "--distillation-cost",
                "300",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    summary = json.loads((trained_run / "summary.json").read_text())
    data = json.loads(out.read_text())
    assert data["latency_ms"]["teacher"] == pytest.approx(summary["teacher"]["latency_ms_b1"])
    assert "ONNX Runtime" in data["latency_ms"]["runtime"]
    expected = cost_comparison(
        summary["teacher"]["latency_ms_b1"] / 1e3,
        summary["student"]["latency_ms_b1"] / 1e3,
        CostConfig(requests_per_month=1e9, price_per_hour=0.5, distillation_cost=300),
    )
    assert data["monthly_saving"] == expected["monthly_saving"] and "saving:" in text and "payback" in text
    with pytest.raises(EdgedistillError, match="--requests-per-month"):
        run_costs(trained_run, {})  # the test recipe has no evaluate.cost
    assert main(["cost", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_recipe_prices_are_the_defaults(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(
        json.dumps({"teacher": {"latency_ms_b1": 10.0}, "student": {"latency_ms_b1": 1.0}})
    )
    (run / "recipe.yaml").write_text(
        yaml.safe_dump({"evaluate": {"cost": {"requests_per_month": 1e9, "price_per_hour": 0.17}}})
    )
    c = run_costs(run, {"distillation_cost": 2000})
    assert c["payback_months"] == pytest.approx(2000 / 868.70, abs=0.01)
    assert c["inputs"]["recipe"]["price_per_hour"] == 0.17
    assert run_costs(run, {"price_per_hour": 0.34})["teacher"]["monthly_cost"] == pytest.approx(8 * 0.34 * 730)
