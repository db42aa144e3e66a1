"""The MLflow model registry: the bundle on the line traceable to the run that made it.

``edgedistill export RECIPE --register NAME`` packs the run's bundle into ``<run>/<name>.edb`` (signed with
``--sign KEY``), logs that file as the run's ``registered/`` artifact and registers it as a new version of model
NAME, tagged with what a plant asks of it: the metric and its value, the threshold, the precision variants, the
signer's key id (or ``unsigned``), the file's sha256 and the run folder. ``edgedistill deploy models:/NAME/3`` (or
``models:/NAME@alias``) fetches that version's .edb, checks it is the registered bytes (sha256), deploys it, and
writes each board's verdict back as tags on the version (``deploy.<host>.status``, ``.fps_p50``, ``.memory_mb``,
``.reason``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from edgedistill.errors import EdgedistillError
from edgedistill.run.tracking import Tracker, shown_uri
from edgerun.bundle.manifest import sha256_file

log = logging.getLogger(__name__)

ARTIFACT = "registered"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


class RegistryError(EdgedistillError):
    """A registry step that cannot be done: names the model, version or URI and what to do."""


def _version_tags(manifest: dict, edb: Path, run_dir: Path, signed_by: str) -> dict[str, str]:
    """What a version says of its bundle without downloading it."""
    metrics = manifest.get("metrics") or {}
    decision = manifest.get("decision") or {}
    files = manifest.get("files") or {}
    variants = ["fp32", "fp16"] + (["int8"] if "model.int8.onnx" in files else [])
    tags = {
        "task": manifest.get("task", "classification"),
        "target": manifest.get("target", ""),
        "precisions": ",".join(variants),
        "signed_by": signed_by,
        "sha256": sha256_file(str(edb)),
        "run_dir": str(run_dir.resolve()),
    }
    host = metrics.get("host") or {}
    name = decision.get("metric") or host.get("metric")
    value = host.get("student_score") if "student_score" in host else metrics.get("image_auroc")
    if name or "image_auroc" in metrics:
        tags["metric"] = str(name or "image_auroc")
    if isinstance(value, (int, float)):
        tags["metric_value"] = f"{value:.6g}"
    if isinstance(decision.get("threshold"), (int, float)):
        tags["threshold"] = f"{decision['threshold']:.6g}"
    return tags


def register_bundle(tracker: Tracker, run_dir: Path, name: str, sign_key: Optional[str] = None) -> dict[str, Any]:
    """Pack, log and register the run's bundle as a new version of ``name``; returns the version's facts."""
    from edgerun.bundle.bundle import pack_bundle
    from edgerun.bundle.signing import PASSPHRASE_ENV, read_signature

    if not tracker.enabled:
        raise RegistryError(
            f"--register {name}: tracking is off or the server could not be reached (see the warning above): set "
            "tracking.mlflow.uri in the recipe or $MLFLOW_TRACKING_URI"
        )
    bundle = Path(run_dir) / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise RegistryError(f"--register {name}: {bundle} holds no bundle: run the export stage first")
    edb = Path(run_dir) / f"{name}.edb"
    pack_bundle(
        str(bundle), str(edb), sign_key=sign_key, passphrase=os.environ.get(PASSPHRASE_ENV) if sign_key else None
    )
    signed_by = read_signature(str(bundle))["key_id"] if sign_key else "unsigned"
    manifest = json.loads((bundle / "manifest.json").read_text())
    tags = _version_tags(manifest, edb, Path(run_dir), signed_by)
    client, run_id = tracker.client, tracker.run_id
    client.log_artifact(run_id, str(edb), artifact_path=ARTIFACT)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT}"
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="edgedistill bundles (.edb)")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    tracker.set_tags({"registered_model": f"models:/{name}/{version.version}"})
    log.info("registry: %s registered as models:/%s/%s (%s)", edb.name, name, version.version, shown_uri(tracker.uri))
    return {"name": name, "version": str(version.version), "edb": str(edb), **tags}


def parse_model_uri(target: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(name, version, alias) of ``models:/NAME/3`` or ``models:/NAME@alias``; None when ``target`` is no model
    URI; a malformed one is an error naming both forms."""
    if not target.startswith("models:/"):
        return None
    match = MODEL_URI.match(target)
    if not match:
        raise RegistryError(f"'{target}' is not a registered model: write models:/NAME/VERSION or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


class RegisteredBundle:
    """A registered version, fetched: its .edb (checked against the registered sha256) and the client to tag it."""

    def __init__(self, target: str, uri: Optional[str], cache: Path):
        parsed = parse_model_uri(target)
        if parsed is None:
            raise RegistryError(f"'{target}' is not a models:/ URI")
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RegistryError(f"{target}: which registry? set $MLFLOW_TRACKING_URI or pass --tracking-uri")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.name, version, alias = parsed
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            found = (
                self.client.get_model_version(self.name, version)
                if version
                else self.client.get_model_version_by_alias(self.name, alias)
            )
        except MlflowException as exc:
            raise RegistryError(
                f"{target}: not in the registry at {shown_uri(uri)} ({str(exc).splitlines()[0][:160]}); "
                "list its versions in the MLflow UI or register one with `edgedistill export RECIPE --register NAME`"
            ) from None
        self.version = str(found.version)
        self.tags = dict(found.tags or {})
        folder = Path(cache) / self.name / f"v{self.version}"
        folder.mkdir(parents=True, exist_ok=True)
        local = Path(self.client.download_artifacts(found.run_id, ARTIFACT, str(folder)))
        edbs = sorted(local.glob("*.edb")) if local.is_dir() else [local]
        if len(edbs) != 1:
            raise RegistryError(f"{target}: version {self.version} holds {len(edbs)} .edb files, not one")
        self.edb = edbs[0]
        want = self.tags.get("sha256")
        if want and sha256_file(str(self.edb)) != want:
            raise RegistryError(
                f"{target}: the downloaded {self.edb.name} is not the registered file (sha256 differs): "
                "nothing deployed"
            )
        log.info("registry: %s is version %s (%s)", target, self.version, self.edb)

    def record_deploy(self, rows: list[dict]) -> None:
        """Each board's verdict as tags on the version (a refused write is a warning: the deploy happened)."""
        from mlflow.exceptions import MlflowException

        for row in rows:
            host = re.sub(r"[^A-Za-z0-9_.-]", "_", str(row.get("host", "board")))
            values = {
                "status": row.get("status"),
                "fps_p50": row.get("fps_p50"),
                "memory_mb": row.get("memory_mb"),
                "reason": (row.get("reason") or "")[:500] or None,
            }
            for key, value in values.items():
                if value is None:
                    continue
                try:
                    self.client.set_model_version_tag(self.name, self.version, f"deploy.{host}.{key}", str(value))
                except MlflowException as exc:
                    log.warning("registry: the deploy result of %s was not recorded (%s)", host, exc)
                    return
