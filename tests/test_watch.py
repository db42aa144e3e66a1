"""The camera watched over time: drift (PSI against the bundle's validation set), unsure frames saved for the
teacher, and the soak (memory slope, temperature, reconnects) on real video files."""

import argparse
import csv
import json
import math

import cv2
import numpy as np
import pytest

from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.cli.camera import parse_duration
from edgerun.device import temperatures, throttled
from edgerun.errors import SourceError
from edgerun.line.camera import CameraJob, run_camera
from edgerun.line.drift import DriftWatch, psi
from edgerun.line.soak import Soak, slope
from edgerun.preprocess import to_three_channels
from edgerun.runtime.runners import OrtRunner


def _video(path, frames):
    """A lossless (FFV1) recording of RGB frames at their own size: the camera sees exactly these pixels."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (w, h))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(to_three_channels(rgb), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_psi_matches_its_definition():
    assert psi([10, 20, 70], [10, 20, 70]) == 0
    e, a = np.array([0.25, 0.25, 0.5]), np.array([0.5, 0.25, 0.25])
    assert psi(e * 400, a * 100) == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert math.isfinite(psi([0, 10], [10, 0]))  # empty bins are floored, not infinite


def test_drift_watch_is_quiet_on_the_validation_images_and_warns_on_a_changed_line(trained_run, tmp_path, capsys):
    bundle = open_bundle(trained_run / "bundle")
    images, _ = bundle.validation()
    same = _video(tmp_path / "same.avi", [images[i % len(images)] for i in range(200)])
    # the line changed: the lighting failed (frames nearly black) -- no labels needed to notice
    dark = _video(tmp_path / "dark.avi", [(images[i % len(images)] // 12) for i in range(200)])
    out = tmp_path / "same.json"
    assert (
        edgerun(
            ["camera", str(trained_run / "bundle"), "--source", str(same), "--drift-window", "100", "--json", str(out)]
        )
        == 0
    )
    quiet = json.loads(out.read_text())["drift"]
    assert quiet["checks"] == 2 and quiet["status"] == "stable", quiet["worst"]
    assert quiet["worst"]["class_psi"] == pytest.approx(0, abs=1e-9)  # the validation set itself, 4 times over
    assert "the bundle's" in quiet["reference"] and quiet["reference"].endswith("validation images on this runner")
    capsys.readouterr()
    out = tmp_path / "dark.json"
    assert (
        edgerun(
            ["camera", str(trained_run / "bundle"), "--source", str(dark), "--drift-window", "100", "--json", str(out)]
        )
        == 0
    )
    loud = json.loads(out.read_text())["drift"]
    printed = capsys.readouterr().out
    assert loud["status"] == "DRIFT" and loud["warnings"] >= 1 and loud["first_warning_frame"] == 100
    assert "DRIFT at frame 100" in printed and "drift (PSI against" in printed
    worst = loud["worst"]
    assert (
        max(worst["confidence_psi"], worst["class_psi"])
        > 0.25
        > max(quiet["worst"]["confidence_psi"], quiet["worst"]["class_psi"])
    )


def test_unsure_frames_are_saved_capped_with_their_scores(trained_run, tmp_path, capsys):
    bundle = open_bundle(trained_run / "bundle")
    images, _ = bundle.validation()
    video = _video(tmp_path / "line.avi", [images[i % len(images)] for i in range(30)])
    folder = tmp_path / "unsure"
    # margin 1.0: every frame's top two differ by less than 1, so every frame is "unsure"; 5 kept
    assert (
        edgerun(
            [
                "camera",
                str(trained_run / "bundle"),
                "--source",
                str(video),
                "--save-unsure",
                str(folder),
                "--unsure-margin",
                "1.0",
                "--save-unsure-max",
                "5",
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((folder / "index.csv").open()))
    assert len(rows) == 5 == len(list(folder.glob("*.jpg")))
    for row in rows:
        assert cv2.imread(str(folder / row["file"])) is not None
        assert float(row["p1"]) >= float(row["p2"]) and float(row["margin"]) == pytest.approx(
            float(row["p1"]) - float(row["p2"]), abs=2e-6
        )
        assert row["class"] in bundle.manifest.classes
    unsure = json.loads((tmp_path / "s.json").read_text())["unsure"]
    assert unsure["unsure_frames"] == 30 and unsure["saved"] == 5 and unsure["not_saved_over_cap"] == 25
    # a second run into the same folder keeps its cap
    assert (
        edgerun(
            [
                "camera",
                str(trained_run / "bundle"),
                "--source",
                str(video),
                "--save-unsure",
                str(folder),
                "--unsure-margin",
                "1.0",
                "--save-unsure-max",
                "5",
            ]
        )
        == 0
    )
    assert len(list(folder.glob("*.jpg"))) == 5
    assert "unsure frames (top-two margin < 1.00): 30, 5 saved" in capsys.readouterr().out


def test_soak_on_100k_frames_of_a_looped_video_holds_memory_flat(trained_run, tmp_path):
    """The accelerated soak: a 64x64 recording looped to 100,000 frames; memory's slope after warm-up under
    1 MB per 10,000 frames, every sample and loop recorded. In a process of its own, as on the device: inside the
    test session the RSS also moved with what earlier tests left behind (1.2-1.5 MB per 10k frames, now and then)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bundle = open_bundle(trained_run / "bundle")
    images, _ = bundle.validation()
    video = _video(tmp_path / "line.avi", [images[i % len(images)] for i in range(50)])
    out = tmp_path / "soak.json"
    jetson = Path(__file__).resolve().parent.parent / "jetson"
    env = dict(os.environ, PYTHONPATH=str(jetson))
    argv = ["camera", str(trained_run / "bundle"), "--source", str(video), "--loop", "--max-frames", "100000"]
    argv += ["--soak", "--soak-interval", "0.5", "--drift-window", "1000", "--json", str(out)]
    done = subprocess.run([sys.executable, "-m", "edgerun", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    soak = summary["soak"]
    assert summary["frames_processed"] == 100000 and summary["loops"] >= 1999
    assert soak["samples"] >= 10 and soak["series"][-1]["frame"] == 99999
    assert abs(soak["rss_slope_mb"]["per_10k_frames"]) < 1.0, soak["rss_slope_mb"]
    assert soak["verdict"] == "PASS" and summary["verdict"] == "PASS"
    assert summary["drift"]["checks"] == 100
    assert "soak:" in done.stdout


def test_soak_verdict_fails_on_a_leak_and_logs_reconnects():
    t = [0.0]
    leak = []
    soak = Soak(interval_s=1, clock=lambda: t[0], max_slope_mb=1.0, root="/nonexistent")
    import edgerun.device as device

    real = device.process_memory_mb
    device.process_memory_mb = lambda: (100 + len(leak) * 0.5, None)  # +0.5 MB per 1,000 frames: 5 MB per 10k
    try:
        for frame in range(20000):
            t[0] = frame / 1000.0
            if frame % 1000 == 0:
                leak.append(1)
            soak.tick(frame)
            if frame == 5000:
                soak.event("reconnect", "source reopened")
        result = soak.summary(20000)
    finally:
        device.process_memory_mb = real
    assert result["verdict"] == "FAIL" and result["rss_slope_mb"]["per_10k_frames"] == pytest.approx(5, rel=0.1)
    assert result["events"] == [{"t_s": 5.0, "frame": 5000, "kind": "reconnect", "text": "source reopened"}]
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2) and slope([0, 1], [0, 1]) is None


def test_reconnects_land_in_the_soak_log(trained_run):
    from test_device import FlakyCapture

    bundle = open_bundle(trained_run / "bundle")
    opened = []

    def flaky(source):
        opened.append(source)
        if len(opened) == 3:
            raise SourceError("camera unplugged")
        return FlakyCapture(20, np.zeros((48, 48, 3), np.uint8))

    soak = Soak(interval_s=0.01)
    with OrtRunner(bundle.model_path) as runner, pytest.raises(SourceError):
        run_camera(
            CameraJob(
                runner=runner,
                manifest=bundle.manifest,
                source="rtsp://127.0.0.1/line",
                opener=flaky,
                max_reconnects=2,
                reconnect_delay=0.01,
                soak=soak,
            )
        )
    kinds = [e["kind"] for e in soak.events]
    assert kinds == ["reconnect", "reconnect_failed"]


def test_durations_temperatures_and_throttling(tmp_path):
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800 and parse_duration("90") == 90
    for bad in ("abc", "-5", "0", "infh"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("GPU-therm\n")
    (zone / "temp").write_text("51500\n")
    assert temperatures(str(tmp_path)) == {"GPU-therm": 51.5}
    pinned = {
        "maxed": True,
        "cpu": [{"cur_khz": 1479000, "max_khz": 1479000}],
        "gpu": {"cur_hz": 614e6, "max_hz": 921.6e6},
    }
    assert throttled(pinned) is True and throttled(dict(pinned, maxed=False)) is None


def test_drift_watch_refuses_a_window_too_small(trained_run, capsys):
    assert edgerun(["camera", str(trained_run / "bundle"), "--source", "x.avi", "--drift-window", "10"]) == 2
    with pytest.raises(Exception, match="20 images"):
        DriftWatch(np.full((5, 3), 1 / 3.0))
