"""The line as a service: the systemd unit (checked by systemd-analyze), and the heartbeat spoken over a real
notify socket while `edgerun camera` classifies a video file, read back by `edgerun service status`."""

import configparser
import json
import shutil
import socket
import subprocess

import cv2
import pytest

from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.line.service import Heartbeat, ServiceUnit, sd_notify, unit_text, watchdog_interval
from edgerun.preprocess import to_three_channels


def _unit(tmp_path):
    return configparser.ConfigParser(interpolation=None, strict=False)


def test_install_writes_a_unit_systemd_accepts(trained_run, world, reachable_python, capsys):
    units = world / "units"
    assert (
        edgerun(
            [
                "service",
                "install",
                str(trained_run / "bundle"),
                "--source",
                "csi://0",
                "--name",
                "line1",
                "--user",
                "nobody",
                "--group",
                "video",
                "--reject-class",
                "3",
                "--unit-dir",
                str(units),
                "--state-root",
                str(world / "state"),
                "--no-enable",
            ]
        )
        == 0
    )
    path = units / "edgerun-line1.service"
    state = world / "state" / "line1"
    parser = _unit(world)
    parser.optionxform = str
    parser.read(path)
    svc = parser["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and svc["WatchdogSec"] == "30"
    assert svc["User"] == "nobody" and svc["SupplementaryGroups"] == "video" and svc["NoNewPrivileges"] == "yes"
    assert svc["StandardOutput"] == "journal" and svc["ReadWritePaths"] == str(state)
    exec_start = svc["ExecStart"]
    assert " -m edgerun.cli camera " in exec_start and "--source csi://0" in exec_start
    assert f"--status-file {state}/status.json" in exec_start and "--reject-class 3" in exec_start
    assert f"--save-unsure {state}/unsure" in exec_start
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    assert "not enabled (--no-enable)" in capsys.readouterr().out
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        # its only remark is about the account this test borrows (nobody); a real line creates its own
        assert all("nobody" in line for line in done.stderr.splitlines() if line.strip()), done.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--user", "root"], "runs unprivileged"),
        (["--user", "no-such-user-here"], "useradd --system"),
        (["--group", "no-such-group"], "no such group"),
        (["--name", "a b"], "letters, digits"),
        (["--watchdog", "1"], "at least 5 seconds"),
    ],
)
def test_install_refuses_what_would_not_run_safely(trained_run, tmp_path, capsys, argv, words):
    base = [
        "service",
        "install",
        str(trained_run / "bundle"),
        "--source",
        "csi://0",
        "--user",
        "nobody",
        "--unit-dir",
        str(tmp_path),
        "--no-enable",
    ]
    assert edgerun(base + argv) == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.glob("*.service"))


def test_camera_speaks_systemds_notify_protocol_and_status_reads_it(trained_run, tmp_path, monkeypatch, capsys):
    bundle = open_bundle(trained_run / "bundle")
    images, _ = bundle.validation()
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, images.shape[1:3][::-1])
    for i in range(400):
        writer.write(cv2.cvtColor(to_three_channels(images[i % len(images)]), cv2.COLOR_RGB2BGR))
    writer.release()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # systemd's WatchdogSec=0.1: a ping at least every 0.05 s
    state = tmp_path / "state" / "line1"
    state.mkdir(parents=True)
    assert (
        edgerun(
            [
                "camera",
                str(trained_run / "bundle"),
                "--source",
                str(video),
                "--reject-class",
                "3",
                "--threshold",
                "0",
                "--status-file",
                str(state / "status.json"),
            ]
        )
        == 0
    )
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except socket.timeout:
        pass
    sock.close()
    assert messages[0] == "READY=1\nSTATUS=classifying"
    assert "WATCHDOG=1" in messages and messages[-1] == "STOPPING=1"
    assert any(m.startswith("STATUS=") and "FPS" in m and "400 frames" in m for m in messages)
    status = json.loads((state / "status.json").read_text())
    assert status["frames"] == 400 and status["rejects"] == 400 and status["ended"] is True
    assert len(status["last_verdicts"]) == 20 and status["last_verdicts"][-1]["frame"] == 399
    capsys.readouterr()
    assert edgerun(["service", "status", "--name", "line1", "--state-root", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "400 frames, 0 dropped, 0 reconnects, 400 rejects" in out and "frame 399: REJECT" in out


def test_heartbeat_without_systemd_and_the_watchdog_interval():
    assert sd_notify("READY=1", environ={}) is False  # not run by systemd: silent
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's
    beat = Heartbeat(None, environ={})
    beat.tick({"frames": 1, "seconds": 0.5})
    assert beat.ready and beat.watchdog_s is None
    text = unit_text(
        ServiceUnit(
            name="x", camera_args=["/data/my bundle.edb"], user="edgerun", group="video", python="/opt/py/bin/python3"
        )
    )
    assert 'ExecStart=/opt/py/bin/python3 -m edgerun.cli camera "/data/my bundle.edb"' in text
    assert "StateDirectory=edgerun/x" in text  # under /var/lib/edgerun: systemd makes it and gives it to User=
