"""Helpers shared by the benchmark scripts: machine facts and results tables with their command."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """This machine's CPU and cores; EDGEDISTILL_MACHINE names another (a table rendered from a device run)."""
    if os.environ.get("EDGEDISTILL_MACHINE"):
        return os.environ["EDGEDISTILL_MACHINE"]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.system()}"


def revision() -> str:
    """The git revision (dirty when code outside results/ changed); EDGEDISTILL_REVISION where there is no
    .git (a copy of the tree on another machine)."""
    import subprocess

    if os.environ.get("EDGEDISTILL_REVISION"):
        return os.environ["EDGEDISTILL_REVISION"]

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def mean_std(values: list[float], fmt: str = ".2f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def write_table(name: str, title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        f"- command: `{command()}`",
        f"- revision: {revision()}",
        f"- machine: {machine()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes] + [""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    return path


def load_rows(path: Path) -> list:
    """The finished rows of a resumable benchmark (one JSON object per line), [] before the first."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def append_row(path: Path, row: dict) -> None:
    """Record one finished row at once, so a killed benchmark resumes after it."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def resume(path: Path, key: str, wanted) -> tuple[dict, list]:
    """(finished rows of ``path`` by their ``key``, the ``wanted`` keys that have no row yet)."""
    done = {r[key]: r for r in load_rows(path)}
    return done, [w for w in wanted if w not in done]
