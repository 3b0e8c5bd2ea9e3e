"""One MLflow run of a job, the one way the project writes to a run.

One `TrackedRun` per job: params (the flattened resolved config), tags (the job's own and the
lineage of kdresearch.tracking.lineage), the data as dataset inputs, per-epoch metrics logged in one batch
per epoch (single `log_metric` calls cost ~20 ms each on SQLite), files as artifacts, the final
model as an MLflow model, and an end status that is never left RUNNING: FINISHED, FAILED on an
error, KILLED on Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional

from kdresearch.errors import KDResearchError, first_line

if TYPE_CHECKING:
    from kdresearch.tracking.store import Tracker

log = logging.getLogger(__name__)

MAX_PAUSE_SECONDS = 30.0  # the longest wait between two attempts to reach an unreachable server
SQLITE_FULL = "database or disk is full"  # SQLite's message for SQLITE_FULL (no space for the database or its journal)
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # an artifact copied onto a full disk or past a quota


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


def full_disk(error: Optional[BaseException]) -> Optional[str]:
    """Why a failed write means the disk under the store is full, or None for any other error:
    SQLite's "database or disk is full" (MLflow wraps it in MlflowException) or an OSError ENOSPC /
    EDQUOT (an artifact copied next to the store), wherever it sits in the error's chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
            return error.strerror or os.strerror(error.errno)
        if SQLITE_FULL in str(getattr(error, "message", None) or error):
            return SQLITE_FULL
        error = error.__cause__ or error.__context__
    return None



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
        self.resume_hint: Optional[str] = None  # `resume=<folder>`, set by the job once it can complete the run

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
                full = self.tracker.full_disk_error(error, self._completion())
                if full is not None:
                    raise full from None
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
                f"{self._completion()}"
            )

    def _completion(self) -> str:
        """What completes this run once MLflow takes its writes again."""
        if self.resume_hint is None:  # the job has no folder to resume from yet
            return "start the job again"
        return f"{self.resume_hint} completes MLflow run {self.run_id}"

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
                reason = first_line(error)
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
        if self.pending and self.outage_started is not None:
            log.warning("%d MLflow writes could not be sent (the server was unreachable); resume= sends them",
                        len(self.pending))
        # The checkpoint holds every epoch's metrics; a write the store refused (a full disk, a bad
        # value) is what the error being raised reports.
        self.pending.clear()
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
    from kdresearch.tracking.lineage import package_versions

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
