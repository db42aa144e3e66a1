"""The planner: counts checked against published MACs, the roofline's behaviour, refusals, physical bounds, borrowing,
held-out errors and intervals, INT8 where the board has no INT8 kernels, the user's own measurements, the verdict's
wording."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from edgedistill.cli.plan import plan_command
from edgedistill.errors import EdgedistillError
from edgedistill.plan.calibration import BOUNDS, CALIBRATION_FILE, factors_for, load_calibration
from edgedistill.plan.estimate import DEFAULT_CANDIDATES, PlanSpec, estimate, plan
from edgedistill.plan.heldout import leave_one_model_out
from edgedistill.plan.measured import read_bench, refit_from_measured
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


def test_calibration_table_names_its_source_and_conditions_for_every_row():
    points = load_calibration()
    assert len(points) >= 30
    for p in points:
        assert p.board in TARGETS and TARGETS[p.board].get("gpu")
        assert p.source and "github.com" in p.source and p.conditions
        assert p.precision in ("fp32", "fp16", "int8") and p.batch >= 1
        assert p.fps > 0 and p.latency_ms > 0  # as published (below ~2 ms torch2trt's FPS and latency disagree by 30%)
        assert p.timing in ("engine", "module") and p.classes in (3, 1000)
        assert (p.timing == "module") == ("torch2trt" in p.source)  # torch2trt times its Python module call
    netspresso = [p for p in points if "netspresso" in p.source.lower()]
    assert {p.board for p in netspresso} == {"jetson-nano-jp4", "xavier-nx-jp5", "jetson-tx2-jp4", "agx-orin-jp6"}
    assert all(p.classes == 3 and p.timing == "engine" for p in netspresso)
    with open(CALIBRATION_FILE) as fh:
        assert fh.readline().startswith("#")


def test_leave_one_model_out_predicts_each_model_without_it():
    tx2 = [p for p in load_calibration() if p.board == "jetson-tx2-jp4"]
    held = leave_one_model_out(tx2)
    assert len(held) == len(tx2) and all(math.isfinite(r["relative_error"]) for r in held)
    from edgedistill.plan.calibration import point_ms

    r = held[0]
    in_sample = point_ms(tx2[0], TARGETS["jetson-tx2-jp4"], factors_for("jetson-tx2-jp4"))
    assert r["estimated_ms"] != pytest.approx(in_sample, rel=1e-6)  # the held-out model was really left out
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


def test_a_bench_json_fed_back_moves_its_boards_estimate_toward_the_measurement(tmp_path, capsys):
    before = estimate("resnet18", PlanSpec("jetson-tx2-jp4"))
    measured = 2 * before.est_latency_ms
    refit = refit_from_measured("jetson-tx2-jp4", [_bench_json(tmp_path / "b.json", latency_ms=measured)])
    (row,) = refit["rows"]
    assert row["latency_ms"] == pytest.approx(measured)  # preprocessing (9 ms) is not model time
    assert row["before_ms"] < row["after_ms"] < measured  # toward the measurement, not onto it
    after = factors_for("jetson-tx2-jp4")
    assert "refit with 1 measurement(s) of yours" in after.source and after.user_rows == 1
    assert after.runtime_base_mb != 300.0  # the measured process memory
    moved = estimate("resnet18", PlanSpec("jetson-tx2-jp4"))
    assert before.est_latency_ms < moved.est_latency_ms < measured and "of yours" in moved.basis
    assert factors_for("jetson-nano-jp4").user_rows == 0  # another board is untouched
    refit_from_measured("jetson-tx2-jp4", [tmp_path / "b.json"])  # the same file again is not counted twice
    assert factors_for("jetson-tx2-jp4").user_rows == 1
    # a board without published rows: its borrowed factors are rescaled by the user's measurement
    borrowed = estimate("resnet18", PlanSpec("orin-nx-jp6"))
    refit_from_measured("orin-nx-jp6", [_bench_json(tmp_path / "o.json", latency_ms=3 * borrowed.est_latency_ms)])
    assert estimate("resnet18", PlanSpec("orin-nx-jp6")).est_latency_ms == pytest.approx(
        3 * borrowed.est_latency_ms, rel=1e-6
    )
    with pytest.raises(EdgedistillError, match="not a TensorRT run"):
        read_bench(_bench_json(tmp_path / "ort.json", precision=None))
    (tmp_path / "old.json").write_text(json.dumps({"result": {}, "verdict": {}}))
    with pytest.raises(EdgedistillError, match="missing"):
        read_bench(tmp_path / "old.json")


def test_factors_stay_within_their_physical_bounds_on_the_shipped_table():
    boards = sorted({p.board for p in load_calibration()})
    assert {"jetson-nano-jp4", "jetson-tx2-jp4", "xavier-nx-jp5", "agx-xavier-jp5", "agx-orin-jp6"} <= set(boards)
    for board in boards:
        f = factors_for(board, use_measured=False)
        assert f.source.startswith("published")
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(f, name)
            if value is not None and not (name == "python_ms" and value == 0):
                assert lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6), (board, name, value)
    # torch2trt's Python call is its own term on the boards timed that way, absent where rows are engine-only
    assert factors_for("agx-xavier-jp5").python_ms > 0.01 and factors_for("jetson-tx2-jp4").python_ms == 0


def test_a_board_without_rows_borrows_from_its_nearest_architecture_and_says_so():
    f = factors_for("jetson-orin-nano-jp6")
    assert "BORROWED from agx-orin-jp6" in f.source and "jetson-orin-nano-jp6 has none" in f.source
    assert "BORROWED from jetson-nano-jp4" in factors_for("jetson-nano-2gb-jp4").source
    e = estimate("resnet18", PlanSpec("jetson-orin-nano-jp6"))
    assert e.basis.startswith("borrowed") and e.est_latency_lo_ms < e.est_latency_ms < e.est_latency_hi_ms
    own = estimate("resnet18", PlanSpec("agx-orin-jp6"))
    assert own.basis.startswith("own")
    text = plan_text("jetson-orin-nano-jp6")
    assert "BORROWED" in text and "--calibrate" in text and "leave one board out" in text


def plan_text(target: str) -> str:
    from edgedistill.plan.estimate import format_plan

    return format_plan(plan(PlanSpec(target), ["resnet18", "mobilenetv3_small_100"]))


@pytest.mark.parametrize("board", ["jetson-nano-jp4", "jetson-tx2-jp4"])
def test_int8_is_never_estimated_faster_than_fp16_without_int8_kernels(board):
    for name in ("resnet18", "mobilenetv3_large_100", "efficientnet_lite0"):
        fp16 = estimate(name, PlanSpec(board, precision="fp16"))
        int8 = estimate(name, PlanSpec(board, precision="int8"))
        assert int8.est_latency_ms >= fp16.est_latency_ms and int8.est_fps_hi <= fp16.est_fps_hi
        assert "no INT8 kernels" in int8.note
    # with INT8 tensor cores it may be faster, and its interval reaches FP16's time at worst
    fp16, int8 = (estimate("resnet50", PlanSpec("agx-orin-jp6", precision=p)) for p in ("fp16", "int8"))
    assert int8.est_latency_ms < fp16.est_latency_ms <= int8.est_latency_hi_ms


def test_the_verdicts_wording_follows_the_intervals():
    from edgedistill.judge.summary import device_sentence
    from edgedistill.plan.estimate import speed_verdict

    def e(fps, lo, hi):
        return {"est_fps": fps, "est_fps_lo": lo, "est_fps_hi": hi}

    assert speed_verdict(e(100, 80, 120), e(50, 40, 60)) == "faster"
    assert speed_verdict(e(40, 30, 50), e(100, 80, 120)) == "slower"
    assert speed_verdict(e(70, 55, 85), e(60, 50, 75)) == "within error"

    def check(verdict, student, teacher):
        return {
            "device_check": {
                "device": "Jetson Nano",
                "verdict": verdict,
                "student_faster": verdict == "faster",
                "student_fps": student,
                "teacher_fps": teacher,
                "student_fps_range": [student * 0.8, student * 1.2],
                "teacher_fps_range": [teacher * 0.8, teacher * 1.2],
                "faster_candidates": [],
            }
        }

    assert device_sentence(check("faster", 100, 50)) == ""
    within = device_sentence(check("within error", 70, 60))
    assert "within the planner's error" in within and "NOT DEPLOYABLE" not in within and "faster" in within
    slower = device_sentence(check("slower", 30, 100))
    assert "NOT DEPLOYABLE AS A SPEED-UP" in slower and "beyond the planner's error" in slower


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
    assert (
        "ESTIMATE" in text and "leave one model out" in text and "recommended student" in text and "(teacher)" in text
    )
    assert "90% FPS" in text
    rows = json.loads(out_json.read_text())
    assert {r["model"] for r in rows} == {"resnet18", "squeezenet1_1", "mobilenetv3_large_100", "resnet50"}
    for r in rows:
        assert {"model", "params", "flops", "est_latency_ms", "est_fps", "est_memory_mb", "fits", "reason"} <= set(r)
        assert r["est_fps_lo"] <= r["est_fps"] <= r["est_fps_hi"]
    args.candidates = "resnet18,resnet1800"
    with pytest.raises(EdgedistillError, match="unknown model 'resnet1800'"):
        plan_command(args)
    assert set(DEFAULT_CANDIDATES) >= {"mobilenetv3_large_100", "efficientnet_b0", "squeezenet1_1"}
