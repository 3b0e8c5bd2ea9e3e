"""Everything the project says to MLflow goes through this module.

One `TrackedRun` per job: params (the flattened resolved config), tags (the job's own and the
lineage of kdresearch.lineage), the data as dataset inputs, per-epoch metrics logged in one batch
per epoch (single `log_metric` calls cost ~20 ms each on SQLite), files as artifacts, the final
model as an MLflow model, and an end status that is never left RUNNING: FINISHED, FAILED on an
error, KILLED on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from filelock import FileLock, Timeout

from kdresearch.errors import KDResearchError

# A progress bar per artifact download would clutter the training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The experiment kind MLflow 3 records for model-training experiments (its UI's experiment-type
# setting writes this tag). The 3.17 UI does not yet choose its landing page from it: a browser
# opens an experiment on the GenAI overview until "Model training" is chosen once (remembered by
# the browser) or the link carries ?workflowType=machine_learning, as the links the project prints do.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Stores MLflow can open; anything else (a typo such as htp://) gets one line instead of a traceback.
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
# MLflow's own rule for param and metric names (mlflow.utils.validation), checked before a run exists.
VALID_KEY = re.compile(r"^[/\w.\- :]*$")
MAX_KEY_LENGTH = 250
STORE_LOCK_SECONDS = 600  # creating a store's schema takes seconds; a longer wait means a stuck job
# MLflow retries an HTTP request up to 7 times with exponential backoff (minutes) inside the call,
# holding up training; a job tries each write a few seconds and keeps it for later instead
# (TrackedRun.flush). Users' own settings of these variables win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MAX_PAUSE_SECONDS = 30.0


def default_tracking_uri() -> str:
    """`mlflow.db` in the project folder, whatever folder Hydra runs the job in.

    It is also the store that a plain `mlflow ui` started in the project folder opens.
    """
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def check_uri(uri: str) -> None:
    """One-line errors for a tracking URI MLflow cannot use, before any store is touched."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in KNOWN_SCHEMES:
        raise KDResearchError(
            f"tracking.uri={uri!r} is not a tracking store MLflow opens; use sqlite:////abs/path/mlflow.db, "
            f"http://host:port, or leave it null for {default_tracking_uri()}"
        )
    path = _sqlite_path(uri)
    if path is None:
        return
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and not path.is_absolute():
        path = Path.cwd() / path
    existing = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise KDResearchError(f"tracking.uri={uri}: {existing} is a file, so the store cannot be created under it")
    if path.is_dir():
        raise KDResearchError(f"tracking.uri={uri}: {path} is a folder; name a database file, e.g. {path}/mlflow.db")
    writable = path if path.exists() else existing
    if writable is not None and not os.access(writable, os.W_OK):
        raise KDResearchError(f"tracking.uri={uri}: {writable} is not writable; choose another store path")


def recordable_key(key: str) -> bool:
    """Whether MLflow accepts `key` as a param or metric name."""
    return len(key) <= MAX_KEY_LENGTH and bool(VALID_KEY.match(key))


def check_param_keys(keys: Iterable[str]) -> None:
    """Config keys become MLflow params; refuse the ones MLflow would refuse, before a run exists."""
    for key in keys:
        if len(key) > MAX_KEY_LENGTH:
            raise KDResearchError(
                f"config key {key[:60]}... is {len(key)} characters; MLflow records keys of at most "
                f"{MAX_KEY_LENGTH}: shorten it"
            )
        if not VALID_KEY.match(key):
            raise KDResearchError(
                f"config key {key!r} cannot be recorded in MLflow: keys may hold only letters, digits, "
                f"'_', '-', '.', ' ', ':' and '/'; rename it"
            )


def unreachable(error: BaseException) -> bool:
    """Whether a failed MLflow call means the tracking server could not be reached (worth keeping
    the write and retrying), rather than a refused request."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError)):
        return True
    from mlflow.exceptions import MlflowException

    text = str(getattr(error, "message", error))
    return isinstance(error, MlflowException) and text.startswith("API request to") and "failed with" in text


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


@dataclass(frozen=True)
class DatasetRecord:
    """One split of the data as an MLflow dataset input (the runs table's Dataset column).
    MLflow keeps one dataset per (name, digest) in an experiment, so the split is part of the
    logged name (cifar10-train, cifar10-test); all splits share the digest."""

    name: str       # the data's name, e.g. cifar10
    digest: str     # the data fingerprint
    source: str     # the data root, or `synthetic`
    context: str    # train | validation | test
    rows: int
    num_classes: int

class Tracker:
    """A connection to one MLflow store and experiment."""

    def __init__(self, uri: Optional[str], experiment: str, retry_minutes: float = 10.0):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.experiment_name = experiment
        self.retry_seconds = 60.0 * retry_minutes  # how long a run keeps writes while the server is away
        self.mlflow = mlflow
        check_uri(self.uri)
        db_path = _sqlite_path(self.uri)
        if self.uri.startswith(("http://", "https://")):
            _check_server(self.uri)
            for name, value in HTTP_RETRY_DEFAULTS.items():
                os.environ.setdefault(name, value)
        mlflow.set_tracking_uri(self.uri)
        # Locks that jobs of one machine share (store creation, training a shared teacher once).
        self.lock_dir = (db_path.parent if db_path else Path.home() / ".cache" / "kdresearch") / ".locks"
        try:
            if db_path is not None:
                # Several jobs creating a fresh SQLite store at once race on its schema; one at a time.
                db_path.parent.mkdir(parents=True, exist_ok=True)
                with self.lock(f"{db_path.name}.lock", STORE_LOCK_SECONDS):
                    self.client = MlflowClient(self.uri)  # creates and migrates a new store's schema
                    # Artifacts sit next to the database, not in ./mlruns of whichever folder a job runs in.
                    self.experiment_id = self._experiment_id(experiment, (db_path.parent / "mlartifacts").as_uri())
            else:
                self.client = MlflowClient(self.uri)
                self.experiment_id = self._experiment_id(experiment, None)
        except MlflowException as error:
            first_line = str(error.message).strip().splitlines()[0] if str(error.message).strip() else type(error)
            raise KDResearchError(f"MLflow store {self.uri} cannot be used: {first_line}") from None

    def lock(self, name: str, timeout: float = -1) -> FileLock:
        """An exclusive lock shared by the jobs of this machine (filelock; timeout in seconds, -1: wait)."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        return _TimedLock(str(self.lock_dir / name), timeout=timeout)

    def _experiment_id(self, name: str, artifact_location: Optional[str]) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        if found.lifecycle_stage == "deleted":
            raise KDResearchError(
                f"experiment {name!r} is deleted in {self.uri}; restore it (mlflow experiments restore "
                f"--experiment-id {found.experiment_id}) or choose another tracking.experiment"
            )
        for key, value in EXPERIMENT_KIND.items():
            if key not in found.tags:  # an experiment made by older code or by hand: open on its runs too
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def start_run(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, object],
                  parent_run_id: Optional[str] = None) -> "TrackedRun":
        """A new run with `tags`, the lineage tags and `params`; a child of `parent_run_id` when given.
        Params are checked first, so a bad key never leaves a run behind."""
        from kdresearch import lineage

        check_param_keys(params)
        tags = {**lineage.lineage_tags(), **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        tracked = TrackedRun(self, run.info.run_id)
        with tracked.failing_on_error():
            tracked.log_params(params)
            git = lineage.git_state()
            if git is not None and git.dirty:
                tracked.log_text(git.diff, "lineage/git_diff.patch")
        return tracked

    def run_url(self, run_id: str) -> str:
        """The run's page in the tracking server's UI, on the model-training view."""
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning"

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


class _TimedLock(FileLock):
    """filelock's lock whose timeout becomes one line naming the lock file."""

    def acquire(self, *args, **kwargs):
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            raise KDResearchError(
                f"waited {self.timeout:g} s for lock {self.lock_file}; another job holds it (or crashed "
                f"holding it on a file system without locks): retry, or delete the file if no job runs"
            ) from None


class TrackedRun:
    """One MLflow run; use as a context manager so it always ends with the right status.

    Writes go through `_send`: when the tracking server cannot be reached, they are kept in order
    and retried (before every later write, and with backoff where the caller waits) for up to
    `tracking.retry_minutes`, so training goes on through a server restart; past that bound the
    job stops with one line and its checkpoints, from which `resume=` completes the run.
    """

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id
        self.system_metrics = None
        self.pending: deque[Callable[[], object]] = deque()
        self.outage_started: Optional[float] = None
        self.pause = 1.0
        self.resume_hint = "resume=<the job folder>"  # what the outage message tells users to run

    # --- writes that survive a tracking-server outage -------------------------------------------

    def _send(self, write: Callable[[], object], wait: bool = True) -> None:
        self.pending.append(write)
        self.flush(wait)

    def flush(self, wait: bool = True) -> None:
        """Send the kept writes in order. `wait=False` returns at the first unreachable attempt
        (training goes on); `wait=True` retries with backoff until all are sent. Either way, an
        outage longer than the tracker's retry bound raises KDResearchError."""
        while self.pending:
            try:
                self.pending[0]()
            except Exception as error:
                if not unreachable(error):
                    raise
                self._outage(error)
                if not wait:
                    return
                time.sleep(self.pause)
                self.pause = min(2 * self.pause, MAX_PAUSE_SECONDS)
                continue
            self.pending.popleft()
            if self.outage_started is not None and not self.pending:
                log.warning("MLflow tracking server %s is back after %.0f s; every kept write is sent",
                            self.tracker.uri, time.monotonic() - self.outage_started)
                self.outage_started, self.pause = None, 1.0

    def _outage(self, error: BaseException) -> None:
        now = time.monotonic()
        bound = self.tracker.retry_seconds
        if self.outage_started is None:
            self.outage_started = now
            log.warning("MLflow tracking server %s is unreachable; training goes on, its writes are kept and "
                        "retried for up to %.1f min (tracking.retry_minutes)", self.tracker.uri, bound / 60)
        elif now - self.outage_started > bound:
            raise KDResearchError(
                f"MLflow tracking server {self.tracker.uri} unreachable for more than {bound / 60:.1f} min "
                f"(tracking.retry_minutes); the job stopped with its checkpoints intact: once the server is back, "
                f"{self.resume_hint} completes MLflow run {self.run_id}"
            )

    # --- what a run records ---------------------------------------------------------------------

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            batch = items[start:start + 100]
            self._send(lambda batch=batch: self.client.log_batch(self.run_id, params=batch))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._send(lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_metrics(self, metrics: Mapping[str, float], step: int, wait: bool = True) -> None:
        """One batch of metrics at `step`; `wait=False` keeps it for later while the server is away."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._send(lambda: self.client.log_batch(self.run_id, metrics=batch), wait)

    def log_missing_epochs(self, history: Mapping[int, Mapping[str, float]]) -> None:
        """Log each epoch's metrics the run does not hold yet (a resumed job: the epoch whose write
        a kill interrupted, or all epochs an outage kept from the server)."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "test/acc")}
        for step, metrics in sorted(history.items()):
            if step not in logged:
                self.log_metrics(metrics, step)

    def log_file(self, path: Path, artifact_dir: Optional[str] = None) -> None:
        self._send(lambda: self.client.log_artifact(self.run_id, str(path), artifact_dir))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_datasets(self, datasets: Iterable[DatasetRecord]) -> None:
        """The data as dataset inputs: MLflow's Dataset column and dataset filter read these."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for record in datasets:
            local = record.source != "synthetic"
            source = json.dumps({"uri": record.source} if local else {"tags": {"generator": "kdresearch.data.make_synthetic"}})
            dataset = Dataset(
                name=f"{record.name}-{record.context}", digest=record.digest, source_type="local" if local else "code", source=source,
                schema=json.dumps({"images": "float32 [3, 32, 32] per sample", "labels": f"int64 in [0, {record.num_classes})"}),
                profile=json.dumps({"num_rows": record.rows, "num_classes": record.num_classes}),
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", record.context)]))
        self._send(lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def log_model(self, model, input_example, registered_model_name: Optional[str] = None):
        """`model` as an MLflow model of this run (torch.export's pt2 format: a traced graph and
        tensors, which loading does not unpickle) with its signature and `input_example`. With
        `registered_model_name` it is also registered in the Model Registry; a registry that cannot
        be reached costs a warning and a `registered_model_error` tag, never the run."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        logged = []

        def write() -> None:
            experiment = self.client.get_run(self.run_id).info.experiment_id
            self.tracker.mlflow.set_experiment(experiment_id=experiment)  # the model entity's experiment
            logged.append(mlflow.pytorch.log_model(
                model, name="model", run_id=self.run_id, serialization_format="pt2",
                input_example=input_example, signature=infer_signature(input_example, output),
                # The requirements MLflow would infer by importing and scanning cost seconds per run.
                pip_requirements=[f"{name}=={version}" for name, version in _model_requirements().items()],
            ))

        self._send(write)
        info = logged[0]
        if registered_model_name:
            try:
                version = self.tracker.mlflow.register_model(info.model_uri, registered_model_name)
                self.set_tags({"registered_model": f"{registered_model_name}/{version.version}"})
            except Exception as error:  # the registry may live elsewhere (MLFLOW_REGISTRY_URI) and be down
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.warning("model not registered as %s: %s", registered_model_name, reason)
                self.set_tags({"registered_model_error": reason[:5000]})
        return info

    def start_system_metrics(self) -> None:
        """MLflow's own CPU / memory / GPU sampling for this run (system/* metrics), stopped when the
        run ends; every 10 s unless MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise."""
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10.0
        self.system_metrics = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                   samples_before_logging=1, tracking_uri=self.tracker.uri)
        self.system_metrics.start()

    def end(self, status: str, wait: bool = True) -> None:
        """Send what is kept (waiting for the server up to the bound when `wait`), then the status."""
        if self.system_metrics is not None:
            self.system_metrics.finish()
            self.system_metrics = None
        # An outage past the bound raises here, before the status: the run stays RUNNING on the
        # server for resume= to complete (set_terminated would only fail the same way).
        self.flush(wait)
        self.client.set_terminated(self.run_id, status=status)

    def failing_on_error(self) -> "TrackedRun":
        """`with run.failing_on_error():` ends the run FAILED/KILLED if the block raises, else leaves it open."""
        return _EndOnError(self)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if self.pending:
            log.warning("%d MLflow writes could not be sent (the server was unreachable); resume= sends them",
                        len(self.pending))
            self.pending.clear()  # the checkpoint holds every epoch's metrics
        try:
            self.end(status, wait=False)
        except Exception:  # the interrupted client may be unusable (e.g. a locked SQLite session)
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(self.tracker.uri).set_terminated(self.run_id, status=status)
            except Exception as error:  # never hide the original error
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, error)
        return False


class _EndOnError:
    def __init__(self, run: TrackedRun):
        self.run = run

    def __enter__(self) -> TrackedRun:
        return self.run

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.run.__exit__(exc_type, exc, tb)
        return False


def _model_requirements() -> dict[str, str]:
    from kdresearch.lineage import package_versions

    versions = package_versions()
    return {name: versions[name] for name in ("torch", "mlflow") if versions[name] != "not installed"}


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
