"""The report of a real small run: report.md with its plots, report.html self-contained and drawn by a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from edgedistill.cli import main
from edgerun.cli import main as edgerun

# matplotlib's default cycle: the plots' own colours, never in the page's text or tables
TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def test_run_writes_the_report_and_device_files_join_it(trained_run, tmp_path, capsys):
    html_path, md_path = trained_run / "report.html", trained_run / "report.md"
    assert html_path.exists() and md_path.exists()  # `edgedistill run` wrote them at the end
    summary = json.loads((trained_run / "summary.json").read_text())
    est = summary["device_estimate"]  # the planner's figures for the recipe's export target, labelled as such
    assert est["target"] == "jetson-nano-jp4" and "estimate" in est["label"] and est["student"]["est_fps"] > 0
    assert "ONNX Runtime" in summary["host"]["runtime"] and summary["student"]["torch_latency_ms_b1"] > 0
    bench, validate = tmp_path / "bench.json", tmp_path / "validate.json"
    assert (
        edgerun(["bench", str(trained_run / "bundle"), "--iterations", "5", "--warmup", "1", "--json", str(bench)]) == 0
    )
    assert edgerun(["validate", str(trained_run / "bundle"), "--max-drop", "1", "--json", str(validate)]) == 0
    assert main(["report", str(trained_run), "--measured", str(bench), str(validate)]) == 0
    md = md_path.read_text()
    for section in ("Teacher, student and baseline", "Teacher validation", "Export: parity and INT8", "Device"):
        assert f"## {section}" in md
    assert "ESTIMATES" in md and "student FPS (model)" in md and "device top-1 %" in md
    images = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(images) >= 4 and all((trained_run / p).stat().st_size > 5000 for p in images)
    html = html_path.read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "the report must not reach out"
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) == len(images) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(link|script)\b", html)
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    assert main(["report", str(trained_run), "--measured", str(tmp_path / "junk.json")]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2


def test_the_report_renders_in_a_real_browser_with_every_plot(trained_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from PIL import Image

    shot = tmp_path / "report.png"
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,5200",
            f"--screenshot={shot}",
            (trained_run / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.exists(), out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[1] == 1200
    for colour, least in ((TAB_BLUE, 2000), (TAB_ORANGE, 500), (TAB_GREEN, 500)):
        hits = (np.abs(pixels - np.array(colour)).sum(axis=2) <= 12).sum()
        assert hits >= least, f"plot colour {colour}: {hits} pixels; a plot did not render"
    # the plots sit in the lower part of the page, under the tables: that band is not blank
    rows_with_plot_colour = np.flatnonzero((np.abs(pixels - np.array(TAB_BLUE)).sum(axis=2) <= 12).any(axis=1))
    assert rows_with_plot_colour.size > 300
