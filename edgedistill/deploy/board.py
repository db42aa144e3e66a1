"""One board's deploy over ssh: probe edgerun and its trust set, copy the release into its versioned folder, verify,
build, validate, bench, the camera; pull the results back and read them into the board's row.

Nothing on the board is taken on trust: a bundle.edb already in the release folder is hashed and replaced unless it
is the one being deployed, `verify` must report this release's manifest, and the row is PASS only on the explicit
evidence ``edgedistill.deploy.evidence`` asks for.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from edgedistill.deploy.evidence import board_verdict, fleet_facts, read_results
from edgedistill.deploy.release import BoardRow, DeployOptions, Release, host_slug
from edgedistill.deploy.ssh import RemoteError, SshError, SshHost, quote
from edgedistill.errors import EdgedistillError
from edgerun.line.release import kept_frames


class Board:
    """One board's deploy: every remote step through ``edgerun`` there, each one recorded."""

    def __init__(self, host: str, release: Release, opts: DeployOptions, out_dir: Path):
        self.ssh = SshHost(host, config=opts.ssh_config, options=opts.ssh_options)
        self.release, self.opts, self.out = release, opts, out_dir
        self.row = BoardRow(host=host)
        self.root = opts.remote_dir.rstrip("/") or "."
        self.folder = f"{self.root}/models/{release.name}/{release.version}"
        self.edgerun = opts.edgerun
        self.rcs: dict[str, int] = {}  # each step's exit code

    def step(self, what: str, command: str, ok_codes=(0,), timeout: Optional[float] = None):
        done = self.ssh.run(command, timeout=timeout or self.opts.timeout, check=False)
        self.row.steps.append({"step": what, "rc": done.returncode})
        self.rcs[what] = done.returncode
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
        if not isinstance(info, dict):
            raise EdgedistillError(f"`edgerun info --json` on {self.ssh.dest} did not give a JSON object")
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
        """The release's bundle.edb in its folder on the board, checked by sha256: one already there is kept only
        when it is this release's file, else replaced (a planted or damaged file is never trusted by its name)."""
        edb = f"{self.folder}/bundle.edb"
        want = hashlib.sha256(self.release.edb.read_bytes()).hexdigest()
        there = self.remote_sha256(edb)
        if there == want:
            self.row.steps.append({"step": "copy", "rc": 0, "note": "already on the board"})
            return edb
        self.ssh.put(self.release.edb, edb, timeout=self.opts.timeout)
        step = {"step": "copy", "rc": 0, "bytes": self.release.edb.stat().st_size}
        if there is not None:
            step["note"] = f"replaced a different bundle.edb there (sha256 {there[:12]}..., not {want[:12]}...)"
        self.row.steps.append(step)
        copied = self.remote_sha256(edb)
        if copied != want:
            raise EdgedistillError(f"{self.ssh.dest}:{edb} is not the file copied (sha256 {copied}); nothing run")
        return edb

    def remote_sha256(self, path: str) -> Optional[str]:
        """sha256 of a file on the board (None when it is not a file there)."""
        done = self.ssh.run(
            f"if [ -f {quote(path)} ]; then sha256sum {quote(path)} 2>/dev/null || {quote(self.opts.remote_python)} "
            f"-c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],\"rb\").read()).hexdigest())' "
            f"{quote(path)}; fi",
            check=False,
        )
        words = done.stdout.decode("utf-8", "replace").split()
        return words[0].lower() if done.returncode == 0 and words else None

    def verify(self, edb: str) -> None:
        """`edgerun verify` on the board must report this release's manifest (its files, signature, pins)."""
        done = self.step("verify", self.edgerun_cmd("verify", edb))
        said = [
            line.split(":", 1)[1].split()[0]
            for line in done.stdout.decode("utf-8", "replace").splitlines()
            if line.startswith("manifest sha256:")
        ]
        if said != [self.release.manifest_sha256]:
            raise EdgedistillError(
                f"`edgerun verify` on {self.ssh.dest} reported manifest {said or 'none'}, not this release's "
                f"{self.release.manifest_sha256[:16]}: nothing run"
            )

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
        # 1: over the drop (its JSON says FAIL) or a crash (no JSON): the evidence decides, not the exit code
        self.rcs["validate"] = self.step("validate", self.edgerun_cmd(*validate), ok_codes=(0, 1)).returncode
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
                *kept_frames(self.release.task, self.folder),
            ]
            if self.opts.fps_target is not None:
                camera += ["--fps-target", str(self.opts.fps_target)]
            self.step("camera", self.edgerun_cmd(*camera), timeout=self.opts.duration + 600)
        written = self.ssh.fetch_tree(
            results, self.out / host_slug(self.ssh.dest), max_bytes=self.opts.max_result_mb << 20
        )
        self.row.files = [str(p) for p in written]
        return read_results(written)

    def note_services(self) -> None:
        """A line service runs its own staged copy of a release (``edgerun service install``), not `current`: a
        running edgerun-* unit keeps the old model until it is installed again and restarted; the row says so."""
        done = self.ssh.run(
            "command -v systemctl >/dev/null 2>&1 && systemctl list-units 'edgerun-*' --type=service --state=active "
            "--no-legend --plain 2>/dev/null | cut -d' ' -f1; true",
            check=False,
        )
        units = [u for u in done.stdout.decode("utf-8", "replace").split() if u.startswith("edgerun-")]
        if units:
            self.row.facts["services"] = units
            self.row.reason += ("; " if self.row.reason else "") + (
                f"{', '.join(units)} still run(s) the release staged at install: on the board, `sudo edgerun "
                f"service install {self.root}/models/{self.release.name}/current/bundle.edb ...` and `sudo "
                f"systemctl restart {' '.join(units)}`"
            )

    def deploy(self) -> BoardRow:
        try:
            info = self.probe()
            (self.out / host_slug(self.ssh.dest)).mkdir(parents=True, exist_ok=True)
            (self.out / host_slug(self.ssh.dest) / "info.json").write_text(json.dumps(info, indent=2))
            self.check_versions(info)
            self.check_trust(info)
            edb = self.copy()
            self.verify(edb)
            engine = self.build(edb)
            try:
                results, problems = self.run_checks(edb, engine)
            except RemoteError as exc:
                if not (engine and "rebuild it" in exc.stderr):
                    raise
                # an engine from before a JetPack or edgerun upgrade: build it again, once
                self.ssh.run(f"rm -f {quote(engine)} {quote(engine + '.json')}")
                engine = self.build(edb)
                results, problems = self.run_checks(edb, engine)
            self.row.facts.update(fleet_facts(results))
            required = ["validate", "bench"] + (["camera"] if self.opts.source else [])
            self.row.status, self.row.reason = board_verdict(results, problems, required, self.rcs)
            if self.opts.activate == "always" or (self.opts.activate == "pass" and self.row.status == "PASS"):
                done = self.step(
                    "activate",
                    self.edgerun_cmd("slot", "activate", self.release.name, self.release.version, "--root", self.root),
                )
                self.row.facts["active"] = json.loads(done.stdout.decode())
                self.note_services()
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
