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
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert path.exists(), f"{' '.join(map(str, command + args))} never wrote {path}"


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
