"""The MLflow store a job talks to: its URI checked, its schema created once, experiments and runs
opened; the rule for recordable keys; reading metric histories back.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional

from kdresearch.errors import KDResearchError, first_line
from kdresearch.layout import PROJECT_ROOT
from kdresearch.runtime.locks import InterruptibleLock
from kdresearch.tracking import names
from kdresearch.tracking.run import TrackedRun, full_disk

# A progress bar per artifact download would clutter the training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger(__name__)

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


def default_tracking_uri() -> str:
    """`mlflow.db` in the project folder, whatever folder Hydra runs the job in.

    It is also the store that a plain `mlflow ui` started in the project folder opens.
    """
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// tracking URI; None for any other store."""
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
    path = sqlite_path(uri)
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




class _FullDiskReported(logging.Filter):
    """MLflow logs every SQLite error with its traceback before raising it; a full disk is then
    reported by the job in one line (`Tracker.full_disk_error`), so its traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and full_disk(record.exc_info[1]))


FULL_DISK_REPORTED = _FullDiskReported()


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
        self.db_path = db_path = sqlite_path(self.uri)
        logging.getLogger("mlflow.store.db.utils").addFilter(FULL_DISK_REPORTED)  # once: filters are a set
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
        except (MlflowException, OSError) as error:
            full = self.full_disk_error(error, "start the job again")
            if full is not None:
                raise full from None
            if isinstance(error, OSError):
                raise
            raise KDResearchError(f"MLflow store {self.uri} cannot be used: {first_line(error)}") from None

    def full_disk_error(self, error: BaseException, then: str) -> Optional[KDResearchError]:
        """One line naming the store and its full disk when `error` means the disk is full (see
        `full_disk`), ending with what to do once there is space (`then`); None for other errors."""
        reason = full_disk(error)
        if reason is None:
            return None
        # A SQLite store keeps its artifacts beside the database (mlartifacts/): one disk for both.
        where = self.db_path.parent if self.db_path is not None else self.uri
        return KDResearchError(f"MLflow store {self.uri} cannot be written: the disk holding {where} is full "
                               f"({reason}); free space there, then {then}")

    def lock(self, name: str, timeout: Optional[float] = None) -> InterruptibleLock:
        """An exclusive lock shared by the jobs of this machine, interruptible by Ctrl-C / SIGTERM
        (timeout in seconds; None: wait as long as its holder needs, e.g. to train a shared teacher)."""
        return InterruptibleLock(self.lock_dir / name, timeout)

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
        from kdresearch.tracking import lineage

        check_param_keys(params)
        tags = {**lineage.lineage_tags(), **tags}
        if parent_run_id:
            tags[names.PARENT_RUN_ID] = parent_run_id
        try:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        except Exception as error:
            full = self.full_disk_error(error, "start the job again")
            if full is None:
                raise
            raise full from None
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




def metric_history(client, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step: what tests and comparison scripts read back."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys
    }
