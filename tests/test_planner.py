"""The planner: counts checked against published MACs, the roofline's behaviour, refusals, LOO, measured refits."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from edgedistill.cli.plan import plan_command
from edgedistill.errors import EdgedistillError
from edgedistill.plan.calibration import (
    CALIBRATION_FILE,
    factors_for,
    leave_one_out,
    load_calibration,
    read_bench,
    refit_from_measured,
)
from edgedistill.plan.estimate import DEFAULT_CANDIDATES, PlanSpec, estimate, plan
from edgedistill.plan.profile import profile_model
from edgerun.profiles import TARGETS


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))  # measured refits never leak between tests


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.82), ("mobilenetv3_large_100", 0.22)])
def test_multiply_accumulates_match_the_published_figures(name, gmacs):
    prof = profile_model(name, 224)
    # PyTorch's FlopCounterMode counts 2 FLOPs per multiply-accumulate; papers print MACs
    assert prof.macs / 1e9 == pytest.approx(gmacs, rel=0.10)
    assert prof.flops == 2 * prof.macs


def test_estimates_grow_with_flops_on_one_board():
    family = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    est = [estimate(m, PlanSpec("jetson-nano-jp4")) for m in family]
    assert [e.flops for e in est] == sorted(e.flops for e in est)
    assert all(a.est_latency_ms < b.est_latency_ms for a, b in zip(est, est[1:]))
    sizes = [estimate("mobilenetv3_large_100", PlanSpec("jetson-nano-jp4", image_size=s)) for s in (128, 160, 224, 288)]
    assert all(a.est_latency_ms < b.est_latency_ms for a, b in zip(sizes, sizes[1:]))
    # a faster board and a lower precision estimate less time for the same network
    assert (
        estimate("resnet50", PlanSpec("agx-xavier-jp5")).est_latency_ms
        < estimate("resnet50", PlanSpec("jetson-nano-jp4")).est_latency_ms
    )
    assert (
        estimate("resnet50", PlanSpec("jetson-nano-jp4", precision="fp16")).est_latency_ms
        < estimate("resnet50", PlanSpec("jetson-nano-jp4", precision="fp32")).est_latency_ms
    )


def test_over_budget_candidates_are_refused_with_the_reason():
    result = plan(
        PlanSpec("jetson-nano-jp4", fps_target=30, budget_mb=320),
        ["resnet152", "resnet18", "mobilenetv3_small_100"],
        teacher="resnet152",
    )
    rows = {e.model: e for e in result["rows"]}
    big = rows["resnet152"]
    assert not big.fits and "FPS" in big.reason and "< 30" in big.reason and "memory" in big.reason
    assert big.est_memory_mb > 320 and big.est_fps < 30
    assert rows["mobilenetv3_small_100"].fits
    # ranked by published top-1, and the recommendation is the most accurate one that keeps 20% headroom
    assert [e.model for e in result["rows"]][0] == "resnet152"
    assert result["recommended"] is None  # a 320 MB budget leaves no 20% headroom above the runtime's base
    roomy = plan(
        PlanSpec("jetson-nano-jp4", fps_target=30, budget_mb=500), ["resnet152", "resnet18", "mobilenetv3_small_100"]
    )
    assert roomy["recommended"] == "resnet18"  # more accurate than mobilenetv3_small_100, and fast enough
    assert result["teacher"].role == "teacher"
    with pytest.raises(EdgedistillError, match="no fast INT8"):
        estimate("resnet18", PlanSpec("jetson-nano-jp4", precision="int8"))


def test_calibration_table_names_its_source_and_conditions_for_every_row():
    points = load_calibration()
    assert len(points) >= 30
    for p in points:
        assert p.board in TARGETS and TARGETS[p.board].get("gpu")
        assert p.source and "github.com" in p.source and p.conditions
        assert p.precision in ("fp32", "fp16", "int8") and p.batch >= 1
        assert p.fps > 0 and p.latency_ms > 0  # as published (below ~2 ms torch2trt's FPS and latency disagree by 30%)
    with open(CALIBRATION_FILE) as fh:
        assert fh.readline().startswith("#")


def test_leave_one_out_predicts_each_published_point_without_it():
    nano = [p for p in load_calibration() if p.board == "jetson-nano-jp4"]
    loo = leave_one_out(nano)
    assert len(loo) == len(nano) and all(math.isfinite(r["relative_error"]) for r in loo)
    full = factors_for("jetson-nano-jp4")
    target = TARGETS["jetson-nano-jp4"]
    from edgedistill.plan.roofline import layer_times_ms

    r = loo[0]
    in_sample = layer_times_ms(
        profile_model(nano[0].model, 224, "torchvision"), dict(target, name="x"), "fp16", 1, full
    )
    assert r["estimated_ms"] != pytest.approx(in_sample, rel=1e-6)  # the held-out point was really left out
    assert r["relative_error"] == pytest.approx((r["estimated_ms"] - r["published_ms"]) / r["published_ms"])


def _bench_json(path, model="resnet18", latency_ms=20.0, total_mb=700.0, precision="fp16"):
    data = {
        "result": {
            "batch": 1,
            "stages_ms": {"h2d": 0.5, "compute": latency_ms - 1.0, "d2h": 0.5, "preprocess": 9.0, "postprocess": 0.1},
            "memory": {"total_mb": total_mb},
        },
        "board": "NVIDIA Jetson Nano Developer Kit",
        "bundle": {"name": "student", "model": model, "input_shape": [1, 3, 224, 224]},
        "engine": {"precision": precision} if precision else None,
    }
    path.write_text(json.dumps(data))
    return path


def test_measured_bench_files_rescale_the_board_in_the_users_cache(tmp_path, capsys):
    before = estimate("resnet18", PlanSpec("jetson-tx2-jp4"))
    measured = 2 * before.est_latency_ms
    refit = refit_from_measured("jetson-tx2-jp4", [_bench_json(tmp_path / "b.json", latency_ms=measured)])
    assert refit["scale"] == pytest.approx(2.0, rel=1e-6)  # preprocessing (9 ms) is not model time
    assert refit["rows"][0]["latency_ms"] == pytest.approx(measured)
    after = factors_for("jetson-tx2-jp4")
    assert "rescaled by 1 measurement" in after.source and after.runtime_base_mb != 300.0
    assert estimate("resnet18", PlanSpec("jetson-tx2-jp4")).est_latency_ms == pytest.approx(measured, rel=1e-6)
    assert factors_for("jetson-nano-jp4").scale == 1.0  # another board is untouched
    with pytest.raises(EdgedistillError, match="not a TensorRT run"):
        read_bench(_bench_json(tmp_path / "ort.json", precision=None))
    (tmp_path / "old.json").write_text(json.dumps({"result": {}, "verdict": {}}))
    with pytest.raises(EdgedistillError, match="missing"):
        read_bench(tmp_path / "old.json")


def test_plan_command_prints_estimates_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    args = SimpleNamespace(
        target="jetson-nano-jp4",
        fps_target=30.0,
        budget_mb=500.0,
        image_size=224,
        batch=1,
        precision="fp16",
        candidates="resnet18,squeezenet1_1,mobilenetv3_large_100",
        teacher="resnet50",
        json=str(out_json),
        measured=[],
    )
    assert plan_command(args) == 0
    text = capsys.readouterr().out
    assert "ESTIMATE" in text and "leave-one-out" in text and "recommended student" in text and "(teacher)" in text
    rows = json.loads(out_json.read_text())
    assert {r["model"] for r in rows} == {"resnet18", "squeezenet1_1", "mobilenetv3_large_100", "resnet50"}
    for r in rows:
        assert {"model", "params", "flops", "est_latency_ms", "est_fps", "est_memory_mb", "fits", "reason"} <= set(r)
    args.candidates = "resnet18,resnet1800"
    with pytest.raises(EdgedistillError, match="unknown model 'resnet1800'"):
        plan_command(args)
    assert set(DEFAULT_CANDIDATES) >= {"mobilenetv3_large_100", "efficientnet_b0", "squeezenet1_1"}
