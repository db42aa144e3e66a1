"""The house's own checks: the import contracts (and that they catch a turned-round import), ruff's lint and format,
and the documentation site built strictly (a broken link or a missing page fails)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: ./scripts/setup_env.sh installs the test extra")
    return str(path)


def _lint_imports(cwd, env=None):
    return subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", out.stdout)
    assert kept and int(kept.group(1)) >= 5 and kept.group(2) == "0", out.stdout[-2000:]


@pytest.mark.parametrize(
    "module, line, broken",
    [
        # a module of the data wing importing a sibling that imports it: a cycle inside the wing
        ("edgedistill/data/images.py", "from edgedistill.data import folders  # noqa: F401", "no import cycle"),
        # the data wing importing the training wing above it
        (
            "edgedistill/data/splits.py",
            "from edgedistill.train import losses  # noqa: F401",
            "each wing imports only the wings below it",
        ),
        # the device side importing the workstation side
        ("jetson/edgerun/bench.py", "import edgedistill.errors  # noqa: F401", "never imports edgedistill"),
        # a pure module reaching for a file format
        ("edgedistill/judge/metrics.py", "import yaml  # noqa: F401", "stay pure"),
    ],
)
def test_the_contracts_catch_an_import_turned_round(tmp_path, module, line, broken):
    """A throwaway copy of both packages with one import turned round fails the contracts, naming the one it broke
    (a wing importing one above it breaks the layers and, since the other arrow exists, makes a cycle too)."""
    for part in ("edgedistill", "jetson/edgerun"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path, _env(tmp_path)).returncode == 0  # the copy itself keeps them
    target = tmp_path / module
    text = target.read_text()
    first_import = re.search(r"^(from|import) ", text, flags=re.M).start()
    target.write_text(text[:first_import] + line + "\n" + text[first_import:])
    out = _lint_imports(tmp_path, _env(tmp_path))
    assert out.returncode != 0
    assert "Broken contracts" in out.stdout, out.stdout[-3000:]
    assert broken in out.stdout.split("Broken contracts", 1)[1], out.stdout[-3000:]  # the one it broke is named


def _env(root):
    import os

    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "jetson")]))


def test_ruff_check_and_format_pass_on_the_whole_tree():
    check = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-4000:]
    fmt = subprocess.run(
        [_tool("ruff"), "format", "--no-cache", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout[-4000:]


def test_the_documentation_builds_strictly(tmp_path):
    """mkdocs build --strict: a broken link, a missing page or an API page whose module does not load fails."""
    out = subprocess.run(
        [_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "architecture" / "index.html").exists()
    reference = (tmp_path / "site" / "reference" / "edgerun" / "index.html").read_text()
    assert "CameraJob" in reference and "build_engine" in reference  # the API pages hold the docstrings


def test_no_issue_numbers_in_what_a_user_reads():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts for m in re.finditer(r"\b[Ii]ssue \d+", p.read_text())
    ]
    assert not found, found
