"""`edgedistill deploy`: from a run (or an .edb) to one board or a fleet, over OpenSSH, in one command.

For each board, in parallel: ask edgerun there for its version, device and trust set (a board that trusts other
keys refuses this bundle before anything is copied), copy the bundle into a versioned release folder, verify it,
build the engine (or reuse the one already built from the same bundle), validate, bench on camera-size frames and,
with a source, run the camera; pull the JSON results into ``<run>/devices/<host>/`` and switch the board's
``current`` link to the release when its verdict is PASS. One failing board is a row with its status and reason,
never an abort. The layout on the board is edgerun's (:mod:`edgerun.slots`).
"""
from __future__ import annotations

import json
import logging
import re
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import EdgedistillError
from .ssh import RemoteError, SshError, SshHost, quote

log = logging.getLogger("edgedistill")

BACKENDS = ("fp16", "int8", "fp32", "onnxruntime")  # a TensorRT engine's precision, or no engine at all


@dataclass
class DeployOptions:
    precision: str = "fp16"
    source: Optional[str] = None  # a camera for `edgerun camera` (csi://0, usb://0, rtsp://..., a file there)
    duration: float = 30.0
    fps_target: Optional[float] = None
    budget_mb: Optional[float] = None
    frame_size: Optional[str] = None
    max_drop: Optional[float] = None
    jobs: int = 4
    remote_dir: str = "edgedistill"  # relative to the login's home
    edgerun: Optional[str] = None  # the command on the board; default: <remote_dir>/venv/bin/edgerun, else PATH's
    ssh_config: Optional[str] = None
    ssh_options: Sequence[str] = ()
    activate: str = "pass"  # pass: switch `current` only on a PASS; always; never
    install: bool = False  # copy this checkout's edgerun to <remote_dir>/lib with a launcher <remote_dir>/bin/edgerun
    remote_python: str = "python3"  # the board's Python (JetPack's, with its numpy, OpenCV and TensorRT)
    timeout: float = 3600.0

    def __post_init__(self):
        if self.precision not in BACKENDS:
            raise EdgedistillError(f"--precision {self.precision}: choose one of {', '.join(BACKENDS)}")
        if self.activate not in ("pass", "always", "never"):
            raise EdgedistillError(f"--activate {self.activate}: choose pass, always or never")
        if self.jobs < 1:
            raise EdgedistillError("--jobs must be at least 1")


@dataclass
class Release:
    """The bundle being deployed: its .edb, model name, release version and signer."""

    edb: Path
    name: str
    version: str
    manifest_sha256: str
    signer: Optional[str]
    target: Optional[str]


@dataclass
class BoardRow:
    host: str
    status: str = "ERROR"  # PASS, FAIL, REFUSED (trust), ERROR (unreachable, edgerun missing, a command failed)
    reason: str = ""
    facts: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    files: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"host": self.host, "status": self.status, "reason": self.reason, **self.facts, "steps": self.steps,
                "files": self.files}


UNSURE = "unsure"  # frames the camera was unsure of, per release on the board (edgerun camera --save-unsure)


def host_slug(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", host).strip("_") or "host"


def prepare_release(path: Path, workdir: Path, sign_key: Optional[str] = None,
                    passphrase: Optional[str] = None) -> Release:
    """An .edb as given, or the run's bundle packed (and signed with ``sign_key``) into ``workdir``."""
    from edgerun.bundle import open_bundle, pack_bundle
    from edgerun.signing import read_signature

    path = Path(path)
    if path.is_dir():
        folder = path / "bundle" if (path / "bundle" / "manifest.json").is_file() else path
        if not (folder / "manifest.json").is_file():
            raise EdgedistillError(f"{path}: neither a run folder with bundle/ nor a bundle folder: export it first "
                                   "(edgedistill export RECIPE)")
        edb = Path(pack_bundle(str(folder), str(workdir / "bundle.edb"), sign_key=sign_key, passphrase=passphrase))
    elif path.is_file():
        if sign_key:
            raise EdgedistillError(f"--sign applies to a run or bundle folder; {path} is already packed (sign it "
                                   "with edgedistill pack --sign)")
        edb = path
    else:
        raise EdgedistillError(f"{path} does not exist: give a run folder (runs/<name>) or an .edb")
    bundle = open_bundle(str(edb))
    record = read_signature(bundle.folder)
    return Release(edb=edb, name=bundle.manifest.data["name"], version=bundle.manifest_sha256[:16],
                   manifest_sha256=bundle.manifest_sha256, signer=(record or {}).get("key_id"),
                   target=bundle.manifest.data.get("target"))


class Board:
    """One board's deploy: every remote step through ``edgerun`` there, each one recorded."""

    def __init__(self, host: str, release: Release, opts: DeployOptions, out_dir: Path):
        self.ssh = SshHost(host, config=opts.ssh_config, options=opts.ssh_options)
        self.release, self.opts, self.out = release, opts, out_dir
        self.row = BoardRow(host=host)
        self.root = opts.remote_dir.rstrip("/") or "."
        self.folder = f"{self.root}/models/{release.name}/{release.version}"
        self.edgerun = opts.edgerun

    def step(self, what: str, command: str, ok_codes=(0,), timeout: Optional[float] = None):
        done = self.ssh.run(command, timeout=timeout or self.opts.timeout, check=False)
        self.row.steps.append({"step": what, "rc": done.returncode})
        if done.returncode not in ok_codes:
            err = done.stderr.decode("utf-8", "replace").strip()
            raise RemoteError(f"{what}: {err.splitlines()[-1] if err else 'exit %d' % done.returncode}",
                              done.returncode, err)
        return done

    def edgerun_cmd(self, *words: str) -> str:
        return quote(self.edgerun, *words)

    def find_edgerun(self) -> Optional[str]:
        """The board's edgerun: the one deploy installed, a venv's under the root, else PATH's."""
        ours, venv = f"{self.root}/bin/edgerun", f"{self.root}/venv/bin/edgerun"
        found = self.ssh.run(f"if [ -x {quote(ours)} ]; then echo {quote(ours)}; elif [ -x {quote(venv)} ]; then "
                             f"echo {quote(venv)}; else command -v edgerun; fi", check=False)
        return found.stdout.decode().strip() if found.returncode == 0 else None

    def install(self) -> str:
        """edgerun is pure Python: its package goes to <root>/lib, a launcher to <root>/bin/edgerun, run by the
        board's own Python (JetPack's numpy, OpenCV, TensorRT stay the ones imported; nothing is downloaded)."""
        import edgerun

        package = Path(edgerun.__file__).resolve().parent
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "edgerun.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(str(package), arcname="edgerun",
                        filter=lambda m: None if "__pycache__" in m.name or m.name.endswith(".pyc") else m)
            self.ssh.put(archive, f"{self.root}/lib/edgerun.tar")
        launcher = ("#!/bin/sh\n# written by edgedistill deploy --install\n"
                    "here=$(cd \"$(dirname \"$0\")/..\" && pwd)\n"
                    f"PYTHONPATH=\"$here/lib${{PYTHONPATH:+:$PYTHONPATH}}\" exec {quote(self.opts.remote_python)} "
                    "-m edgerun.cli \"$@\"\n")
        lib, new = f"{self.root}/lib", f"{self.root}/lib/edgerun.new"
        self.step("install", f"rm -rf {quote(new)} && mkdir -p {quote(new)} && tar -C {quote(new)} -xf "
                             f"{quote(lib + '/edgerun.tar')} && rm -rf {quote(lib + '/edgerun')} && mv "
                             f"{quote(new + '/edgerun')} {quote(lib + '/edgerun')} && rm -rf {quote(new)} "
                             f"{quote(lib + '/edgerun.tar')} && mkdir -p {quote(self.root + '/bin')}")
        self.ssh.run(f"cat > {quote(self.root + '/bin/edgerun')} && chmod +x {quote(self.root + '/bin/edgerun')}",
                     stdin=launcher.encode())
        check = self.ssh.run(f"{quote(self.opts.remote_python)} -c 'import numpy, cv2' 2>&1", check=False)
        if check.returncode != 0:
            raise EdgedistillError(f"edgerun is installed in {self.root}/lib, but {self.opts.remote_python} on the board "
                                   f"cannot import numpy and OpenCV ({check.stdout.decode().strip().splitlines()[-1:]}):"
                                   " JetPack provides both (sudo apt install python3-numpy python3-opencv); pip's "
                                   "opencv-python lacks GStreamer")
        self.row.steps.append({"step": "install", "rc": 0, "where": f"{self.root}/bin/edgerun"})
        return f"{self.root}/bin/edgerun"

    def probe(self) -> dict:
        """The edgerun command, its version and the device's facts and trust set (edgerun info --json)."""
        if not self.edgerun:
            self.edgerun = self.install() if self.opts.install else self.find_edgerun()
            if not self.edgerun:
                raise EdgedistillError(f"edgerun is not installed on {self.ssh.dest} (not in {self.root}/bin, "
                                       f"{self.root}/venv/bin nor on PATH): pass --install to copy it there, or "
                                       "pip3 install ./jetson on the board, or name it with --edgerun CMD")
        info = json.loads(self.step("info", self.edgerun_cmd("info", "--json")).stdout.decode())
        self.row.facts.update({"board": info.get("board"), "l4t": info.get("l4t"), "tensorrt": info.get("tensorrt"),
                               "edgerun": info.get("edgerun"), "python": info.get("python"),
                               "profile": info.get("profile")})
        return info

    def check_versions(self, info: dict) -> None:
        from edgerun import __version__ as here
        from edgerun.profiles import parse_version

        there = info.get("edgerun")
        if there is None:
            raise EdgedistillError(f"the edgerun on {self.ssh.dest} predates `info`'s version field: update it "
                                   f"(pip3 install ./jetson from this checkout, edgerun {here})")
        if parse_version(there) < parse_version(here):
            raise EdgedistillError(f"edgerun {there} on {self.ssh.dest} is older than {here} here, which made the "
                                   "bundle: update it (--install, or pip3 install ./jetson from this checkout)")

    def check_trust(self, info: dict) -> None:
        """Say before copying what the board's trust set would say after."""
        if info.get("trust_error"):
            raise EdgedistillError(f"the board's trust set is unusable: {info['trust_error']}")
        trust = info.get("trust")
        if not trust:
            return
        keys = trust.get("key_ids") or []
        if self.release.signer is None:
            self.row.status = "REFUSED"
            raise EdgedistillError(f"the board trusts keys {', '.join(keys)} ({trust['source']}) and this bundle is "
                                   "unsigned: deploy the run with --sign KEY (nothing was copied)")
        if self.release.signer not in keys:
            self.row.status = "REFUSED"
            raise EdgedistillError(f"the board trusts keys {', '.join(keys)} ({trust['source']}), not {self.release.signer}"
                                   " that signed this bundle: add its KEY.pub there, or sign with a trusted key "
                                   "(nothing was copied)")

    def copy(self) -> str:
        edb = f"{self.folder}/bundle.edb"
        if self.ssh.exists(edb):
            self.row.steps.append({"step": "copy", "rc": 0, "note": "already on the board"})
        else:
            self.ssh.put(self.release.edb, edb, timeout=self.opts.timeout)
            self.row.steps.append({"step": "copy", "rc": 0, "bytes": self.release.edb.stat().st_size})
        return edb

    def build(self, edb: str) -> Optional[str]:
        if self.opts.precision == "onnxruntime":
            return None
        engine = f"{self.folder}/{self.release.name}.{self.opts.precision}.engine"
        if self.ssh.exists(engine) and self.ssh.exists(engine + ".json"):
            self.row.steps.append({"step": "build", "rc": 0, "note": "reused the engine built from this bundle"})
            return engine
        self.step("build", self.edgerun_cmd("build", edb, "--precision", self.opts.precision, "-o", engine,
                                             "--timing-cache", f"{self.root}/edgerun.timing.cache"))
        return engine

    def run_checks(self, edb: str, engine: Optional[str]) -> dict:
        results = f"{self.folder}/results"
        # emptied first: a release deployed again without --source must not report the camera of the last time
        self.ssh.run(f"rm -rf {quote(results)} && mkdir -p {quote(results)}")
        on = ["--engine", engine] if engine else []
        validate = ["validate", edb, *on, "--json", f"{results}/validate.json"]
        if self.opts.max_drop is not None:
            validate += ["--max-drop", str(self.opts.max_drop)]
        self.step("validate", self.edgerun_cmd(*validate), ok_codes=(0, 1))  # 1: over the drop, still a row
        bench = ["bench", edb, *on, "--json", f"{results}/bench.json"]
        for flag, value in (("--fps-target", self.opts.fps_target), ("--budget-mb", self.opts.budget_mb),
                            ("--frame-size", self.opts.frame_size)):
            if value is not None:
                bench += [flag, str(value)]
        self.step("bench", self.edgerun_cmd(*bench))
        if self.opts.source:
            camera = ["camera", edb, *on, "--source", self.opts.source, "--duration", str(self.opts.duration),
                      "--json", f"{results}/camera.json", "--save-unsure", f"{self.folder}/{UNSURE}"]
            if self.opts.fps_target is not None:
                camera += ["--fps-target", str(self.opts.fps_target)]
            self.step("camera", self.edgerun_cmd(*camera), timeout=self.opts.duration + 600)
        written = self.ssh.fetch_tree(results, self.out / host_slug(self.ssh.dest))
        self.row.files = [str(p) for p in written]
        return {p.stem: json.loads(p.read_text()) for p in written if p.suffix == ".json"}

    def deploy(self) -> BoardRow:
        try:
            info = self.probe()
            (self.out / host_slug(self.ssh.dest)).mkdir(parents=True, exist_ok=True)
            (self.out / host_slug(self.ssh.dest) / "info.json").write_text(json.dumps(info, indent=2))
            self.check_versions(info)
            self.check_trust(info)
            edb = self.copy()
            self.step("verify", self.edgerun_cmd("verify", edb))
            engine = self.build(edb)
            try:
                results = self.run_checks(edb, engine)
            except RemoteError as exc:
                if not (engine and "rebuild it" in exc.stderr):
                    raise
                # an engine from before a JetPack or edgerun upgrade: build it again, once
                self.ssh.run(f"rm -f {quote(engine)} {quote(engine + '.json')}")
                engine = self.build(edb)
                results = self.run_checks(edb, engine)
            self.row.facts.update(fleet_facts(results))
            failed = [k for k in ("validate", "bench", "camera") if _status(results.get(k)) == "FAIL"]
            self.row.status = "FAIL" if failed else "PASS"
            self.row.reason = ("FAIL in " + ", ".join(failed)) if failed else ""
            if self.opts.activate == "always" or (self.opts.activate == "pass" and self.row.status == "PASS"):
                done = self.step("activate", self.edgerun_cmd("slot", "activate", self.release.name,
                                                              self.release.version, "--root", self.root))
                self.row.facts["active"] = json.loads(done.stdout.decode())
            else:
                self.row.facts["active"] = None
                self.row.reason += ("; " if self.row.reason else "") + "current release left as it was"
        except SshError as exc:
            self.row.status, self.row.reason = "UNREACHABLE", str(exc)
        except (RemoteError, EdgedistillError, OSError, ValueError) as exc:
            if self.row.status not in ("REFUSED",):
                self.row.status = "ERROR"
            self.row.reason = str(exc)
        return self.row


def _status(result: Optional[dict]) -> Optional[str]:
    if not result:
        return None
    if "verdict" in result and isinstance(result["verdict"], dict):
        return result["verdict"].get("overall")
    return result.get("status") or result.get("verdict")


def fleet_facts(results: dict) -> dict:
    """The fleet table's cells from a board's validate/bench/camera JSON."""
    facts: dict[str, Any] = {}
    bench = results.get("bench") or {}
    result = bench.get("result") or {}
    if result:
        lat = result.get("latency_ms") or {}
        batch = result.get("batch", 1)
        facts.update({"fps": result.get("throughput_fps"),
                      "fps_p50": 1000.0 * batch / lat["p50"] if lat.get("p50") else None,
                      "fps_p99": 1000.0 * batch / lat["p99"] if lat.get("p99") else None,
                      "memory_mb": (result.get("memory") or {}).get("total_mb"),
                      "memory_method": (result.get("memory") or {}).get("device_method"),
                      "power_mw": ((result.get("tegrastats") or {}).get("power_mw_mean")),
                      "bench_verdict": (bench.get("verdict") or {}).get("overall"),
                      "runner": result.get("runner"), "frame_size": (result.get("feed") or {}).get("frame_size")})
    validate = results.get("validate") or {}
    if validate:
        facts.update({"device_top1": validate.get("top1"), "host_top1": validate.get("host_fp32_top1"),
                      "validate": validate.get("status")})
    camera = results.get("camera") or {}
    if camera:
        facts.update({"camera_fps": camera.get("end_to_end_fps"), "camera_dropped": camera.get("frames_dropped"),
                      "camera_error": camera.get("error")})
    return facts


def fleet_table(rows: Sequence[dict], budget_mb: Optional[float] = None) -> list[str]:
    """Markdown lines: one row per board."""
    def num(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    head = ["board", "status", "device", "JetPack (L4T) / TensorRT", "FPS p50 / p99", "memory MB" +
            (f" (budget {budget_mb:.0f})" if budget_mb else ""), "power W", "top-1 on device (host)", "reason"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        top1 = ("–" if r.get("device_top1") is None else f"{100 * r['device_top1']:.2f}%"
                + ("" if r.get("host_top1") is None else f" ({100 * r['host_top1']:.2f}%)"))
        lines.append("| " + " | ".join([
            r["host"], r["status"], str(r.get("board") or "–"),
            f"{r.get('l4t') or '–'} / {r.get('tensorrt') or '–'}",
            f"{num(r.get('fps_p50'))} / {num(r.get('fps_p99'))}", num(r.get("memory_mb"), "{:.0f}"),
            num(None if r.get("power_mw") is None else r["power_mw"] / 1000.0, "{:.2f}"), top1,
            (r.get("reason") or "").replace("|", "/")]) + " |")
    return lines


def deploy(path: Path, hosts: Sequence[str], opts: DeployOptions, out_dir: Optional[Path] = None,
           sign_key: Optional[str] = None, passphrase: Optional[str] = None) -> dict:
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
    fleet = {"release": {"name": release.name, "version": release.version,
                         "manifest_sha256": release.manifest_sha256, "signer": release.signer},
             "precision": opts.precision, "source": opts.source, "rows": rows}
    (out_dir / "fleet.json").write_text(json.dumps(fleet, indent=2, default=str))
    (out_dir / "fleet.md").write_text("\n".join(table) + "\n")
    fleet.update(table=table, refit=refit_planner(rows, release, opts), fleet_json=str(out_dir / "fleet.json"))
    return fleet


def refit_planner(rows: Sequence[dict], release: Release, opts: DeployOptions) -> list[str]:
    """Let the planner's per-board factors learn from the engines just measured (as `plan --measured` does)."""
    if opts.precision == "onnxruntime":
        return ["planner not refit: ONNX Runtime runs measure no TensorRT engine"]
    from .planner import refit_from_measured

    notes = []
    by_profile: dict[str, list[str]] = {}
    for row in rows:
        bench = [f for f in row.get("files", []) if f.endswith("bench.json")]
        if row["status"] in ("PASS", "FAIL") and bench and row.get("profile"):
            by_profile.setdefault(row["profile"], []).extend(bench)
    for profile, files in by_profile.items():
        try:
            refit = refit_from_measured(profile, files)
            notes.append(f"planner refit for {profile}: latency scale x{refit['scale']:.2f} from {len(files)} board(s)")
        except (EdgedistillError, KeyError, ValueError) as exc:
            notes.append(f"planner not refit for {profile}: {exc}")
    return notes


def pull_frames(hosts: Sequence[str], name: str, opts: DeployOptions, out_dir: Path) -> list[dict]:
    """Fetch the frames each board's camera was unsure of (``edgerun camera --save-unsure``: every release of
    ``name`` under the deploy root) into ``out_dir/<board>/unsure/<release>/``, with their index.csv. Rows:
    {host, status, releases, frames, folder} or {host, status: ERROR, reason}."""
    rows = []
    for host in hosts:
        board = Board(host, Release(Path("-"), name, "0" * 16, "", None, None), opts, out_dir)
        local = Path(out_dir) / host_slug(board.ssh.dest) / UNSURE
        try:
            listing = board.ssh.run(f"ls -d {quote(board.root + '/models/' + name)}/*/{UNSURE} 2>/dev/null; true")
            releases = {}  # release -> its folder; the current/previous links are not releases of their own
            for line in listing.stdout.decode("utf-8", "replace").splitlines():
                parts = line.rstrip("/").split("/")
                if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{16}", parts[-2]):
                    releases[parts[-2]] = line
            frames = 0
            for version, folder in releases.items():
                written = board.ssh.fetch_tree(folder, local / version)
                frames += sum(1 for p in written if p.suffix.lower() == ".jpg")
            rows.append({"host": host, "status": "DONE", "releases": len(releases), "frames": frames,
                         "folder": str(local)})
        except (SshError, RemoteError) as exc:
            rows.append({"host": host, "status": "ERROR", "reason": str(exc)})
    return rows


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
