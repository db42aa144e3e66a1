"""The service runs as another account than the one that built its engine: the release, the service's own engine
key, its trust and edgerun staged in its state folder, checked as that account before the unit is written, and the
unit's command started as that account (a dropped uid, a fresh HOME). Values written into the unit are escaped
for systemd or refused; a container's key lives on a volume."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from fake_tensorrt import FakeCuda, make_fake_trt

from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.errors import EdgerunError
from edgerun.line import release
from edgerun.preprocess import to_three_channels
from edgerun.runtime.trt_build import BuildSpec, build_engine

ROOT = Path(__file__).resolve().parents[1]
NANO = {"name": "Jetson Nano", "compute_capability": "5.3"}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another account needs root")


def _login_engine(bundle_dir: Path, home: Path, monkeypatch) -> Path:
    """An engine built (fake TensorRT 8.2) by a login whose key is in its own 0700 home, as `edgerun build` does."""
    home.mkdir(mode=0o700)
    monkeypatch.setenv("EDGERUN_DEVICE_KEY", str(home / ".config" / "edgerun" / "device.key"))
    cuda = FakeCuda()
    engine = home / "student.fp16.engine"
    build_engine(
        open_bundle(bundle_dir),
        BuildSpec(precision="fp16", output=str(engine), gpu=NANO),
        trt=make_fake_trt("8.2.1.8", cuda=cuda),
        log=lambda m: None,
        cuda=cuda,
    )
    return engine


def _unit(path: Path) -> tuple[list[str], dict[str, str], configparser.SectionProxy]:
    """(ExecStart's argv, the Environment, the [Service] section) as systemd reads them: quoted words, %% -> %,
    and in ExecStart $$ -> $."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(path)
    svc = parser["Service"]
    argv = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(svc["ExecStart"])]
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line[len("Environment=") :]):
                key, _, value = word.replace("%%", "%").partition("=")
                env[key] = value
    return argv, env, svc


def _install(bundle, world: Path, *extra: str) -> int:
    return edgerun(
        [
            "service",
            "install",
            str(bundle),
            "--name",
            "line1",
            "--user",
            "nobody",
            "--group",
            "video",
            "--state-root",
            str(world / "state"),
            "--unit-dir",
            str(world / "units"),
            "--no-enable",
            *extra,
        ]
    )


def _code(argv) -> int:
    """edgerun's exit code, argparse's own refusals (SystemExit 2) included."""
    try:
        return edgerun(argv)
    except SystemExit as exc:
        return exc.code


def _as_nobody(argv, env, cwd):
    def drop():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    return subprocess.run(
        argv, env=dict(base, **env), cwd=cwd, preexec_fn=drop, capture_output=True, text=True, timeout=300
    )


@needs_root
def test_the_service_account_can_verify_and_start_what_install_staged(
    trained_run, world, tmp_path, monkeypatch, reachable_python
):
    engine = _login_engine(trained_run / "bundle", tmp_path / "login", monkeypatch)
    assert _install(trained_run / "bundle", world, "--source", "csi://0", "--engine", str(engine)) == 0
    state = world / "state" / "line1"
    argv, env, svc = _unit(world / "units" / "edgerun-line1.service")
    assert svc["User"] == "nobody" and svc["WorkingDirectory"] == str(state)
    assert env["EDGERUN_DEVICE_KEY"] == str(state / "device.key") and env["PYTHONPATH"] == str(state / "lib")
    assert argv[argv.index("--engine") + 1] == str(state / "release" / "student.fp16.engine")
    assert argv[4] == str(state / "release" / "bundle")
    key = state / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 65534
    assert all(p.stat().st_uid == 65534 for p in state.rglob("*"))
    assert (state / "lib" / "edgerun" / "cli" / "__main__.py").exists()
    assert key.read_bytes() != (tmp_path / "login" / ".config" / "edgerun" / "device.key").read_bytes()

    # what the unit names, checked by the service's account with the unit's environment (install did the same)
    verify = [sys.executable, "-m", "edgerun.cli", "verify", argv[4], "--engine", argv[argv.index("--engine") + 1]]
    done = _as_nobody(verify, env, str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matches its record" in done.stdout
    # the layout before: the engine and key the login built with, which the service's account cannot read
    login_env = dict(env, EDGERUN_DEVICE_KEY=os.environ["EDGERUN_DEVICE_KEY"])
    done = _as_nobody(verify[:-1] + [str(engine)], login_env, str(state))
    assert done.returncode == 2 and "cannot be read" in done.stderr + done.stdout


@needs_root
def test_the_units_command_runs_as_the_service_account(trained_run, world, reachable_python):
    """The unit's ExecStart and Environment, run as nobody: it reads the staged bundle, writes its status and its
    unsure frames in its state folder, and ends when the video does."""
    bundle = open_bundle(trained_run / "bundle")
    images, _ = bundle.validation()
    video = world / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, images.shape[1:3][::-1])
    for i in range(60):
        writer.write(cv2.cvtColor(to_three_channels(images[i % len(images)]), cv2.COLOR_RGB2BGR))
    writer.release()
    video.chmod(0o644)
    assert _install(trained_run / "bundle", world, "--source", str(video), "--reject-class", "3") == 0
    argv, env, svc = _unit(world / "units" / "edgerun-line1.service")
    done = _as_nobody(argv, env, svc["WorkingDirectory"])
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads((world / "state" / "line1" / "status.json").read_text())
    assert status["frames"] == 60 and status["ended"] is True


@needs_root
def test_install_refuses_when_the_service_account_cannot_read_its_release(
    trained_run, world, tmp_path, capsys, reachable_python
):
    """A state root under a folder only root can enter: the check as the service's account fails, no unit."""
    hidden = world / "hidden"
    hidden.mkdir(mode=0o700)
    code = edgerun(
        [
            "service",
            "install",
            str(trained_run / "bundle"),
            "--source",
            "csi://0",
            "--user",
            "nobody",
            "--state-root",
            str(hidden),
            "--unit-dir",
            str(world / "units"),
            "--no-enable",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "as the service's account 'nobody'" in err and "no unit was written" in err
    assert not list((world / "units").glob("*.service"))


@needs_root
def test_the_unit_runs_with_the_trust_and_pins_install_checked(
    trained_run, world, tmp_path, monkeypatch, reachable_python
):
    from edgerun.bundle.signing import generate_keypair, sign_bundle

    signed = tmp_path / "signed"
    shutil.copytree(trained_run / "bundle", signed)
    (tmp_path / "keys").mkdir()
    generate_keypair(str(tmp_path / "keys" / "line.key"))
    public = tmp_path / "keys" / "line.key.pub"
    sign_bundle(str(signed), str(tmp_path / "keys" / "line.key"))
    monkeypatch.setenv("EDGERUN_TRUST", str(public))
    assert _install(signed, world, "--source", "csi://0") == 0
    _, env, _ = _unit(world / "units" / "edgerun-line1.service")
    state = world / "state" / "line1"
    assert env["EDGERUN_TRUST"] == str(state / "trust")
    assert (state / "trust" / public.name).read_bytes() == public.read_bytes()


@pytest.mark.parametrize("source", ["rtsp://line:p%40ss$word@10.0.0.7/stream", "rtsp://cam/a b%i$HOME"])
def test_percent_and_dollar_reach_the_camera_as_written(trained_run, tmp_path, source):
    """systemd expands %-specifiers in ExecStart and Environment and $VARIABLES in ExecStart: written %% and $$."""
    from edgerun.line.service import ServiceUnit, environment_line, unit_text

    text = unit_text(
        ServiceUnit(
            name="line1",
            camera_args=["/b.edb", "--source", source],
            user="edgerun",
            group="video",
            python="/usr/bin/python3",
            environment=[("EDGERUN_TRUST", "/etc/keys/50%$x")],
        )
    )
    path = tmp_path / "edgerun-line1.service"
    path.write_text(text)
    argv, env, _ = _unit(path)
    assert argv[argv.index("--source") + 1] == source and env["EDGERUN_TRUST"] == "/etc/keys/50%$x"
    assert "%%" in text and ("$$" in text)
    assert environment_line("A", "x$y") == 'Environment="A=x$y"'  # $ is not special in Environment=
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert "Failed" not in done.stderr and "Invalid" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--source", "csi://0\nExecStartPre=/bin/sh -c id"], "control character"),
        (["--source", "csi://0", "--reject-class", "3\n[Install]"], "control character"),
        (["--source", "csi://0", "--threshold", "nan"], "finite"),
        (["--source", "csi://0", "--threshold", "1.5"], "at most 1"),
        (["--source", "csi://0", "--state-root", "/tmp/a b"], "state folder"),
    ],
)
def test_install_refuses_values_that_would_rewrite_the_unit(trained_run, tmp_path, capsys, argv, words):
    base = ["service", "install", str(trained_run / "bundle"), "--user", "nobody", "--unit-dir", str(tmp_path)]
    assert _code(base + argv + ["--no-enable"]) == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.glob("*.service"))


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1"])
def test_camera_refuses_a_threshold_that_would_never_reject(trained_run, capsys, value):
    argv = ["camera", str(trained_run / "bundle"), "--source", "csi://0", "--reject-class", "3", "--threshold", value]
    assert _code(argv) == 2
    assert "--threshold" in capsys.readouterr().err


def test_max_unpack_mb_must_be_finite(trained_run, tmp_path, capsys, monkeypatch):
    from edgerun.bundle.bundle import pack_bundle

    edb = pack_bundle(trained_run / "bundle", tmp_path / "b.edb")
    assert _code(["verify", edb, "--max-unpack-mb", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    monkeypatch.setenv("EDGERUN_MAX_UNPACK_MB", "inf")
    assert edgerun(["verify", edb]) == 2
    assert "finite" in capsys.readouterr().err


def test_build_and_validate_as_two_fresh_containers_share_the_key_only_on_a_volume(trained_run, tmp_path, monkeypatch):
    """Each `docker run --rm` starts with an empty HOME: the key `build` made there is gone for `validate`; with the
    images' $EDGERUN_DEVICE_KEY on a volume it is not. And the images and their run lines say so."""
    from edgerun.runtime.engine_record import device_key_path
    from edgerun.runtime.trt import check_engine

    bundle = open_bundle(trained_run / "bundle")
    engine = tmp_path / "work" / "student.fp16.engine"
    engine.parent.mkdir()

    def container(name, volume=None):
        home = tmp_path / name
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        if volume:
            monkeypatch.setenv("EDGERUN_DEVICE_KEY", str(volume / "device.key"))
        else:
            monkeypatch.delenv("EDGERUN_DEVICE_KEY", raising=False)

    def build():
        cuda = FakeCuda()
        trt = make_fake_trt("8.2.1.8", cuda=cuda)
        build_engine(
            bundle, BuildSpec(precision="fp16", output=str(engine), gpu=NANO), trt=trt, log=lambda m: None, cuda=cuda
        )

    container("run1")
    build()
    container("run2")
    with pytest.raises(EdgerunError, match="no engine key"):
        check_engine(str(engine), bundle, engine_bytes=engine.read_bytes())
    volume = tmp_path / "edgerun-state"
    container("run3", volume)
    build()
    container("run4", volume)
    assert check_engine(str(engine), bundle, engine_bytes=engine.read_bytes())["engine_sha256"]
    assert device_key_path() == str(volume / "device.key")

    for name in ("Dockerfile.jetson-jp4", "Dockerfile.jetson-jp6"):
        assert "ENV EDGERUN_DEVICE_KEY=/var/lib/edgerun/device.key" in (ROOT / "docker" / name).read_text()
    readme = (ROOT / "docker" / "README.md").read_text().replace("\\\n", " ")
    runs = [line for line in readme.splitlines() if line.startswith("docker run") and "--engine" in line]
    assert runs and all("-v edgerun-state:/var/lib/edgerun" in line for line in runs)
    assert all(
        "-v edgerun-state:/var/lib/edgerun" in line
        for line in readme.splitlines()
        if line.startswith("docker run") and " build " in line
    )


def test_a_damaged_engine_record_or_key_is_an_error_not_a_traceback(trained_run, tmp_path, monkeypatch, capsys):
    engine = _login_engine(trained_run / "bundle", tmp_path / "login", monkeypatch)
    record = Path(str(engine) + ".json")
    good = record.read_text()
    for damaged in ("{not json", "[1, 2]"):
        record.write_text(damaged)
        assert edgerun(["verify", str(trained_run / "bundle"), "--engine", str(engine)]) == 2
        assert "record of engine" in capsys.readouterr().err
    record.write_text(good)
    assert edgerun(["verify", str(trained_run / "bundle"), "--engine", str(engine)]) == 0
    key = Path(os.environ["EDGERUN_DEVICE_KEY"])
    key.unlink()
    key.mkdir(mode=0o700)  # a folder where the key should be
    assert edgerun(["verify", str(trained_run / "bundle"), "--engine", str(engine)]) == 2
    assert "engine key" in capsys.readouterr().err


@needs_root
def test_release_staging_refuses_an_engine_the_installer_cannot_vouch_for(trained_run, world, tmp_path, monkeypatch):
    engine = _login_engine(trained_run / "bundle", tmp_path / "login", monkeypatch)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(os.urandom(32))
    other_key.chmod(0o600)
    job = release.ReleaseJob(
        name="line1",
        state_root=str(world / "state"),
        bundle=str(trained_run / "bundle"),
        engine=str(engine),
        user="nobody",
        installer_key=str(other_key),
    )
    with pytest.raises(EdgerunError, match="not sealed by this device's key"):
        release.stage(job)
    assert not (world / "state" / "line1" / "release" / "student.fp16.engine").exists()
