"""One board's deploy over ssh: probe edgerun and its trust set, copy the release into its versioned folder, verify,
build, validate, bench, the camera; pull the results back and read them into the board's row.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

from edgedistill.deploy.release import UNSURE, BoardRow, DeployOptions, Release, host_slug
from edgedistill.deploy.ssh import RemoteError, SshError, SshHost, quote
from edgedistill.errors import EdgedistillError


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
            raise RemoteError(
                f"{what}: {err.splitlines()[-1] if err else 'exit %d' % done.returncode}", done.returncode, err
            )
        return done

    def edgerun_cmd(self, *words: str) -> str:
        return quote(self.edgerun, *words)

    def find_edgerun(self) -> Optional[str]:
        """The board's edgerun: the one deploy installed, a venv's under the root, else PATH's."""
        ours, venv = f"{self.root}/bin/edgerun", f"{self.root}/venv/bin/edgerun"
        found = self.ssh.run(
            f"if [ -x {quote(ours)} ]; then echo {quote(ours)}; elif [ -x {quote(venv)} ]; then "
            f"echo {quote(venv)}; else command -v edgerun; fi",
            check=False,
        )
        return found.stdout.decode().strip() if found.returncode == 0 else None

    def install(self) -> str:
        """edgerun is pure Python: its package goes to <root>/lib, a launcher to <root>/bin/edgerun, run by the
        board's own Python (JetPack's numpy, OpenCV, TensorRT stay the ones imported; nothing is downloaded)."""
        import edgerun

        package = Path(edgerun.__file__).resolve().parent
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "edgerun.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(
                    str(package),
                    arcname="edgerun",
                    filter=lambda m: None if "__pycache__" in m.name or m.name.endswith(".pyc") else m,
                )
            self.ssh.put(archive, f"{self.root}/lib/edgerun.tar")
        launcher = (
            "#!/bin/sh\n# written by edgedistill deploy --install\n"
            'here=$(cd "$(dirname "$0")/.." && pwd)\n'
            f'PYTHONPATH="$here/lib${{PYTHONPATH:+:$PYTHONPATH}}" exec {quote(self.opts.remote_python)} '
            '-m edgerun.cli "$@"\n'
        )
        lib, new = f"{self.root}/lib", f"{self.root}/lib/edgerun.new"
        self.step(
            "install",
            f"rm -rf {quote(new)} && mkdir -p {quote(new)} && tar -C {quote(new)} -xf "
            f"{quote(lib + '/edgerun.tar')} && rm -rf {quote(lib + '/edgerun')} && mv "
            f"{quote(new + '/edgerun')} {quote(lib + '/edgerun')} && rm -rf {quote(new)} "
            f"{quote(lib + '/edgerun.tar')} && mkdir -p {quote(self.root + '/bin')}",
        )
        self.ssh.run(
            f"cat > {quote(self.root + '/bin/edgerun')} && chmod +x {quote(self.root + '/bin/edgerun')}",
            stdin=launcher.encode(),
        )
        check = self.ssh.run(f"{quote(self.opts.remote_python)} -c 'import numpy, cv2' 2>&1", check=False)
        if check.returncode != 0:
            raise EdgedistillError(
                f"edgerun is installed in {self.root}/lib, but {self.opts.remote_python} on the board "
                f"cannot import numpy and OpenCV ({check.stdout.decode().strip().splitlines()[-1:]}):"
                " JetPack provides both (sudo apt install python3-numpy python3-opencv); pip's "
                "opencv-python lacks GStreamer"
            )
        self.row.steps.append({"step": "install", "rc": 0, "where": f"{self.root}/bin/edgerun"})
        return f"{self.root}/bin/edgerun"

    def probe(self) -> dict:
        """The edgerun command, its version and the device's facts and trust set (edgerun info --json)."""
        if not self.edgerun:
            self.edgerun = self.install() if self.opts.install else self.find_edgerun()
            if not self.edgerun:
                raise EdgedistillError(
                    f"edgerun is not installed on {self.ssh.dest} (not in {self.root}/bin, "
                    f"{self.root}/venv/bin nor on PATH): pass --install to copy it there, or "
                    "pip3 install ./jetson on the board, or name it with --edgerun CMD"
                )
        info = json.loads(self.step("info", self.edgerun_cmd("info", "--json")).stdout.decode())
        self.row.facts.update(
            {
                "board": info.get("board"),
                "l4t": info.get("l4t"),
                "tensorrt": info.get("tensorrt"),
                "edgerun": info.get("edgerun"),
                "python": info.get("python"),
                "profile": info.get("profile"),
            }
        )
        return info

    def check_versions(self, info: dict) -> None:
        from edgerun import __version__ as here
        from edgerun.profiles import parse_version

        there = info.get("edgerun")
        if there is None:
            raise EdgedistillError(
                f"the edgerun on {self.ssh.dest} predates `info`'s version field: update it "
                f"(pip3 install ./jetson from this checkout, edgerun {here})"
            )
        if parse_version(there) < parse_version(here):
            raise EdgedistillError(
                f"edgerun {there} on {self.ssh.dest} is older than {here} here, which made the "
                "bundle: update it (--install, or pip3 install ./jetson from this checkout)"
            )

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
            raise EdgedistillError(
                f"the board trusts keys {', '.join(keys)} ({trust['source']}) and this bundle is "
                "unsigned: deploy the run with --sign KEY (nothing was copied)"
            )
        if self.release.signer not in keys:
            self.row.status = "REFUSED"
            raise EdgedistillError(
                f"the board trusts keys {', '.join(keys)} ({trust['source']}), not {self.release.signer}"
                " that signed this bundle: add its KEY.pub there, or sign with a trusted key "
                "(nothing was copied)"
            )

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
        self.step(
            "build",
            self.edgerun_cmd(
                "build",
                edb,
                "--precision",
                self.opts.precision,
                "-o",
                engine,
                "--timing-cache",
                f"{self.root}/edgerun.timing.cache",
            ),
        )
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
        for flag, value in (
            ("--fps-target", self.opts.fps_target),
            ("--budget-mb", self.opts.budget_mb),
            ("--frame-size", self.opts.frame_size),
        ):
            if value is not None:
                bench += [flag, str(value)]
        self.step("bench", self.edgerun_cmd(*bench))
        if self.opts.source:
            camera = [
                "camera",
                edb,
                *on,
                "--source",
                self.opts.source,
                "--duration",
                str(self.opts.duration),
                "--json",
                f"{results}/camera.json",
                "--save-unsure",
                f"{self.folder}/{UNSURE}",
            ]
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
                done = self.step(
                    "activate",
                    self.edgerun_cmd("slot", "activate", self.release.name, self.release.version, "--root", self.root),
                )
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
        facts.update(
            {
                "fps": result.get("throughput_fps"),
                "fps_p50": 1000.0 * batch / lat["p50"] if lat.get("p50") else None,
                "fps_p99": 1000.0 * batch / lat["p99"] if lat.get("p99") else None,
                "memory_mb": (result.get("memory") or {}).get("total_mb"),
                "memory_method": (result.get("memory") or {}).get("device_method"),
                "power_mw": ((result.get("tegrastats") or {}).get("power_mw_mean")),
                "bench_verdict": (bench.get("verdict") or {}).get("overall"),
                "runner": result.get("runner"),
                "frame_size": (result.get("feed") or {}).get("frame_size"),
            }
        )
    validate = results.get("validate") or {}
    if validate:
        facts.update(
            {
                "device_top1": validate.get("top1"),
                "host_top1": validate.get("host_fp32_top1"),
                "validate": validate.get("status"),
            }
        )
    camera = results.get("camera") or {}
    if camera:
        facts.update(
            {
                "camera_fps": camera.get("end_to_end_fps"),
                "camera_dropped": camera.get("frames_dropped"),
                "camera_error": camera.get("error"),
            }
        )
    return facts
