"""Where a study lives and how its workers share it: Optuna's RDB storage (SQLite on one machine, PostgreSQL for
several), heartbeats that mark a killed worker's trial failed, and a study-wide lock so that the workers together
start exactly the trials asked for.

- **Storage**: ``sqlite:///path.db`` (default: ``<run>/tune.db``), or ``postgresql://user:pass@host:port/db``
  (driven by psycopg 3; ``postgresql+psycopg://`` is written for it when no psycopg2 is installed).
- **Heartbeats**: a running trial's worker records a heartbeat every ``heartbeat`` seconds; a trial whose
  heartbeat is older than three of them is failed by the next worker that looks (``optuna.storages.
  fail_stale_trials``) and queued again with the same values (Optuna's retry callback), so a killed worker's
  trial is neither left running nor lost. Its training resumes from its last checkpoint (the retried trial keeps
  the killed one's folder).
- **The lock**: the next trial is asked for under a study-wide lock (PostgreSQL: an advisory lock, released by the
  server when the holder dies; SQLite: ``flock`` on a file beside the database), after counting what is finished,
  running or queued, so that two workers never both start the last trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import zlib
from pathlib import Path
from typing import Iterator, Optional

from edgedistill.errors import RecipeError
from edgedistill.run.tracking import shown_uri

log = logging.getLogger(__name__)


def storage_url(url: str) -> str:
    """The SQLAlchemy URL Optuna gets: psycopg 3 for a plain ``postgresql://`` when psycopg2 is absent."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, heartbeat: int):
    """Optuna's RDB storage at ``url`` with heartbeats and retries of trials whose worker died."""
    import inspect
    import warnings

    import optuna
    from optuna.storages import RDBStorage

    # heartbeats with ask/tell: this module beats (Heartbeat) and fails stale trials itself (next_trial)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna 4.9 renamed failed_trial_callback and RetryFailedTrialCallback (the old names warn)
    retry = "heartbeat_stale_trial_callback"
    if retry in inspect.signature(RDBStorage.__init__).parameters:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    else:
        from optuna.storages import RetryFailedTrialCallback as Retry

        retry = "failed_trial_callback"

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return RDBStorage(
            storage_url(url),
            engine_kwargs=kwargs,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            **{retry: Retry(max_retry=3)},
        )
    except Exception as exc:  # noqa: BLE001
        # SQLAlchemy's OperationalError (server down, wrong password), a missing driver: say which and what to do
        raise RecipeError(
            f"--storage {shown_uri(url)}: cannot open the study's database ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); check the URL, that the server runs and accepts this user"
        ) from None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (made if missing) while the block runs; released if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def study_lock(url: str, study: str) -> Iterator[None]:
    """Held while a worker counts the trials and asks for the next one."""
    if url.startswith("sqlite:///"):
        with file_lock(Path(url[len("sqlite:///") :] + ".lock")):
            yield
        return
    if url.startswith(("postgresql", "postgres")):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(storage_url(url), poolclass=NullPool)
        key = zlib.crc32(f"edgedistill-tune/{study}".encode()) & 0x7FFFFFFF
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    log.warning("tune: no study-wide lock for %s: several workers may start a few trials more than asked", url)
    yield


class Heartbeat:
    """A running trial's heartbeat, recorded every ``interval`` seconds on a thread until :meth:`stop`."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        self.storage.record_heartbeat(self.trial_id)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 (a lost beat: the next one may land; the trial goes on)
                log.warning("tune: heartbeat of trial %d not recorded (%s)", self.trial_id, exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
