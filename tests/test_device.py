"""The device runtime through OrtRunner on real bundles: bench verdicts, validate, camera loop, device readers."""

import json
import os
import shutil
import stat

import cv2
import numpy as np
import pytest

from edgerun.bench import BenchJob, percentile, run_bench, summarize, verdict
from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.device import TegraStats, parse_tegrastats
from edgerun.errors import RunnerError, SourceError
from edgerun.line.camera import CameraJob, run_camera
from edgerun.line.capture import describe_source
from edgerun.preprocess import to_three_channels
from edgerun.runtime.runners import OrtRunner


def test_percentiles_and_summary():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile(values, 50) == pytest.approx(0.0505)
    s = summarize(values[::-1], batch=2)
    lat = s["latency_ms"]
    assert lat["min"] == pytest.approx(1) and lat["max"] == pytest.approx(100)
    assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert s["throughput_fps"] == pytest.approx(2 / 0.0505)  # batch / trimmed mean (5% off each end)


def test_runner_interface_errors(trained_run):
    runner = OrtRunner(open_bundle(trained_run / "bundle").model_path)
    with pytest.raises(RunnerError, match="before activate"):
        runner.infer({"input": np.zeros((1, 3, 16, 16), np.float32)})
    with runner:
        with pytest.raises(RunnerError, match=r"feed has inputs \['x'\]"):
            runner.infer({"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert not runner.is_active


def test_bench_and_verdicts(trained_run):
    bundle = open_bundle(trained_run / "bundle")
    with OrtRunner(bundle.model_path) as runner:
        result = run_bench(BenchJob(runner=runner, manifest=bundle.manifest, warmup=3, iterations=30))
    assert result["iterations"] == 30 and result["throughput_fps"] > 0
    assert set(result["stages_ms"]) == {"preprocess", "h2d", "compute", "d2h", "postprocess"}
    assert result["stages_ms"]["compute"] > 0 and result["memory"]["process_peak_mb"] > 0
    fps = result["throughput_fps"]
    ok = verdict(result, fps_target=fps / 10, budget_mb=1e6, device_memory_mb=1e7)
    assert ok["overall"] == "PASS" and [r["status"] for r in ok["checks"]] == ["PASS"] * 4
    slow = verdict(result, fps_target=fps * 100, budget_mb=1e6)
    assert slow["overall"] == "FAIL" and slow["checks"][0]["status"] == "FAIL"
    fat = verdict(result, fps_target=None, budget_mb=1)
    assert fat["overall"] == "FAIL" and fat["checks"][0]["status"] == "SKIP" and fat["checks"][1]["status"] == "FAIL"


def test_bench_cli_json_and_strict_exit(trained_run, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = edgerun(
        [
            "bench",
            str(trained_run / "bundle"),
            "--iterations",
            "20",
            "--warmup",
            "2",
            "--fps-target",
            "1",
            "--budget-mb",
            "100000",
            "--json",
            str(out),
            "--strict",
        ]
    )
    assert code == 0 and "VERDICT: PASS" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["verdict"]["overall"] == "PASS" and data["result"]["latency_ms"]["p95"] > 0
    code = edgerun(
        ["bench", str(trained_run / "bundle"), "--iterations", "20", "--warmup", "2", "--fps-target", "1e9", "--strict"]
    )
    assert code == 1 and "VERDICT: FAIL" in capsys.readouterr().out


def test_validate_matches_host_and_fails_over_threshold(trained_run, tmp_path, capsys):
    assert edgerun(["validate", str(trained_run / "bundle")]) == 0
    assert "drop 0.00 points" in capsys.readouterr().out  # same model, same preprocessing: same accuracy
    assert edgerun(["validate", str(trained_run / "bundle"), "--variant", "int8"]) in (0, 1)
    copy = tmp_path / "b"
    shutil.copytree(trained_run / "bundle", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"]["int8"]["fp32_top1"] = 1.0  # pretend the host measured a perfect model
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "v.json"
    assert edgerun(["validate", str(copy), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["status"] == "FAIL"


def test_tegrastats_parsing_and_sampling(tmp_path, monkeypatch):
    nano = (
        "RAM 2110/3956MB (lfb 114x4MB) SWAP 0/1978MB CPU [12%@1479,3%@1479,off,off] EMC_FREQ 0% "
        "GR3D_FREQ 76% PLL@28C CPU@31C POM_5V_IN 3412/3412 POM_5V_GPU 1210/1210"
    )
    assert parse_tegrastats(nano)["ram_used_mb"] == 2110 and parse_tegrastats(nano)["gpu_load"] == 76
    orin = "RAM 3020/7620MB GR3D_FREQ 45% VDD_IN 5120mW/5000mW VDD_CPU_GPU_CV 900mW/880mW"
    assert parse_tegrastats(orin)["power_mw"] == 5120 and parse_tegrastats(orin)["power_rail"] == "VDD_IN"
    script = tmp_path / "tegrastats"
    script.write_text("#!/bin/sh\nwhile true; do echo '%s'; sleep 0.02; done\n" % orin)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    import time

    with TegraStats(command=str(script)) as tegra:
        time.sleep(0.3)
    summary = tegra.summary()
    assert tegra.available and summary["samples"] >= 3 and summary["power_mw_max"] == 5120
    with TegraStats(command=str(tmp_path / "absent")) as missing:
        pass
    assert not missing.available and missing.summary() is None


def _video(path, bundle, n=40):
    images, labels = bundle.validation()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    assert writer.isOpened()
    for i in range(n):
        rgb = to_three_channels(cv2.resize(images[i % len(images)], (64, 64), interpolation=cv2.INTER_NEAREST))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_camera_loop_on_a_video_file(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    video = _video(tmp_path / "line.avi", bundle)
    rejects = []
    with OrtRunner(bundle.model_path) as runner:
        summary = run_camera(
            CameraJob(
                runner=runner,
                manifest=bundle.manifest,
                source=str(video),
                csv_path=str(tmp_path / "p.csv"),
                reject_class="3",
                reject_threshold=0.0,
                on_reject=lambda *a: rejects.append(a),
                summary_path=str(tmp_path / "s.json"),
            )
        )
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert summary["frames_processed"] == len(rows) - 1 > 0
    assert summary["frames_processed"] == summary["frames_captured"] == 40 and summary["frames_dropped"] == 0
    assert summary["end_to_end_fps"] > 0 and summary["model_only_fps"] >= summary["end_to_end_fps"]
    classes = {r.split(",")[2] for r in rows[1:]}
    assert classes <= set(bundle.manifest.classes)
    assert summary["rejects"] == len(rejects) == sum(r.endswith(",1") for r in rows[1:])
    assert json.loads((tmp_path / "s.json").read_text())["frames_processed"] == summary["frames_processed"]
    with pytest.raises(SourceError, match="not a class"):
        run_camera(CameraJob(runner=runner, manifest=bundle.manifest, source=str(video), reject_class="widget"))


class FlakyCapture:
    """Delivers ``frames`` frames, then fails every read (a camera unplugged mid-stream)."""

    def __init__(self, frames, image):
        self.left = frames
        self.image = image

    def read(self):
        import time

        time.sleep(0.002)
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, self.image.copy()

    def get(self, prop):
        return 0

    def release(self):
        pass


def test_lost_source_reconnects_then_fails_with_nothing_lost(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    image = np.zeros((48, 48, 3), np.uint8)
    opened = []

    def dies_for_good(source):
        opened.append(source)
        if len(opened) > 1:
            raise SourceError("camera unplugged")
        return FlakyCapture(25, image)

    csv = tmp_path / "p.csv"
    with OrtRunner(bundle.model_path) as runner, pytest.raises(SourceError) as err:
        run_camera(
            CameraJob(
                runner=runner,
                manifest=bundle.manifest,
                source="rtsp://127.0.0.1/line",
                csv_path=str(csv),
                opener=dies_for_good,
                max_reconnects=2,
                reconnect_delay=0.01,
                summary_path=str(tmp_path / "s.json"),
            )
        )
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(opened) == 3 and saved["reconnects"] == 2  # the first open, then two bounded attempts
    assert "2 reconnect attempt(s) failed" in str(err.value) and "saved in" in str(err.value)
    assert len(csv.read_text().splitlines()) - 1 == saved["frames_processed"] > 0

    opened.clear()

    def recovers(source):
        opened.append(source)
        return FlakyCapture(10 if len(opened) == 1 else 15, image)

    with OrtRunner(bundle.model_path) as runner:
        summary = run_camera(
            CameraJob(
                runner=runner,
                manifest=bundle.manifest,
                source="rtsp://127.0.0.1/line",
                max_frames=12,
                opener=recovers,
                max_reconnects=3,
                reconnect_delay=0.01,
            )
        )
    assert summary["reconnects"] >= 1 and summary["frames_processed"] == 12


def test_camera_cli_on_video_and_source_strings(trained_run, tmp_path, capsys):
    video = _video(tmp_path / "v.avi", open_bundle(trained_run / "bundle"), n=20)
    assert (
        edgerun(["camera", str(trained_run / "bundle"), "--source", str(video), "--fps-target", "1", "--strict"]) == 0
    )
    assert "VERDICT: PASS" in capsys.readouterr().out
    assert describe_source("csi://1")[:2] == ("csi", "1")
    assert describe_source("usb://2")[:2] == ("usb", 2)
    assert describe_source("/dev/video0")[0] == "usb" and describe_source("rtsp://cam/1")[0] == "stream"
    with pytest.raises(SourceError, match="neither"):
        describe_source("/no/such/video.mp4")
    assert edgerun(["camera", str(trained_run / "bundle"), "--source", "/no/such/video.mp4"]) == 2


def test_info_runs_anywhere(capsys):
    assert edgerun(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memory_total_mb"] > 0 and "clocks" in info


# tegrastats lines as printed by real boards (quoted from public test suites and issue threads):
REAL_TEGRASTATS = {
    # Jetson Nano, JetPack 4.6.1: POM_5V_IN in mW without a unit
    "nano-jp4": (
        "RAM 1923/3964MB (lfb 2x2MB) SWAP 191/1982MB (cached 6MB) IRAM 0/252kB(lfb 252kB) CPU "
        "[5%@1224,4%@1224,3%@1224,6%@1224] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@37C CPU@40C "
        "PMIC@50C GPU@40C AO@45C thermal@40C POM_5V_IN 1750/1628 POM_5V_GPU 0/0 POM_5V_CPU 366/406",
        1750,
        "POM_5V_IN",
        1923,
    ),
    # Jetson AGX Xavier, JetPack 4 (FindHao/tx-utils#3): VDD_IN without a unit
    "xavier-jp4": (
        "RAM 2020/7852MB (lfb 1164x4MB) CPU [9%@345,21%@345,25%@345,3%@345,1%@345,1%@345] EMC_FREQ 0% "
        "GR3D_FREQ 0% PLL@42.5C MCPU@42.5C PMIC@100C Tboard@40C GPU@41C BCPU@42.5C thermal@41.9C "
        "Tdiode@41.25C VDD_SYS_GPU 153/158 VDD_SYS_SOC 536/547 VDD_4V0_WIFI 633/527 VDD_IN 3140/3208 "
        "VDD_SYS_CPU 536/590 VDD_SYS_DDR 557/601",
        3140,
        "VDD_IN",
        2020,
    ),
    # Jetson Orin Nano, JetPack 6: rails in mW with the unit
    "orin-nano-jp6": (
        "06-18-2025 11:25:24 RAM 3452/7620MB (lfb 25x4MB) SWAP 1518/16384MB (cached 174MB) CPU "
        "[1%@1420,2%@1420,0%@1420,2%@1420,2%@729,1%@729] GR3D_FREQ 0% cpu@50.031C soc2@49.031C soc0@50C "
        "gpu@49.031C tj@50.25C soc1@50.25C VDD_IN 4824mW/4824mW VDD_CPU_GPU_CV 518mW/518mW "
        "VDD_SOC 1475mW/1475mW",
        4824,
        "VDD_IN",
        3452,
    ),
    # Jetson AGX Xavier, JetPack 4.2 (martinkersner/gtop#7): no input rail; the total is the sum of its six rails
    "agx-xavier-jp4": (
        "RAM 14700/15692MB (lfb 3x2MB) SWAP 898/8192MB (cached 23MB) CPU [0%@1190,0%@1190,0%@1190,"
        "0%@1190,0%@1190,0%@1190,0%@1190,0%@1190] EMC_FREQ 0% GR3D_FREQ 0% AO@30C GPU@30.5C Tboard@31C "
        "Tdiode@32C AUX@30.5C CPU@31.5C thermal@30.8C PMIC@100C GPU 463/463 CPU 618/618 SOC 2936/2936 "
        "CV 0/0 VDDRQ 309/309 SYS5V 3306/3306",
        463 + 618 + 2936 + 0 + 309 + 3306,
        "GPU+CPU+SOC+CV+VDDRQ+SYS5V",
        14700,
    ),
    # Jetson AGX Orin, JetPack 5 rail names (rbonghi/jetson_stats#344: VIN_SYS_5V0 is one 5 V rail, not the input);
    # the figures are made up, the format is the board's
    "agx-orin-jp5": (
        "RAM 4012/30536MB (lfb 6754x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@729,0%@729,0%@729,0%@729] "
        "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CPU@44.5C GPU@42.8C "
        "VDD_GPU_SOC 2392mW/2392mW VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 2827mW/2827mW "
        "VDDQ_VDD2_1V8AO 503mW/503mW",
        2392 + 398 + 2827 + 503,
        "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO",
        4012,
    ),
}


@pytest.mark.parametrize("board", sorted(REAL_TEGRASTATS))
def test_tegrastats_power_on_every_jetpack(board):
    line, power, rail, ram = REAL_TEGRASTATS[board]
    sample = parse_tegrastats(line)
    assert sample["power_mw"] == power and sample["power_rail"] == rail and sample["ram_used_mb"] == ram
    assert sample["gpu_load"] == 0


@pytest.mark.parametrize("node", ["57000000.gpu", "17000000.gv11b", "17000000.ga10b", "17000000.gpu"])
def test_gpu_clock_state_from_sys_class_devfreq(tmp_path, node):
    """Nano (57000000.gpu), Xavier (gv11b), Orin on JetPack 5 (ga10b) and 6 (gpu) all list the GPU there."""
    from edgerun.device import clocks

    folder = tmp_path / "sys" / "class" / "devfreq" / node
    folder.mkdir(parents=True)
    (tmp_path / "sys" / "class" / "devfreq" / "3d00000.host1x").mkdir()  # another devfreq device: not the GPU
    for name, value in (("cur_freq", "306000000"), ("max_freq", "1300500000"), ("min_freq", "306000000")):
        (folder / name).write_text(value + "\n")
    state = clocks(root=str(tmp_path))
    assert state["gpu"] == {"cur_hz": 306000000, "max_hz": 1300500000, "min_hz": 306000000}
    assert state["maxed"] is False  # the GPU may idle down: jetson_clocks not applied
    (folder / "min_freq").write_text("1300500000\n")
    assert clocks(root=str(tmp_path))["maxed"] is True


def test_bench_feeds_camera_sized_frames_and_shows_the_preprocessing_share(trained_run, capsys, monkeypatch):
    import edgerun.bench as bench

    seen = []
    real_preprocess = bench.preprocess

    def spy(frames, spec, **kwargs):
        seen.append({f.shape for f in frames})
        return real_preprocess(frames, spec, **kwargs)

    monkeypatch.setattr(bench, "preprocess", spy)
    bundle = open_bundle(trained_run / "bundle")
    with OrtRunner(bundle.model_path) as runner:
        full = run_bench(
            BenchJob(runner=runner, manifest=bundle.manifest, warmup=2, iterations=20, frame_size=(1920, 1080))
        )
    assert full["feed"] == {"kind": "synthetic", "frame_size": [1920, 1080]}
    # the timed preprocessing is handed camera-sized frames (height, width, BGR), every iteration
    assert len(seen) == 22 and all(shapes == {(1080, 1920, 3)} for shapes in seen)
    assert full["stages_ms"]["preprocess"] > 0
    assert 0 < full["stages_share"]["preprocess"] < 1
    assert verdict(full, fps_target=1)["holds_for"] == "synthetic frames of 1920x1080"
    assert full["memory"]["device_mb"] is None and full["memory"]["total_mb"] == full["memory"]["process_peak_mb"]
    assert edgerun(["bench", str(trained_run / "bundle"), "--iterations", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "frames of 1280x720" in out and "preprocess" in out and "(for synthetic frames of 1280x720)" in out
    assert edgerun(["bench", str(trained_run / "bundle"), "--frame-size", "wide"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_memory_budget_is_judged_on_process_plus_device_memory(trained_run, tmp_path, monkeypatch):
    """On a Jetson, CUDA memory comes from nvmap, outside VmHWM: the budget is held against the sum."""
    from fake_tensorrt import FakeCuda, make_fake_trt

    import edgerun.device as device
    from edgerun.runtime.trt_build import BuildSpec, build_engine
    from edgerun.runtime.trt_run import TrtRunner

    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", cuda=cuda)
    bundle = open_bundle(trained_run / "bundle")
    build_engine(
        bundle, BuildSpec(precision="fp16", output=str(tmp_path / "e.engine")), trt=trt, cuda=cuda, log=lambda m: None
    )
    monkeypatch.setattr(device, "NVMAP_CLIENTS", str(tmp_path / "absent"))
    with TrtRunner(str(tmp_path / "e.engine"), bundle=bundle, trt=trt, cuda=cuda) as runner:
        cuda.mem_alloc(300 << 20)  # what an engine's weights and activations would take
        result = run_bench(
            BenchJob(runner=runner, manifest=bundle.manifest, warmup=1, iterations=5, frame_size=(64, 48))
        )
    memory = result["memory"]
    assert memory["device_mb"] >= 300 and "cuda.mem_get_info" in memory["device_method"]
    assert memory["total_mb"] == pytest.approx(memory["process_peak_mb"] + memory["device_mb"])
    budget = memory["process_peak_mb"] + 100  # enough for the process alone, not with its device memory
    row = verdict(result, budget_mb=budget)["checks"][1]
    assert row["status"] == "FAIL" and "device" in row["note"] and "cuda.mem_get_info" in row["note"]


def test_nvmap_clients_table_is_read_per_process(tmp_path):
    from edgerun.device import nvmap_process_mb

    table = tmp_path / "clients"
    table.write_text(
        "CLIENT                        PROCESS      PID        SIZE\n"
        "user                         python3      4242      52400K\n"
        "user                         gst-launch   77        1024K\n"
        "user                         python3      4242       1M\n"
    )
    assert nvmap_process_mb(4242, str(table)) == pytest.approx(52400 / 1024.0 + 1)
    assert nvmap_process_mb(999, str(table)) is None and nvmap_process_mb(4242, str(tmp_path / "no")) is None


def test_board_model_seen_from_a_container(tmp_path):
    """Docker masks /proc/device-tree: the model comes from $EDGERUN_BOARD or a mounted /etc/edgerun/board-model,
    a Jetson that shows neither is named as one of unknown model, and a plain host is not called a board."""
    from edgerun.device import board_label, board_model

    root = str(tmp_path)
    assert board_model({}, root) is None and board_label({}, root) is None  # a workstation: no board
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R32 (release), REVISION: 7.1\n")
    assert board_model({}, root) is None and "unknown model" in board_label({}, root)
    assert "/etc/edgerun/board-model" in board_label({}, root)
    (tmp_path / "etc" / "edgerun").mkdir()
    (tmp_path / "etc" / "edgerun" / "board-model").write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    assert board_model({}, root) == "NVIDIA Jetson Nano Developer Kit" == board_label({}, root)
    assert board_model({"EDGERUN_BOARD": "NVIDIA Orin Nano"}, root) == "NVIDIA Orin Nano"  # the variable wins
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson Xavier NX Developer Kit\x00")
    assert board_model({"EDGERUN_BOARD": "NVIDIA Orin Nano"}, root) == "NVIDIA Jetson Xavier NX Developer Kit"


_BENCH_MEMORY_SCRIPT = r"""
import json, sys
from fake_tensorrt import FakeCuda, make_fake_trt
import edgerun.device as device
from edgerun.bench import BenchJob, run_bench
from edgerun.bundle.bundle import open_bundle
from edgerun.runtime.trt_build import BuildSpec, build_engine
from edgerun.runtime.trt_run import TrtRunner

bundle_dir, engine, absent, width, height = sys.argv[1:6]
device.NVMAP_CLIENTS = absent
cuda = FakeCuda(shares_host_memory=True)
trt = make_fake_trt("10.3.0", cuda=cuda)
bundle = open_bundle(bundle_dir)
build_engine(bundle, BuildSpec(precision="fp16", output=engine), trt=trt, cuda=cuda, log=lambda m: None)
gpu = {"name": "Orin", "compute_capability": "8.7", "integrated": True}
with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=gpu) as runner:
    cuda.mem_alloc(64 << 20)  # the engine's own device memory
    memory = run_bench(BenchJob(runner=runner, manifest=bundle.manifest, warmup=2, iterations=10,
                                frame_size=(int(width), int(height))))["memory"]
print(json.dumps(memory))
"""


def _bench_memory(trained_run, tmp_path, frame_size):
    """bench on a fake Jetson (integrated GPU: host allocations lower cuMemGetInfo's free figure too), each in a
    fresh process: a process's resident baseline depends on what it ran before, as a real bench's would not."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent / "jetson")]))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _BENCH_MEMORY_SCRIPT,
            str(trained_run / "bundle"),
            str(tmp_path / ("e%dx%d.engine" % frame_size)),
            str(tmp_path / "absent"),
            str(frame_size[0]),
            str(frame_size[1]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_memory_grows_by_the_frames_alone_on_a_shared_memory_device(trained_run, tmp_path):
    """On Tegra the GPU's free figure is the OS's: the frames (host memory, in VmHWM) must not also be counted as
    device memory. 1920x1080 against 64x48 frames: the total differs by the frames and no more."""
    small = _bench_memory(trained_run, tmp_path, (64, 48))
    large = _bench_memory(trained_run, tmp_path, (1920, 1080))
    frames_mb = 4 * 1080 * 1920 * 3 / float(1 << 20)  # four uint8 frames of 1920x1080
    for memory in (small, large):
        assert memory["device_mb"] == pytest.approx(64, abs=4), memory["device_method"]
        assert "less this process's RSS growth" in memory["device_method"]
    assert large["total_mb"] - small["total_mb"] <= frames_mb + 4
    assert large["total_mb"] - small["total_mb"] >= frames_mb - 4  # the frames are held, and counted once


def test_budget_is_judged_on_the_serving_loop_not_on_set_up(trained_run, tmp_path, monkeypatch):
    """A spike during set-up (here 300 MB, freed again) is reported but not held against the budget; where VmHWM
    cannot be reset, the loop's RSS is sampled instead, and the report says which method measured it."""
    import edgerun.bench as bench

    bundle = open_bundle(trained_run / "bundle")
    spike = np.ones(300 << 20, dtype=np.uint8)
    del spike
    with OrtRunner(bundle.model_path) as runner:
        memory = run_bench(
            BenchJob(runner=runner, manifest=bundle.manifest, warmup=2, iterations=5, frame_size=(64, 48))
        )["memory"]
    assert memory["setup_peak_mb"] >= memory["process_peak_mb"] + 250
    assert memory["process_peak_method"].startswith("VmHWM of the serving loop")
    monkeypatch.setattr(bench, "reset_peak_memory", lambda: False)
    spike = np.ones(300 << 20, dtype=np.uint8)  # the first bench restarted VmHWM: a new set-up spike
    del spike
    with OrtRunner(bundle.model_path) as runner:
        result = run_bench(
            BenchJob(runner=runner, manifest=bundle.manifest, warmup=2, iterations=5, frame_size=(64, 48))
        )
    assert result["memory"]["process_peak_method"].startswith("VmRSS sampled")
    assert result["memory"]["setup_peak_mb"] >= result["memory"]["process_peak_mb"] + 250
    assert "VmRSS sampled" in bench.report_text(result, verdict(result), "t")


def test_onnxruntime_on_a_gpu_is_not_measured_never_zero(trained_run, tmp_path, monkeypatch, capsys):
    import edgerun.device as device
    from edgerun.bench import report_text

    monkeypatch.setattr(device, "NVMAP_CLIENTS", str(tmp_path / "absent"))
    bundle = open_bundle(trained_run / "bundle")
    with OrtRunner(bundle.model_path) as runner:
        assert runner.device_memory() is None  # the CPU provider holds no GPU memory
        runner.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as onnxruntime-gpu reports it
        result = run_bench(
            BenchJob(runner=runner, manifest=bundle.manifest, warmup=1, iterations=3, frame_size=(64, 48))
        )
    memory = result["memory"]
    assert memory["device_mb"] is None and memory["total_mb"] is None
    assert "CUDAExecutionProvider memory not measured" in memory["device_method"]
    row = verdict(result, budget_mb=100000)["checks"][1]
    assert row["status"] == "SKIP" and "not measured" in row["note"]  # never a PASS on an unknown total
    assert "device not measured" in report_text(result, verdict(result, budget_mb=100000), "t")
    table = tmp_path / "clients"
    import os

    table.write_text("user python3 %d 20480K\n" % os.getpid())
    monkeypatch.setattr(device, "NVMAP_CLIENTS", str(table))
    with OrtRunner(bundle.model_path) as runner:
        runner.providers = ["CUDAExecutionProvider"]
        assert runner.device_memory()["mb"] == pytest.approx(20)


class FixedBatchRunner(OrtRunner):
    """An engine built for a fixed batch of 4 (as TrtRunner refuses any other feed), computed on the batch-1 ONNX
    model one item at a time."""

    name = "fixed-batch-4"

    def _infer(self, feed):
        ((name, array),) = feed.items()
        if array.shape[0] != 4:
            raise RunnerError("input '%s' is fixed at batch 4, the feed is %s" % (name, array.shape))
        outs = [OrtRunner._infer(self, {name: array[i : i + 1]}) for i in range(4)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_camera_pads_one_frame_to_a_fixed_batch_engine(trained_run, tmp_path):
    """A batch-4 engine used to be refused with advice the camera could not follow ('feed batch 4')."""
    from edgerun.bundle.manifest import Manifest

    bundle = open_bundle(trained_run / "bundle")
    data = json.loads(json.dumps(bundle.manifest.data))
    data["model"]["input_shape"][0] = 4
    manifest = Manifest(data)
    video = _video(tmp_path / "line.avi", bundle, n=12)
    with OrtRunner(bundle.model_path) as plain:
        expected = run_camera(
            CameraJob(runner=plain, manifest=bundle.manifest, source=str(video), csv_path=str(tmp_path / "a.csv"))
        )
    with FixedBatchRunner(bundle.model_path) as runner:
        summary = run_camera(
            CameraJob(runner=runner, manifest=manifest, source=str(video), csv_path=str(tmp_path / "b.csv"))
        )
    assert summary["error"] is None and summary["frames_processed"] == expected["frames_processed"] == 12
    assert summary["engine_batch"] == 4 and expected["engine_batch"] == 1
    classes = lambda p: [r.split(",")[2] for r in p.read_text().splitlines()[1:]]  # noqa: E731
    assert classes(tmp_path / "b.csv") == classes(tmp_path / "a.csv")  # the padding never reaches a result


def test_clocks_pinned_on_a_lower_power_mode_are_not_called_unpinned(tmp_path):
    """nvpmodel's lower modes cap scaling_max_freq below cpuinfo_max_freq; jetson_clocks pins min to that cap."""
    from edgerun.device import clocks

    for cpu in range(2):
        folder = tmp_path / "sys" / "devices" / "system" / "cpu" / ("cpu%d" % cpu) / "cpufreq"
        folder.mkdir(parents=True)
        for name, value in (
            ("scaling_cur_freq", "918000"),
            ("cpuinfo_max_freq", "1479000"),
            ("scaling_max_freq", "918000"),
            ("scaling_min_freq", "918000"),
        ):
            (folder / name).write_text(value + "\n")
    state = clocks(root=str(tmp_path))
    assert state["maxed"] is True and state["cpu"][0]["hw_max_khz"] == 1479000
    (folder / "scaling_min_freq").write_text("102000\n")  # DVFS free to go down: not pinned
    assert clocks(root=str(tmp_path))["maxed"] is False


def test_no_visible_gpu_is_an_edgerun_error_not_a_pycuda_traceback(tmp_path, monkeypatch):
    """pycuda.autoprimaryctx raises pycuda._driver.RuntimeError when cuInit finds no device (a container started
    without --runtime nvidia)."""
    import sys

    from edgerun.runtime.trt import import_cuda

    package = tmp_path / "pycuda"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_driver.py").write_text("class Error(Exception):\n    pass\n\n\nclass RuntimeError(Error):\n    pass\n")
    (package / "autoprimaryctx.py").write_text(
        "from pycuda._driver import RuntimeError\nraise RuntimeError('cuInit failed: no CUDA-capable device is "
        "detected')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(RunnerError, match="no CUDA GPU is visible.*cuInit failed.*--runtime nvidia"):
            import_cuda()
    finally:
        for name in [n for n in sys.modules if n == "pycuda" or n.startswith("pycuda.")]:
            del sys.modules[name]
