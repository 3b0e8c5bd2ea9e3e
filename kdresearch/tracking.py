"""Everything the project says to MLflow goes through this module.

One `TrackedRun` per job: params (the flattened resolved config), tags, per-epoch metrics logged
in one batch per epoch (single `log_metric` calls cost ~20 ms each on SQLite), files as
artifacts, and an end status that is never left RUNNING: FINISHED, FAILED on an error, KILLED on
Ctrl-C.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional

from kdresearch.errors import KDResearchError

# A progress bar per artifact download would clutter the training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_tracking_uri() -> str:
    """`mlflow.db` in the project folder, whatever folder Hydra runs the job in.

    It is also the store that a plain `mlflow ui` started in the project folder opens.
    """
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def _check_server(uri: str, timeout: float = 15.0) -> None:
    """Fail fast with one message when a tracking server is unreachable (MLflow would retry for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise KDResearchError(
            f"MLflow tracking server {uri} is unreachable ({reason}). Start it, or drop tracking.uri "
            f"to use the local store {default_tracking_uri()}"
        ) from None


class FileLock:
    """An exclusive lock across processes on this machine (fcntl), released on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class Tracker:
    """A connection to one MLflow store and experiment."""

    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.mlflow = mlflow
        db_path = _sqlite_path(self.uri)
        if self.uri.startswith(("http://", "https://")):
            _check_server(self.uri)
        mlflow.set_tracking_uri(self.uri)
        # Locks that jobs of one machine share (store creation, training a shared teacher once).
        self.lock_dir = (db_path.parent if db_path else Path.home() / ".cache" / "kdresearch") / ".locks"
        if db_path is not None:
            # Several jobs creating a fresh SQLite store at once race on its schema; one at a time.
            db_path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(self.lock_dir / f"{db_path.name}.lock"):
                self.client = MlflowClient(self.uri)  # creates and migrates a new store's schema
                # Artifacts sit next to the database, not in ./mlruns of whichever folder a job runs in.
                self.experiment_id = self._experiment_id(experiment, (db_path.parent / "mlartifacts").as_uri())
        else:
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment_id(experiment, None)

    def _experiment_id(self, name: str, artifact_location: Optional[str]) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location)

    def start_run(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, object]) -> "TrackedRun":
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        tracked = TrackedRun(self, run.info.run_id)
        tracked.log_params(params)
        return tracked

    def resume_run(self, run_id: str) -> "TrackedRun":
        self.client.update_run(run_id, status="RUNNING")
        return TrackedRun(self, run_id)

    def find_runs(self, filter_string: str, max_results: int = 1):
        return self.client.search_runs(
            [self.experiment_id], filter_string=filter_string,
            order_by=["attributes.start_time DESC"], max_results=max_results,
        )

    def download_artifact(self, run_id: str, artifact_path: str, destination: Path) -> Path:
        destination.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(destination)))


class TrackedRun:
    """One MLflow run; use as a context manager so it always ends with the right status."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )

    def log_metrics_once(self, metrics: Mapping[str, float], step: int) -> None:
        """Log `metrics` at `step` unless the run already has them (a resumed job's last epoch)."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "test/acc")}
        if step not in logged:
            self.log_metrics(metrics, step)

    def log_file(self, path: Path, artifact_dir: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.end(status)
        except Exception:  # the interrupted client may be unusable (e.g. a locked SQLite session)
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(self.tracker.uri).set_terminated(self.run_id, status=status)
            except Exception as error:  # never hide the original error
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, error)
        return False


class NullRun:
    """Stands in for TrackedRun on data-parallel ranks other than 0, which log nothing."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self) -> "NullRun":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """{'loss': {'T': 2}} -> {'loss.T': 2}; lists stay whole values."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def metric_history(client, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step: what tests and comparison scripts read back."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys
    }
