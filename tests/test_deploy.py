"""`edgedistill deploy` end to end against real OpenSSH servers on localhost: each "board" is a folder that an
sshd (a throwaway host key, a throwaway user key, a high port) puts every session in, with edgerun installed in
that board's own venv; ONNX Runtime stands in for TensorRT. Board A works, board B has no edgerun (broken on
purpose), board C trusts another signer; a fourth alias has no entry in known_hosts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import cv2
import pytest

from edgedistill.cli import main as edgedistill
from edgerun.bundle.bundle import open_bundle
from edgerun.preprocess import to_three_channels

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="needs the OpenSSH server and client (apt install openssh-server; .ci/run does)",
)
JETSON = Path(__file__).resolve().parent.parent / "jetson"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(str(path) + ".pub").read_text().strip()


def _board_venv(folder: Path) -> Path:
    """edgerun installed (not linked) into the board's own venv; numpy, OpenCV and onnxruntime come from this
    test's environment through a .pth file, as JetPack's come from the system site on a real board."""
    venv = folder / "edgedistill" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.strip()
    Path(site, "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(JETSON)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return venv / "bin" / "edgerun"


def _video(path: Path, bundle, n: int = 30) -> Path:
    images, _ = bundle.validation()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    for i in range(n):
        rgb = to_three_channels(cv2.resize(images[i % len(images)], (64, 64), interpolation=cv2.INTER_NEAREST))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _sshd(root: Path, name: str, ports: dict, host_key: Path, authorized: Path):
    """One sshd; ``ports``: {port: (board folder, extra environment)}; every session runs in its board's folder."""
    lines = [f"Port {p}" for p in ports] + [
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        f"PidFile {root / (name + '.pid')}",
    ]
    for port, (folder, env) in ports.items():
        exports = "".join(f"{k}={v}; export {k}; " for k, v in env.items())
        lines += [f"Match LocalPort {port}", f'    ForceCommand cd {folder} && {exports}eval "$SSH_ORIGINAL_COMMAND"']
    config = root / f"{name}.conf"
    config.write_text("\n".join(lines) + "\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # its privilege-separation folder
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(root / f"{name}.log", "w")
    )
    deadline = time.time() + 20
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("sshd did not start: " + (root / f"{name}.log").read_text()) from None
                time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def boards(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("boards")
    host_key, user_key = root / "host_key", root / "user_key"
    host_pub = _keygen(host_key)
    (root / "authorized_keys").write_text(_keygen(user_key) + "\n")
    folders = {b: root / b for b in ("a", "b", "c", "d")}
    for folder in folders.values():
        folder.mkdir()
    _board_venv(folders["a"])
    shutil.copytree(folders["a"] / "edgedistill", folders["c"] / "edgedistill", symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "edgedistill", "keygen", "-o", str(root / "other.key")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _video(folders["a"] / "line.avi", open_bundle(trained_run / "bundle"))
    # board D has no edgerun but a "system" Python with numpy and OpenCV (as JetPack's has): for --install
    system = folders["d"] / "system"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(system)], check=True)
    site = subprocess.run(
        [str(system / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.strip()
    Path(site, "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    port_a, port_b, port_c, port_d = _free_port(), _free_port(), _free_port(), _free_port()
    first = _sshd(
        root,
        "sshd1",
        {
            port_a: (folders["a"], {}),
            port_c: (folders["c"], {"EDGERUN_TRUST": root / "other.key.pub"}),
            port_d: (folders["d"], {"PATH": f"{system / 'bin'}:$PATH"}),
        },
        host_key,
        root / "authorized_keys",
    )
    second = _sshd(root, "sshd2", {port_b: (folders["b"], {})}, host_key, root / "authorized_keys")
    key_type, key_text = host_pub.split()[:2]
    (root / "known_hosts").write_text(
        "".join(f"[127.0.0.1]:{p} {key_type} {key_text}\n" for p in (port_a, port_b, port_c, port_d))
    )
    (root / "empty_known_hosts").write_text("")
    user = subprocess.run(["id", "-un"], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    config = []
    for alias, port, known in (
        ("board-a", port_a, "known_hosts"),
        ("board-b", port_b, "known_hosts"),
        ("board-c", port_c, "known_hosts"),
        ("board-d", port_d, "known_hosts"),
        ("board-stranger", port_a, "empty_known_hosts"),
    ):
        config += [
            f"Host {alias}",
            "    HostName 127.0.0.1",
            f"    Port {port}",
            f"    User {user}",
            f"    IdentityFile {user_key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {root / known}",
            "    GlobalKnownHostsFile /dev/null",
        ]
    (root / "ssh_config").write_text("\n".join(config) + "\n")
    yield {"root": root, "config": str(root / "ssh_config"), **folders}
    for proc in (first, second):
        proc.terminate()
        proc.wait(timeout=10)


def _deploy(boards, target, *hosts, extra=()):
    argv = [
        "deploy",
        str(target),
        "--precision",
        "onnxruntime",
        "--ssh-config",
        boards["config"],
        "--frame-size",
        "320x240",
    ]
    for host in hosts:
        argv += ["--host", host]
    return edgedistill(argv + list(extra))


def test_one_command_deploys_to_a_fleet_and_a_broken_board_is_a_row(boards, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    code = _deploy(
        boards,
        run,
        "board-a",
        "board-b",
        "board-stranger",
        extra=["--source", "line.avi", "--duration", "20", "--budget-mb", "4000"],
    )
    out = capsys.readouterr().out
    assert code == 1  # not every board passed
    fleet = json.loads((run / "devices" / "fleet.json").read_text())
    rows = {r["host"]: r for r in fleet["rows"]}
    a, b, stranger = rows["board-a"], rows["board-b"], rows["board-stranger"]
    assert a["status"] == "PASS", a["reason"]
    assert a["fps_p50"] > 0 and a["memory_mb"] > 0 and 0 < a["device_top1"] <= 1 and a["camera_fps"] > 0
    assert a["device_top1"] == pytest.approx(a["host_top1"], abs=0.01)  # the board's runner agrees with the host
    assert b["status"] == "ERROR" and "edgerun is not installed" in b["reason"]
    assert stranger["status"] == "UNREACHABLE" and "host key" in stranger["reason"]
    for name in ("info", "validate", "bench", "camera"):
        assert (run / "devices" / "board-a" / f"{name}.json").is_file()
    release = boards["a"] / "edgedistill" / "models" / "fast" / fleet["release"]["version"]
    assert (release / "bundle.edb").is_file()
    assert os.readlink(boards["a"] / "edgedistill" / "models" / "fast" / "current") == fleet["release"]["version"]
    table = (run / "devices" / "fleet.md").read_text()
    assert "| board-a | PASS |" in table and "| board-b | ERROR |" in table and "board-a | PASS" in out
    assert edgedistill(["report", str(run)]) == 0
    assert "Fleet (edgedistill deploy)" in (run / "report.md").read_text()
    # the way back: the frames the camera was unsure of, saved on the board, come home for the teacher to label
    on_board = release / "unsure"
    saved = len(list(on_board.glob("*.jpg")))
    assert (on_board / "index.csv").is_file() and saved == a_camera_unsure(run)
    capsys.readouterr()
    assert (
        edgedistill(["deploy", str(run), "--pull-frames", "--host", "board-a", "--ssh-config", boards["config"]]) == 0
    )
    pulled = run / "devices" / "board-a" / "unsure" / fleet["release"]["version"]
    assert (
        len(list(pulled.glob("*.jpg"))) == saved
        and (pulled / "index.csv").read_bytes() == (on_board / "index.csv").read_bytes()
    )
    printed = capsys.readouterr().out
    assert f"board-a: {saved} unsure frame(s) from 1 release(s)" in printed
    if saved:
        assert "--set data.unlabeled=" in printed
    # an anomaly detector's camera keeps its rejected frames with their map overlays (--save-maps): they come back
    # beside the unsure ones, each release's in its own folder
    on_board_maps = release / "maps"
    on_board_maps.mkdir()
    for i in range(3):
        (on_board_maps / f"{i:06d}.png").write_bytes(b"\x89PNG overlay %d" % i)
    (on_board_maps / "index.csv").write_text("frame,score,file\n")
    assert (
        edgedistill(["deploy", str(run), "--pull-frames", "--host", "board-a", "--ssh-config", boards["config"]]) == 0
    )
    pulled_maps = run / "devices" / "board-a" / "maps" / fleet["release"]["version"]
    assert sorted(p.name for p in pulled_maps.iterdir()) == ["000000.png", "000001.png", "000002.png", "index.csv"]
    assert "3 rejected frame(s) with their anomaly maps" in capsys.readouterr().out
    # again: the bundle is already there, nothing is copied twice
    assert _deploy(boards, run, "board-a") == 0
    again = json.loads((run / "devices" / "fleet.json").read_text())["rows"][0]
    assert {"step": "copy", "rc": 0, "note": "already on the board"} in again["steps"]
    assert again.get("camera_fps") is None  # no --source this time: the last camera run is not reported again


def a_camera_unsure(run):
    """How many frames board a's camera run reported saving (its camera.json, fetched by deploy)."""
    return json.loads((run / "devices" / "board-a" / "camera.json").read_text())["unsure"]["saved"]


def test_a_new_release_becomes_current_and_rollback_restores_the_previous(boards, trained_run, tmp_path, capsys):
    from edgerun.bundle.manifest import write_manifest

    first = tmp_path / "first"
    shutil.copytree(trained_run, first)
    assert _deploy(boards, first, "board-a") == 0
    v1 = json.loads((first / "devices" / "fleet.json").read_text())["release"]["version"]
    second = tmp_path / "second"
    shutil.copytree(trained_run, second)
    data = json.loads((second / "bundle" / "manifest.json").read_text())
    write_manifest(second / "bundle", dict(data, created="2030-01-01T00:00:00+00:00"))
    assert _deploy(boards, second, "board-a") == 0
    v2 = json.loads((second / "devices" / "fleet.json").read_text())["release"]["version"]
    models = boards["a"] / "edgedistill" / "models" / "fast"
    assert v1 != v2 and os.readlink(models / "current") == v2 and os.readlink(models / "previous") == v1
    capsys.readouterr()
    assert (
        edgedistill(["deploy", str(second), "--rollback", "--host", "board-a", "--ssh-config", boards["config"]]) == 0
    )
    assert f"current {v1}, previous {v2}" in capsys.readouterr().out
    assert os.readlink(models / "current") == v1 and (models / v2 / "bundle.edb").is_file()  # kept


def test_a_board_that_trusts_another_key_is_refused_before_copying(boards, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert _deploy(boards, run, "board-c") == 1
    row = json.loads((run / "devices" / "fleet.json").read_text())["rows"][0]
    assert row["status"] == "REFUSED" and "unsigned" in row["reason"] and "nothing was copied" in row["reason"]
    assert not (boards["c"] / "edgedistill" / "models").exists()


def test_install_copies_edgerun_and_runs_it_with_the_boards_own_python(boards, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert _deploy(boards, run, "board-d") == 1  # nothing there yet
    assert "edgerun is not installed" in json.loads((run / "devices" / "fleet.json").read_text())["rows"][0]["reason"]
    assert _deploy(boards, run, "board-d", extra=["--install"]) == 0
    row = json.loads((run / "devices" / "fleet.json").read_text())["rows"][0]
    assert (
        row["status"] == "PASS"
        and row["edgerun"]
        and {"step": "install", "rc": 0, "where": "edgedistill/bin/edgerun"} in row["steps"]
    )
    lib = boards["d"] / "edgedistill" / "lib" / "edgerun"
    assert (lib / "cli" / "__main__.py").is_file() and (lib / "bundle" / "slots.py").is_file()  # every wing
    assert (boards["d"] / "edgedistill" / "bin" / "edgerun").stat().st_mode & 0o111


# --- what a board (or whoever controls it) can get wrong: each a row, never a PASS on no evidence ---------------


def _fake_edgerun(board: Path, name: str, when: str, then: str) -> str:
    """A launcher on the board that runs the real edgerun, except for the subcommand ``when``, where it runs the
    shell ``then`` (with $results: the folder of that command's --json file). Returns its path for --edgerun."""
    script = board / name
    script.write_text(
        "#!/bin/sh\n"
        'results=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "--json" ] && results=$(dirname "$a"); prev=$a; done\n'
        f'if [ "$1" = {when} ]; then\n{then}\nfi\n'
        'exec "$(pwd)/edgedistill/venv/bin/edgerun" "$@"\n'
    )
    script.chmod(0o755)
    return f"./{name}"


def _row(run: Path) -> dict:
    return json.loads((run / "devices" / "fleet.json").read_text())["rows"][0]


def _current(boards) -> str:
    link = boards["a"] / "edgedistill" / "models" / "fast" / "current"
    return os.readlink(link) if os.path.islink(link) else ""


def _fresh_run(trained_run, tmp_path, created: str) -> Path:
    """A copy of the run whose bundle is a release of its own (another manifest, so another version)."""
    from edgerun.bundle.manifest import write_manifest

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = json.loads((run / "bundle" / "manifest.json").read_text())
    write_manifest(run / "bundle", dict(data, created=created))
    return run


def test_a_validation_that_crashed_is_a_fail_and_nothing_is_activated(boards, trained_run, tmp_path):
    run = _fresh_run(trained_run, tmp_path, "2031-01-01T00:00:00+00:00")
    before = _current(boards)
    crash = _fake_edgerun(
        boards["a"], "crash-validate", "validate", 'echo "Traceback (most recent call last):" >&2; exit 1'
    )
    assert _deploy(boards, run, "board-a", extra=["--edgerun", crash]) == 1
    row = _row(run)
    assert row["status"] == "FAIL" and "no validate.json" in row["reason"] and "exited 1" in row["reason"]
    assert row["active"] is None and _current(boards) == before  # the line keeps the release it had


def test_a_bundle_planted_in_the_release_folder_is_replaced_not_trusted(boards, trained_run, tmp_path):
    run = _fresh_run(trained_run, tmp_path, "2032-01-01T00:00:00+00:00")
    version = open_bundle(str(run / "bundle")).manifest_sha256[:16]
    planted = boards["a"] / "edgedistill" / "models" / "fast" / version / "bundle.edb"
    planted.parent.mkdir(parents=True)
    shutil.copy(trained_run / "bundle.edb" if (trained_run / "bundle.edb").exists() else _any_edb(trained_run), planted)
    assert _deploy(boards, run, "board-a") == 0
    row = _row(run)
    copy = next(s for s in row["steps"] if s["step"] == "copy")
    assert "replaced a different bundle.edb" in copy["note"] and copy["bytes"] > 0
    assert open_bundle(str(planted)).manifest_sha256[:16] == version  # the board now holds this release


def _any_edb(run: Path) -> Path:
    """Another release's .edb (the trained run packed as it is) to plant."""
    from edgerun.bundle.bundle import pack_bundle

    return Path(pack_bundle(str(run / "bundle"), str(run.parent / f"planted-{run.name}.edb")))


def test_a_model_name_or_host_alias_that_climbs_out_is_refused(boards, trained_run, tmp_path, capsys):
    from edgedistill.deploy.release import host_slug
    from edgerun.bundle.manifest import write_manifest

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = json.loads((run / "bundle" / "manifest.json").read_text())
    write_manifest(run / "bundle", dict(data, name="../escaped"))
    assert _deploy(boards, run, "board-a") == 2
    assert "cannot name a folder on the boards" in capsys.readouterr().err
    assert not (boards["a"] / "edgedistill" / "escaped").exists() and not (run / "devices").exists()
    for alias in ("..", ".", "../x", "a/../../b"):
        slug = host_slug(alias)
        assert "/" not in slug and slug not in (".", "..") and not slug.startswith(".")


@pytest.mark.parametrize(
    "forged",
    ["[1, 2]", '{"status": "PASS", "result": {"throughput_fps": "999"}}', '{"verdict": {"overall": "PASSED"}}'],
)
def test_a_forged_or_malformed_result_is_that_boards_fail_and_the_fleet_keeps_its_rows(
    boards, trained_run, tmp_path, forged
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    forge = _fake_edgerun(
        boards["a"],
        "forge-bench",
        "bench",
        f'"$(pwd)/edgedistill/venv/bin/edgerun" "$@"; printf \'%s\' \'{forged}\' > "$results/bench.json"; exit 0',
    )
    assert _deploy(boards, run, "board-a", "board-b", extra=["--edgerun", forge]) == 1
    rows = {r["host"]: r for r in json.loads((run / "devices" / "fleet.json").read_text())["rows"]}
    a = rows["board-a"]
    assert a["status"] == "FAIL" and "bench.json from the board is malformed" in a["reason"], a["reason"]
    assert a["active"] is None and a.get("fps") is None  # a string "999" is not a figure
    assert rows["board-b"]["status"] == "ERROR"  # the other board's row is still there


def test_a_hung_step_is_stopped_here_and_on_the_board(boards, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    pidfile = boards["a"] / "hung.pid"
    hang = _fake_edgerun(boards["a"], "hang-bench", "bench", f"sleep 300 & echo $! > {pidfile}; wait; exit 0")
    started = time.monotonic()
    assert _deploy(boards, run, "board-a", extra=["--edgerun", hang, "--step-timeout", "8"]) == 1
    assert time.monotonic() - started < 120
    row = _row(run)
    assert row["status"] == "ERROR" and "did not finish in 8 s" in row["reason"] and row["active"] is None
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.3)
    assert not _alive(pid), "the board's command kept running after deploy gave up on it"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_results_past_the_cap_are_refused_while_they_arrive(boards, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flood = _fake_edgerun(boards["a"], "flood-bench", "bench", 'head -c 3000000 /dev/urandom > "$results/flood.bin"')
    assert _deploy(boards, run, "board-a", extra=["--edgerun", flood, "--max-result-mb", "1"]) == 1
    row = _row(run)
    assert row["status"] == "ERROR" and "holds more than 1 MB; nothing copied" in row["reason"]
    assert not list((run / "devices" / "board-a").glob("flood.bin"))


def test_a_registered_version_deploys_and_carries_each_boards_verdict(boards, trained_run, mlflow_server, tmp_path):
    """`deploy models:/NAME/1`: the registered .edb fetched (its sha256 checked), deployed, and board A's PASS with
    its FPS and memory written back as tags on that version."""
    pytest.importorskip("mlflow", reason="MLflow is the [tracking] extra")
    import yaml
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    resolved.update(output=str(run), tracking={"mlflow": {"uri": mlflow_server, "experiment": "deploy-test"}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(resolved))
    assert edgedistill(["export", str(recipe), "--register", "line-a"]) == 0
    out = tmp_path / "results"
    code = _deploy(boards, "models:/line-a/1", "board-a", extra=["--tracking-uri", mlflow_server, "--output", str(out)])
    assert code == 0
    [fetched] = (out / "registry" / "line-a" / "v1").rglob("*.edb")
    assert fetched.read_bytes() == (run / "line-a.edb").read_bytes()
    row = json.loads((out / "fleet.json").read_text())["rows"][0]
    tags = MlflowClient(mlflow_server).get_model_version("line-a", "1").tags
    assert tags["deploy.board-a.status"] == "PASS" and float(tags["deploy.board-a.fps_p50"]) == pytest.approx(
        row["fps_p50"]
    )
    assert float(tags["deploy.board-a.memory_mb"]) == pytest.approx(row["memory_mb"])
