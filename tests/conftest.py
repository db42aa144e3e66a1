"""Shared fixtures: small real data (scikit-learn's digits) and fast recipes for end-to-end runs."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fake_tensorrt.py
os.environ.setdefault("EDGEDISTILL_CACHE", str(Path(__file__).resolve().parent / ".cache"))
# the engine-record key of this "device" (edgerun/runtime/engine_record.py), never the user's own
os.environ.setdefault("EDGERUN_DEVICE_KEY", str(Path(__file__).resolve().parent / ".cache" / "device.key"))


def digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 255 / 16).astype(np.uint8), d.target


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """Real handwritten digits written as PNG/JPEG class folders: train/ (25 per class) and val/ (8 per class)."""
    root = tmp_path_factory.mktemp("digits-folder")
    images, labels = digits_arrays()
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        for split, chosen in (("train", idx[:25]), ("val", idx[25:33])):
            folder = root / split / f"digit{cls}"
            folder.mkdir(parents=True)
            for n, i in enumerate(chosen):
                big = cv2.resize(images[i], (24, 24), interpolation=cv2.INTER_NEAREST)
                ext = ".png" if n % 2 else ".jpg"
                cv2.imwrite(str(folder / f"{i}{ext}"), big)  # grayscale files: models still see RGB
    return root


FAST = {
    "name": "fast",
    "seed": 0,
    "data": {
        "source": "digits",
        "image_size": 16,
        "batch_size": 32,
        "train_per_class": 50,
        "val_per_class": 10,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "augment": {"hflip": 0.0, "scale": [0.8, 1.0]},
    },
    "teacher": {"model": "resnet10t", "epochs": 3, "lr": 0.003, "min_top1": 0.0},
    "student": {"model": "mobilenetv3_small_050", "epochs": 6, "lr": 0.005},
    "evaluate": {"latency_repeats": 3, "latency_warmup": 1, "latency_batch": 4},
    "export": {"calib_samples": 32, "val_samples": 50, "parity_samples": 32},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_recipe(tmp_path):
    def _make(extra: dict | None = None, name: str = "recipe.yaml") -> Path:
        data = deep_update(FAST, {"output": str(tmp_path / "run")})
        data = deep_update(data, extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return _make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One full run (every stage, export included) on real digits, shared by export and device tests."""
    from edgedistill.cli import main

    folder = tmp_path_factory.mktemp("trained")
    data = deep_update(FAST, {"output": str(folder / "run"), "export": {"target": "jetson-nano-jp4"}})
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe)]) == 0
    return folder / "run"


def _descendants(pid: int) -> list[int]:
    """Every process started under ``pid`` (torchrun puts its workers in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_when_written(args: list, path: Path, timeout: float = 300, command: Optional[list] = None) -> None:
    """Run ``edgedistill ARGS`` (after ``command``: torchrun's, say) in a child process and SIGKILL it and every
    process under it as soon as ``path`` exists (a checkpoint)."""
    command = command or [sys.executable, "-m", "edgedistill"]
    proc = subprocess.Popen(
        [*command, *args],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)
    assert path.exists(), f"{' '.join(map(str, command + args))} never wrote {path}"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child process and every process under it (a power cut, as the run sees it)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# torchrun launching two processes of `python -m edgedistill` on this machine (gloo on CPU)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edgedistill"]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def image_tensor(images: np.ndarray):
    """uint8 RGB images (N, H, W, 3) as the ImageNet-normalised float tensor (N, 3, H, W) a teacher takes."""
    import torch

    return torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)


@pytest.fixture
def world():
    """A folder every account can traverse (pytest's tmp folders are 0700 to root), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="edgerun-service-"))
    folder.chmod(0o755)
    (folder / "units").mkdir()
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def reachable_python():
    """This machine's interpreter lives under /root (0700), where no service account reaches (a Jetson's
    /usr/bin/python3 is reachable): the folders on its way get o+x (enter, not list) for the test, then their
    modes back."""
    changed = []
    for target in {os.path.realpath(sys.executable), os.path.realpath(sys.prefix)}:
        for folder in Path(target).parents:
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
    yield
    for folder, mode in changed:
        folder.chmod(mode)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact folder, served by the server) on a free
    loopback port, for the session; its URI."""
    pytest.importorskip("mlflow", reason="MLflow is the [tracking] extra (scripts/setup_env.sh installs it)")
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server ended: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"mlflow server did not answer on {uri}: {(root / 'server.log').read_text()[-2000:]}")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _postgres_bin(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL (Debian's package) in a scratch data folder on a free loopback port, trust auth, one
    database; its URL. Skipped, saying why, where the server is not installed."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("needs PostgreSQL's server (apt install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="psycopg is the [tune] extra's PostgreSQL driver")
    folder = Path(tempfile.mkdtemp(prefix="edgedistill-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: as Debian's postgres account
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' account to run PostgreSQL as")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "-l", str(folder / "log"),
         "-w", "start"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE tune")
    yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], stdout=subprocess.DEVNULL)
    shutil.rmtree(folder, ignore_errors=True)
