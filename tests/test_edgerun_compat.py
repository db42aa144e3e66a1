"""The device side stays Python 3.6 compatible and never imports torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JETSON = Path(__file__).resolve().parents[1] / "jetson"


def test_vermin_finds_nothing_newer_than_python_3_6():
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.fail("vermin is not installed: pip install vermin")
    out = subprocess.run(
        [
            vermin,
            "-q",
            "-t=3.6-",
            "--no-tips",
            "--violations",
            "--eval-annotations",
            "--backport",
            "typing",
            str(JETSON),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_edgerun_imports_with_torch_unimportable(tmp_path):
    """A 'torch' that raises on import shadows the real one; every edgerun module must still import."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch must not be imported on the device')\n")
    modules = sorted(p.stem for p in (JETSON / "edgerun").glob("*.py") if p.stem != "__main__")
    code = "import importlib\n" + "".join(f"importlib.import_module('edgerun.{m}')\n" for m in modules)
    code += "import sys; assert 'torch' not in sys.modules\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{JETSON}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr


def test_jetson_package_does_not_pull_pip_opencv():
    setup = (JETSON / "setup.py").read_text()
    assert "opencv" not in setup.split("install_requires")[1].split("]")[0]
