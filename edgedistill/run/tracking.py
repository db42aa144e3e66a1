"""MLflow tracking: every run findable in one place with its recipe, curves, figures, report and bundle.

One parent MLflow run per run folder (``edgedistill run``, and each stage command run on its own), a nested run per
stage (``teacher``, ``student``, ``baseline``, ``evaluate``, ``export``; ``anomaly`` for a detector): the resolved
recipe as the parent's params (dotted keys), each training epoch's record (loss parts, train and validation
metrics, learning rate) as metrics on its stage's run with the epoch as step, the summary's figures (retention, KD
gain and its p-value, recall at the operating point, INT8 drop, planner FPS, ...) as the parent's final metrics,
and ``summary.json``, ``summary.md``, the report and the bundle as its artifacts.

The run folder keeps what was tracked in ``tracking.json`` (the URI, experiment, parent and stage run ids, the last
epoch logged per stage): a killed run started again continues the same MLflow runs, and epochs it trains again
after its last checkpoint are not logged twice. The bundle's manifest names the parent run (``source.tracking``).

Tracking never costs the training: a server that cannot be reached at the start (checked with one short request)
or a write it refuses later is one warning, and the run goes on without tracking. It is on when the recipe has
``tracking.mlflow`` or ``$MLFLOW_TRACKING_URI`` is set; MLflow is the ``[tracking]`` extra, imported only then.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from edgedistill.deploy.evidence import number
from edgedistill.errors import EdgedistillError
from edgedistill.files import atomic_write_text

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
URI_ENV = "MLFLOW_TRACKING_URI"
MAX_PARAM = 6000  # MLflow's longest param value
ARTIFACTS = ("summary.json", "summary.md", "report.html", "report.md", "recipe.yaml")


class TrackingUnavailable(EdgedistillError):
    """MLflow is not installed, or the tracking URI cannot be used at all."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists and scalars are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


# The summary's figures a team compares runs on, as final metrics of the parent run: (metric, dotted path).
# Anything else numeric at the summary's top two levels is logged too, under its dotted path.
SUMMARY_METRICS = (
    ("retention", "retention"),
    ("kd_gain", "kd_gain"),
    ("kd_gain_p_value", "significance.p_value"),
    ("student_score", "student.score"),
    ("teacher_score", "teacher.score"),
    ("baseline_score", "baseline.score"),
    ("recall_at_operating_point", "operating_point.student.recall"),
    ("false_reject_at_operating_point", "operating_point.student.false_reject"),
    ("int8_drop", "int8.drop"),
    ("planner_fps", "device_estimate.student.est_fps"),
    ("planner_fps", "device_estimate.est_fps"),  # an anomaly detector's
    ("image_auroc", "report.image_auroc.value"),
    ("pixel_auroc", "report.pixel_auroc"),
    ("recall", "report.recall.value"),
    ("false_reject", "report.false_reject.value"),
)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The figures of ``summary.json`` as MLflow metrics (finite numbers only)."""
    flat = flatten(summary)
    out: dict[str, float] = {}
    for name, path in SUMMARY_METRICS:
        value = number(flat.get(path))
        if value is not None:
            out[name] = value
    for dotted, value in flat.items():
        figure = number(value)
        if figure is not None and dotted.count(".") <= 1 and dotted.replace(".", "_") not in out:
            out[dotted.replace(".", "_")] = figure
    return out


class Tracker:
    """Tracking off: every call does nothing. :class:`MlflowTracker` overrides them."""

    enabled = False
    run_id: Optional[str] = None

    def source(self) -> dict:
        """What the bundle's manifest says of the run that made it (``source.tracking``)."""
        return {}

    def log_epoch(self, stage: str, record: dict) -> None:
        pass

    def end_stage(self, stage: str, ok: bool, create: bool = False) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def log_stage(self, stage: str, params: dict, metrics: dict, tags: dict) -> None:
        pass

    def log_outputs(self, run_dir: Path) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowTracker(Tracker):
    """One run folder's MLflow runs through ``MlflowClient`` (explicit run ids: no global active run)."""

    enabled = True

    def __init__(self, recipe, run_dir: Path, uri: str):
        import mlflow  # noqa: F401  (the [tracking] extra)
        from mlflow.tracking import MlflowClient

        self.uri, self.run_dir = uri, Path(run_dir)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.warned = False
        self.synced: set = set()  # stages whose last logged step was checked with the server in this process
        self.state = self._read_state()
        name = (recipe.tracking.mlflow.experiment if recipe.tracking.mlflow else None) or recipe.name
        experiment = self._experiment(name)
        resumed = self.state.get("uri") == uri and self._alive(self.state.get("run_id"))
        if resumed:
            self.client.update_run(self.state["run_id"], status="RUNNING")
            log.info("tracking: continuing MLflow run %s at %s", self.state["run_id"], shown_uri(uri))
        else:
            run = self.client.create_run(
                experiment,
                run_name=recipe.name,
                tags={"edgedistill.run_dir": str(self.run_dir.resolve()), "mlflow.source.name": "edgedistill"},
            )
            self.state = {"uri": uri, "experiment_id": experiment, "run_id": run.info.run_id, "stages": {}}
            self._params(self.state["run_id"], flatten(recipe.model_dump(mode="json")))
            log.info("tracking: MLflow run %s in experiment '%s' at %s", run.info.run_id, name, shown_uri(uri))
        self.run_id = self.state["run_id"]
        self._write_state()

    # -- the state the run folder keeps ----------------------------------------------------------------------
    def _read_state(self) -> dict:
        path = self.run_dir / TRACKING_FILE
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("tracking: %s is unreadable (%s); a new MLflow run is started", path, exc)
            return {}
        return state if isinstance(state, dict) and isinstance(state.get("stages"), dict) else {}

    def _write_state(self) -> None:
        atomic_write_text(self.run_dir / TRACKING_FILE, json.dumps(self.state, indent=2) + "\n")

    def _alive(self, run_id: Optional[str]) -> bool:
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise TrackingUnavailable(
                    f"tracking: MLflow experiment '{name}' is deleted on {shown_uri(self.uri)}: restore it or set "
                    "tracking.mlflow.experiment to another name"
                )
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # -- every write goes through here: a refusal is one warning, then tracking is off ---------------------
    def _safely(self, what: str, call: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 (MLflow raises its own, requests', OS errors: none may stop a run)
            if not self.warned:
                log.warning(
                    "tracking: MLflow at %s refused %s (%s: %s); the run goes on without tracking",
                    shown_uri(self.uri),
                    what,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
                self.warned = True
            self.enabled = False
            return None

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(params.items())]
        items = [Param(p.key, p.value[:MAX_PARAM]) for p in items]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _stage_run(self, stage: str) -> str:
        """The stage's nested run: the one this process uses, else the one the run folder (or, when a kill came
        between making it and recording it, the server) knows, with its last step asked of the server; else new."""
        entry = self.state["stages"].get(stage)
        if entry and stage in self.synced:
            return entry["run_id"]
        run_id = entry.get("run_id") if entry and self._alive(entry.get("run_id")) else self._find_stage(stage)
        if run_id is None:
            run_id = self.client.create_run(
                self.state["experiment_id"], run_name=stage, tags={"mlflow.parentRunId": self.run_id, "stage": stage}
            ).info.run_id
            last = -1
        else:
            known = entry.get("last_step", -1) if entry and entry.get("run_id") == run_id else -1
            last = max(known, self._server_last_step(run_id))
        self.state["stages"][stage] = {"run_id": run_id, "last_step": last}
        self.synced.add(stage)
        self._write_state()
        return run_id

    def _find_stage(self, stage: str) -> Optional[str]:
        """A live nested run of this parent for ``stage`` on the server, or None."""
        found = self.client.search_runs(
            [self.state["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.stage = '{stage}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _server_last_step(self, run_id: str) -> int:
        """The highest step the server holds for the run (-1: none)."""
        keys = sorted(self.client.get_run(run_id).data.metrics)
        if not keys:
            return -1
        return max((m.step for m in self.client.get_metric_history(run_id, keys[0])), default=-1)

    # -- what the stages call -------------------------------------------------------------------------------
    def source(self) -> dict:
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.state["experiment_id"]}

    def log_epoch(self, stage: str, record: dict) -> None:
        step = int(record.get("epoch", 0))

        def write() -> None:
            from mlflow.entities import Metric

            run_id = self._stage_run(stage)
            entry = self.state["stages"][stage]
            if step <= entry.get("last_step", -1):
                return  # an epoch trained again after a resume: MLflow already has it
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, value, now, step)
                for key, value in ((k, number(v)) for k, v in record.items() if k not in ("epoch", "kind"))
                if value is not None
            ]
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)
            entry["last_step"] = step
            self._write_state()

        self._safely(f"the {stage} epoch {step} metrics", write)

    def end_stage(self, stage: str, ok: bool, create: bool = False) -> None:
        """The stage's nested run ends FINISHED or FAILED (``create``: made first, for a stage that logs no epoch)."""

        def write() -> None:
            if create:
                self._stage_run(stage)
            entry = self.state["stages"].get(stage)
            if entry:
                self.client.set_terminated(entry["run_id"], "FINISHED" if ok else "FAILED")

        self._safely(f"the end of {stage}", write)

    def log_stage(self, stage: str, params: dict, metrics: dict, tags: dict) -> None:
        """A stage's own params, final metrics and tags (a search's trial: its values, value and state); ended."""

        def write() -> None:
            from mlflow.entities import Metric, RunTag

            run_id = self._stage_run(stage)
            self._params(run_id, params)
            now = int(time.time() * 1000)
            figures = [Metric(k, v, now, 0) for k, v in ((k, number(v)) for k, v in metrics.items()) if v is not None]
            self.client.log_batch(run_id, metrics=figures, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            self.client.set_terminated(run_id, "FINISHED")

        self._safely(f"the {stage} results", write)

    def log_summary(self, summary: dict) -> None:
        def write() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, 0) for k, v in sorted(summary_metrics(summary).items())]
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

        self._safely("the summary's figures", write)

    def log_outputs(self, run_dir: Path) -> None:
        """The summary, report and recipe files, the report's figures and the bundle folder as artifacts."""
        run_dir = Path(run_dir)
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self._safely(f"artifact {name}", lambda n=name: self.client.log_artifact(self.run_id, str(run_dir / n)))
        for folder in ("report", "bundle"):
            if (run_dir / folder).is_dir():
                self._safely(
                    f"artifacts {folder}/",
                    lambda f=folder: self.client.log_artifacts(self.run_id, str(run_dir / f), artifact_path=f),
                )

    def set_tags(self, tags: dict) -> None:
        self._safely("tags", lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def finish(self, status: str) -> None:
        self._safely("the run's end", lambda: self.client.set_terminated(self.run_id, status))


def shown_uri(uri: str) -> str:
    """The URI without a password (http://user:secret@host -> http://user:***@host)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}" if ":" in cred else uri
    return uri


def tracking_uri(recipe) -> Optional[str]:
    """The URI tracking writes to, or None (off): the recipe's ``tracking.mlflow.uri``, else $MLFLOW_TRACKING_URI
    (``tracking.mlflow`` without a uri needs that variable)."""
    cfg = recipe.tracking.mlflow
    uri = (cfg.uri if cfg else None) or os.environ.get(URI_ENV) or None
    if cfg is not None and uri is None:
        raise TrackingUnavailable(
            "tracking.mlflow has no uri and $MLFLOW_TRACKING_URI is not set: give tracking.mlflow.uri "
            "(http://host:5000, sqlite:///mlflow.db or a folder) or remove tracking.mlflow"
        )
    return uri


def reachable(uri: str, timeout: float = 5.0) -> Optional[str]:
    """None when an http(s) tracking server answers its health check (other URIs are local), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:  # noqa: S310 (http(s))
            return None if reply.status == 200 else f"health check answered {reply.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def open_tracker(recipe, run_dir: Path) -> Tracker:
    """The run's tracker: MLflow when tracking is on and the server answers, else one that does nothing (with one
    warning saying why, when tracking was asked for)."""
    uri = tracking_uri(recipe)
    if uri is None:
        return Tracker()
    # the client's retries (7, with backoff: minutes) would hold the training at every refused write
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    why = reachable(uri)
    if why is not None:
        log.warning(
            "tracking: MLflow at %s cannot be reached (%s); the run goes on without tracking", shown_uri(uri), why
        )
        return Tracker()
    try:
        return MlflowTracker(recipe, run_dir, uri)
    except ImportError:
        log.warning(
            "tracking: MLflow is not installed (pip install 'edgedistill[tracking]'); the run goes on without tracking"
        )
    except TrackingUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 (a refused start is a warning, like a refused write)
        log.warning(
            "tracking: MLflow at %s refused the run (%s); the run goes on without tracking", shown_uri(uri), exc
        )
    return Tracker()
