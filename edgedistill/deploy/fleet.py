"""`edgedistill deploy`: from a run (or an .edb) to one board or a fleet, over OpenSSH, in one command.

For each board, in parallel: ask edgerun there for its version, device and trust set (a board that trusts other
keys refuses this bundle before anything is copied), copy the bundle into a versioned release folder, verify it,
build the engine (or reuse the one already built from the same bundle), validate, bench on camera-size frames and,
with a source, run the camera; pull the JSON results into ``<run>/devices/<host>/`` and switch the board's
``current`` link to the release when its verdict is PASS. One failing board is a row with its status and reason,
never an abort. The layout on the board is edgerun's (:mod:`edgerun.bundle.slots`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from edgedistill.deploy.board import Board
from edgedistill.deploy.release import DeployOptions, Release, host_slug, prepare_release
from edgedistill.deploy.ssh import RemoteError, SshError, quote
from edgedistill.errors import EdgedistillError
from edgerun.line.release import MAPS, UNSURE

log = logging.getLogger("edgedistill")


def fleet_table(rows: Sequence[dict], budget_mb: Optional[float] = None) -> list[str]:
    """Markdown lines: one row per board."""

    def num(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    head = [
        "board",
        "status",
        "device",
        "JetPack (L4T) / TensorRT",
        "FPS p50 / p99",
        "memory MB" + (f" (budget {budget_mb:.0f})" if budget_mb else ""),
        "power W",
        "top-1 on device (host)",
        "reason",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        top1 = (
            "–"
            if r.get("device_top1") is None
            else f"{100 * r['device_top1']:.2f}%"
            + ("" if r.get("host_top1") is None else f" ({100 * r['host_top1']:.2f}%)")
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["host"],
                    r["status"],
                    str(r.get("board") or "–"),
                    f"{r.get('l4t') or '–'} / {r.get('tensorrt') or '–'}",
                    f"{num(r.get('fps_p50'))} / {num(r.get('fps_p99'))}",
                    num(r.get("memory_mb"), "{:.0f}"),
                    num(None if r.get("power_mw") is None else r["power_mw"] / 1000.0, "{:.2f}"),
                    top1,
                    (r.get("reason") or "").replace("|", "/"),
                ]
            )
            + " |"
        )
    return lines


def deploy(
    path: Path,
    hosts: Sequence[str],
    opts: DeployOptions,
    out_dir: Optional[Path] = None,
    sign_key: Optional[str] = None,
    passphrase: Optional[str] = None,
) -> dict:
    """Deploy to every host; returns {'release', 'rows', 'fleet_json', 'fleet_md'} (rows in the hosts' order)."""
    if not hosts:
        raise EdgedistillError("deploy needs at least one --host user@board")
    with tempfile.TemporaryDirectory(prefix="edgedistill-deploy-") as tmp:
        release = prepare_release(Path(path), Path(tmp), sign_key, passphrase)
        run_dir = Path(path) if Path(path).is_dir() and (Path(path) / "bundle").is_dir() else None
        out_dir = Path(out_dir) if out_dir else (run_dir or Path("runs") / release.name) / "devices"
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("deploying %s release %s to %d board(s)", release.name, release.version, len(hosts))
        boards = [Board(h, release, opts, out_dir) for h in hosts]
        with ThreadPoolExecutor(max_workers=min(opts.jobs, len(boards))) as pool:
            rows = [r.as_dict() for r in pool.map(Board.deploy, boards)]
    table = fleet_table(rows, opts.budget_mb)
    fleet = {
        "release": {
            "name": release.name,
            "version": release.version,
            "manifest_sha256": release.manifest_sha256,
            "signer": release.signer,
        },
        "precision": opts.precision,
        "source": opts.source,
        "rows": rows,
    }
    (out_dir / "fleet.json").write_text(json.dumps(fleet, indent=2, default=str))
    (out_dir / "fleet.md").write_text("\n".join(table) + "\n")
    fleet.update(table=table, refit=refit_planner(rows, release, opts), fleet_json=str(out_dir / "fleet.json"))
    return fleet


def refit_planner(rows: Sequence[dict], release: Release, opts: DeployOptions) -> list[str]:
    """Let the planner's per-board factors learn from the engines just measured (as `plan --calibrate` does)."""
    if opts.precision == "onnxruntime":
        return ["planner not refit: ONNX Runtime runs measure no TensorRT engine"]
    from edgedistill.plan.measured import refit_from_measured

    notes = []
    by_profile: dict[str, list[str]] = {}
    for row in rows:
        bench = [f for f in row.get("files", []) if f.endswith("bench.json")]
        if row["status"] in ("PASS", "FAIL") and bench and row.get("profile"):
            by_profile.setdefault(row["profile"], []).extend(bench)
    for profile, files in by_profile.items():
        try:
            refit = refit_from_measured(profile, files)
            notes.append(f"planner refit for {profile} with {len(files)} board(s): factors {refit['source']}")
        except (EdgedistillError, KeyError, ValueError) as exc:
            notes.append(f"planner not refit for {profile}: {exc}")
    return notes


def pull_frames(hosts: Sequence[str], name: str, opts: DeployOptions, out_dir: Path) -> list[dict]:
    """Fetch what each board's camera kept for the way back, every release of ``name`` under the deploy root: the
    frames a classifier was unsure of (``--save-unsure``) into ``out_dir/<board>/unsure/<release>/`` and an anomaly
    detector's rejected frames with their map overlays (``--save-maps``) into ``out_dir/<board>/maps/<release>/``,
    each with its index.csv. Rows: {host, status, releases, frames, maps, folder} or {host, status: ERROR, reason}."""
    rows = []
    for host in hosts:
        board = Board(host, Release(Path("-"), name, "0" * 16, "", None, None), opts, out_dir)
        local = Path(out_dir) / host_slug(board.ssh.dest)
        try:
            counts, releases = {}, set()
            for kind, suffix in ((UNSURE, ".jpg"), (MAPS, ".png")):
                found = _saved_folders(board, name, kind)
                releases |= set(found)
                counts[kind] = 0
                for version, folder in found.items():
                    written = board.ssh.fetch_tree(folder, local / kind / version)
                    counts[kind] += sum(1 for p in written if p.suffix.lower() == suffix)
            rows.append(
                {
                    "host": host,
                    "status": "DONE",
                    "releases": len(releases),
                    "frames": counts[UNSURE],
                    "maps": counts[MAPS],
                    "folder": str(local / UNSURE),
                    "maps_folder": str(local / MAPS),
                }
            )
        except (SshError, RemoteError) as exc:
            rows.append({"host": host, "status": "ERROR", "reason": str(exc)})
    return rows


def _saved_folders(board: Board, name: str, kind: str) -> dict[str, str]:
    """release -> its ``kind`` folder on the board; the current/previous links are not releases of their own."""
    listing = board.ssh.run(f"ls -d {quote(board.root + '/models/' + name)}/*/{kind} 2>/dev/null; true")
    found = {}
    for line in listing.stdout.decode("utf-8", "replace").splitlines():
        parts = line.rstrip("/").split("/")
        if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{16}", parts[-2]):
            found[parts[-2]] = line
    return found


def rollback(hosts: Sequence[str], name: str, opts: DeployOptions) -> list[dict]:
    """Switch each board's `current` release of ``name`` back to its previous one."""
    rows = []
    for host in hosts:
        board = Board(host, Release(Path("-"), name, "0" * 16, "", None, None), opts, Path("."))
        try:
            board.probe()
            done = board.step("rollback", board.edgerun_cmd("slot", "rollback", name, "--root", board.root))
            rows.append({"host": host, "status": "DONE", **json.loads(done.stdout.decode())})
        except (SshError, RemoteError, EdgedistillError, ValueError) as exc:
            rows.append({"host": host, "status": "ERROR", "reason": str(exc)})
    return rows
