"""What a deploy carries: its options, the release (the packed, maybe signed bundle and its version), one board's
result row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from edgedistill.errors import EdgedistillError

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
    timeout: float = 3600.0  # seconds any one step on a board may take (--step-timeout); the camera adds its duration
    max_result_mb: int = 64  # the most a board's results folder may send back

    def __post_init__(self):
        if self.precision not in BACKENDS:
            raise EdgedistillError(f"--precision {self.precision}: choose one of {', '.join(BACKENDS)}")
        if self.activate not in ("pass", "always", "never"):
            raise EdgedistillError(f"--activate {self.activate}: choose pass, always or never")
        if self.jobs < 1:
            raise EdgedistillError("--jobs must be at least 1")
        if not (0 < self.timeout < float("inf")):
            raise EdgedistillError(f"--step-timeout {self.timeout}: a positive number of seconds")
        if self.max_result_mb < 1:
            raise EdgedistillError("--max-result-mb must be at least 1")


@dataclass
class Release:
    """The bundle being deployed: its .edb, model name, release version and signer."""

    edb: Path
    name: str
    version: str
    manifest_sha256: str
    signer: Optional[str]
    target: Optional[str]
    task: Optional[str] = (
        None  # the manifest's task: "anomaly" saves map overlays where a classifier saves unsure frames
    )


@dataclass
class BoardRow:
    host: str
    status: str = "ERROR"  # PASS, FAIL, REFUSED (trust), ERROR (unreachable, edgerun missing, a command failed)
    reason: str = ""
    facts: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    files: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "host": self.host,
            "status": self.status,
            "reason": self.reason,
            "active": None,  # the release the board runs now; None until deploy switched it
            **self.facts,
            "steps": self.steps,
            "files": self.files,
        }


def host_slug(host: str) -> str:
    """A board's folder name under the results folder: never '.', '..' or a path (a Host alias '..' must not
    write into the run folder)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", host).strip("_").lstrip(".")
    return slug or "host"


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: object, where: str = "the manifest's name") -> str:
    """A model name that becomes a folder on every board and here: letters, digits, '.', '_', '-', not starting
    with '.', no '/' or '..' (a name '../x' would write outside the deploy root)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise EdgedistillError(
            f"{where} {name!r} cannot name a folder on the boards: letters, digits, '.', '_' and '-' only, starting "
            "with a letter or digit, without '..'; export the bundle again with another name (nothing was copied)"
        )
    return name


def prepare_release(
    path: Path, workdir: Path, sign_key: Optional[str] = None, passphrase: Optional[str] = None
) -> Release:
    """An .edb as given, or the run's bundle packed (and signed with ``sign_key``) into ``workdir``."""
    from edgerun.bundle.bundle import open_bundle, pack_bundle
    from edgerun.bundle.signing import read_signature

    path = Path(path)
    if path.is_dir():
        folder = path / "bundle" if (path / "bundle" / "manifest.json").is_file() else path
        if not (folder / "manifest.json").is_file():
            raise EdgedistillError(
                f"{path}: neither a run folder with bundle/ nor a bundle folder: export it first "
                "(edgedistill export RECIPE)"
            )
        edb = Path(pack_bundle(str(folder), str(workdir / "bundle.edb"), sign_key=sign_key, passphrase=passphrase))
    elif path.is_file():
        if sign_key:
            raise EdgedistillError(
                f"--sign applies to a run or bundle folder; {path} is already packed (sign it "
                "with edgedistill pack --sign)"
            )
        edb = path
    else:
        raise EdgedistillError(f"{path} does not exist: give a run folder (runs/<name>) or an .edb")
    bundle = open_bundle(str(edb))
    record = read_signature(bundle.folder)
    return Release(
        edb=edb,
        name=check_model_name(bundle.manifest.data.get("name"), f"{path}: the manifest's name"),
        version=bundle.manifest_sha256[:16],
        manifest_sha256=bundle.manifest_sha256,
        signer=(record or {}).get("key_id"),
        target=bundle.manifest.data.get("target"),
        task=bundle.manifest.data.get("task"),
    )
