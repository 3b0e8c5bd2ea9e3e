"""Shared fixtures and helpers: paths, MLflow stores, and training jobs run three ways.

- `train_in_process(store, *overrides)`: the job in the test's own process (Hydra's compose API
  and `run_job`), reporting as `train.py` would (exit status 1 and one `error:` line for a
  `KDResearchError`). About a second for a `debug=tiny` job: what a test uses unless it is about
  the process itself.
- `run_train(store, *overrides)`: `python train.py` as a user runs it, for what only the process
  shows: its exit status and output as `train.py` and Hydra print them, signals, a real start-up.
  A fresh interpreter costs several seconds of imports.
- `start_train(store, name, *overrides)`: that process in the background (a processes.Process,
  its output in a log file), for tests that signal, kill or wait on it.

`compose_config` / `compose_job` give the config such a job runs, for tests that call `run_job`
themselves. The job helpers run with `data=synthetic quiet=true`, their own job folder and an
SQLite MLflow store inside the test's temporary folder, so tests never touch the project's
`mlflow.db`, `outputs/` or caches. A store starts as a copy of one empty store migrated once per
session (MLflow's schema migrations cost seconds per new SQLite file).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import logging
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from processes import REPO_ROOT, Process, process_env, run_command, stop_leftovers  # noqa: F401 (re-exported)

from kdresearch.layout import CONF_DIR

TRAIN_PY = REPO_ROOT / "train.py"
# ../shared beside the repository (in CI the repository is cloned elsewhere with ../shared next to it).
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-real-10k"
EXPERIMENT = "kdresearch"

# Small and fast: conf/debug/tiny.yaml (1 epoch of student and automatic teacher, 256/128 images,
# no MLflow model export). What jobs use unless the test is about accuracy or the exported model.
FAST = ("debug=tiny",)
# What every job of a test runs with, besides its store.
JOB_DEFAULTS = ("data=synthetic", "quiet=true")
# Hydra's default job log format: lines of in-process jobs read like those of `python train.py`.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

_run_numbers = itertools.count(1)
_session: dict[str, Path] = {}


# --- MLflow stores ----------------------------------------------------------------------------------

def load_script(name: str):
    """scripts/<name>.py as a module, so a test calls its main() or parse_args() in process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


@pytest.fixture(scope="session", autouse=True)
def _session_folder(tmp_path_factory):
    _session["folder"] = tmp_path_factory.mktemp("session")


def empty_store() -> Path:
    """An MLflow SQLite database with its schema migrated and no experiment yet, made once per
    session; stores start as copies of it."""
    path = _session["folder"] / "empty-store" / "mlflow.db"
    if not path.exists():
        from mlflow.tracking import MlflowClient

        path.parent.mkdir()
        MlflowClient(tracking_uri(path.parent)).search_experiments()  # creates and migrates the schema
    return path


def new_store(folder: Path) -> Path:
    """`folder` holding an empty, migrated MLflow store (kept if it has one already)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mlflow.db").exists():
        shutil.copy(empty_store(), folder / "mlflow.db")
    return folder


def mlflow_client(store: Path):
    """An MlflowClient on `store`'s SQLite database. A store that has none yet gets a copy of the
    migrated empty one first: the client would create and migrate it itself, seconds per store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(new_store(store)))


def experiment_runs(client, experiment: str = EXPERIMENT, filter_string: str = ""):
    """All runs of the experiment (oldest first); [] when the store or experiment does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


# --- jobs -----------------------------------------------------------------------------------------

def compose_config(*overrides: str, hydra: bool = False):
    """The job config `python train.py <overrides>` would run (Hydra's compose API on the package's
    config tree); with `hydra`, the `hydra` node is kept (launchers, sweepers)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def job_overrides(store: Path, *overrides: str) -> list[str]:
    """The overrides of a test job on `store`: its tracking URI and cache, synthetic data, no
    progress bars, then the test's own (the last value wins)."""
    return [f"tracking.uri={tracking_uri(store)}", *JOB_DEFAULTS, f"cache.dir={Path(store) / 'cache'}", *overrides]


def compose_job(store: Path, *overrides: str):
    """The config of a test job on `store` (a copy of the migrated empty store unless it has one):
    `job_overrides` composed, for tests that call `run_job` themselves."""
    return compose_config(*job_overrides(new_store(store), *overrides))


def _prepare_store(store: Path, overrides: tuple[str, ...], fresh_store: bool) -> Path:
    """The store folder, holding a copy of the migrated empty store unless `fresh_store` or the job
    tracks elsewhere (a `tracking.uri=` override: the store folder must then stay as it is)."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    if not fresh_store and not any(o.startswith("tracking.uri=") for o in overrides):
        new_store(store)
    return store


def run_train(store: Path, *overrides: str, timeout: float = 600, fresh_store: bool = False):
    """`python train.py <overrides>` from the repository root, on the MLflow store in `store`
    (a copy of the migrated empty store unless `fresh_store`), one compute thread (tests run two
    jobs side by side on 2 cores with run_parallel).

    Returns the CompletedProcess; `.stdout` / `.stderr` hold the text, `.output` both together,
    `.run_dir` the job folder."""
    store = _prepare_store(store, overrides, fresh_store)
    run_dir = store / f"run-{next(_run_numbers)}"
    command = [sys.executable, str(TRAIN_PY), *job_overrides(store, *overrides), f"hydra.run.dir={run_dir}"]
    done = run_command(command, timeout, one_thread=True)
    done.run_dir = run_dir
    return done


def start_train(store: Path, name: str, *overrides: str, fresh_store: bool = False, **process_options) -> Process:
    """`python train.py <overrides>` started in the background on the MLflow store in `store` (as
    `run_train`), with one compute thread, job folder `store/<name>` (`.run_dir`) and its output in
    `store/<name>.log`; `process_options` go to processes.Process (signals, process groups)."""
    store = _prepare_store(store, overrides, fresh_store)
    run_dir = store / name
    command = [sys.executable, str(TRAIN_PY), *job_overrides(store, *overrides), f"hydra.run.dir={run_dir}"]
    process = Process(command, store / f"{name}.log", one_thread=True, **process_options)
    process.store, process.run_dir = store, run_dir
    return process


def describe(job) -> str:
    """A finished job (process or in-process) for a failure message: its command, exit status and
    the end of its output."""
    return f"{' '.join(map(str, job.args))}\nexit {job.returncode}\n{job.output[-5000:]}"


@dataclass
class InProcessJob:
    """What `train_in_process` ran and what it printed, shaped like `run_train`'s CompletedProcess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    result: object  # kdresearch.training.job.JobResult; None when the job failed
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def run_id(self) -> Optional[str]:
        return self.result.run_id if self.result is not None else None


@contextlib.contextmanager
def _job_state():
    """Keep what a job changes in its process from leaking into later tests: the RNGs it seeds,
    torch's determinism switches, the root logger's level."""
    import numpy
    import torch

    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    python_rng, numpy_rng = random.getstate(), numpy.random.get_state()
    root = logging.getLogger()
    level = root.level
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        root.setLevel(level)
        random.setstate(python_rng)
        numpy.random.set_state(numpy_rng)
        torch.use_deterministic_algorithms(deterministic[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic[1:3]
        if deterministic[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = deterministic[3]


def train_in_process(store: Path, *overrides: str, fresh_store: bool = False, sweep: Optional[str] = None,
                     run_dir: Optional[Path] = None) -> InProcessJob:
    """The job `run_train(store, *overrides)` runs, in this process: composed with Hydra's compose
    API, run by `kdresearch.training.job.run_job` with the overrides `train.py` would record, its
    log lines (and anything printed) captured. A `KDResearchError` ends it as `train.py` ends one:
    exit status 1 and the line `error: <message>`; any other exception propagates (a traceback).
    `sweep` tags the job as part of that sweep; `run_dir` is its job folder (default: a new one
    in the store)."""
    from kdresearch.errors import KDResearchError
    from kdresearch.runtime import distributed
    from kdresearch.training.job import run_job

    store = _prepare_store(store, overrides, fresh_store)
    run_dir = Path(run_dir) if run_dir else store / f"run-{next(_run_numbers)}"
    recorded = job_overrides(store, *overrides)
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    returncode, result = 0, None
    started = time.perf_counter()
    with _job_state(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            result = run_job(compose_config(*recorded), run_dir, overrides=tuple(recorded), sweep=sweep)
        except KDResearchError as error:
            logging.getLogger("train").error("error: %s", error)
            returncode = 1
        finally:
            distributed.shutdown()
            root.removeHandler(handler)
    return InProcessJob(["train_in_process", *recorded], returncode, stdout.getvalue(), stderr.getvalue(), run_dir,
                        result, time.perf_counter() - started)


def train_command_in_process(command: list[str]) -> int:
    """A pipeline's job process run in this process instead (tests replace
    `kdresearch.pipelines.jobs.run_to_end` with it): the `python -m kdresearch.train <overrides>`
    job trained in the folder its `hydra.run.dir=` names, recording the overrides a process would.
    Returns the exit status, 0 (a failing job raises)."""
    from kdresearch.layout import train_command
    from kdresearch.training.job import run_job

    overrides = command[len(train_command()):]
    folder = next(item.partition("=")[2] for item in overrides if item.startswith("hydra.run.dir="))
    recorded = [item for item in overrides if not item.startswith("hydra.")]
    with _job_state():
        run_job(compose_config(*recorded), Path(folder), overrides=tuple(recorded))
    return 0


def interrupted_after_epoch_1(client, job, folder: Path) -> Path:
    """`folder` made to look like `job`'s folder after a stop in epoch 2: its epoch-1 checkpoint alone,
    and its run KILLED as a stopped job leaves it (a FINISHED run is never reopened by resume=)."""
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(job.checkpoint).parent / "epoch_0001.pt", folder / "checkpoints")
    client.set_terminated(job.run_id, "KILLED")
    return folder


def assert_resumed_exactly(done_path: Path, again_path: Path) -> None:
    """The final checkpoints of an uninterrupted and a resumed job hold the same weights, the same
    loss state (connectors, heads, banks) and the same metrics (but for the epoch's wall time)."""
    import torch

    from kdresearch.training.checkpoint import load_checkpoint

    done, again = load_checkpoint(done_path), load_checkpoint(again_path)
    for section in ("model", "loss"):
        assert done[section].keys() == again[section].keys()
        for key, tensor in done[section].items():
            assert torch.equal(tensor, again[section][key]), f"{section}.{key}"
    drop = {"epoch_seconds"}
    assert {k: v for k, v in done["metrics"].items() if k not in drop} == {
        k: v for k, v in again["metrics"].items() if k not in drop}


def check_ok(done):
    """Fail with the job's own output when it did not exit 0."""
    assert done.returncode == 0, describe(done)
    return done


def run_parallel(tasks: dict[str, Callable[[], object]], workers: int = 2) -> dict[str, object]:
    """Run independent tasks (each typically one or a chain of `run_train` calls) `workers` at a
    time: a job's start-up (imports, store) is single-threaded, so two at once halve the wall time
    on 2 cores. Returns {name: result}; a task's exception is re-raised here. At most one task may
    train in-process (`train_in_process` jobs share this process's RNGs and logging)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        return {name: future.result() for name, future in futures.items()}


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _stop_leftover_processes():
    """Kill (by their own pid) any process a failing test left running."""
    yield
    stop_leftovers()


@pytest.fixture(scope="session", autouse=True)
def _stop_outliving_processes():
    """And, at the end, those that module fixtures kept for several tests."""
    yield
    stop_leftovers(include_outliving=True)


@pytest.fixture(scope="module")
def one_compute_thread():
    """For modules of small in-process forward passes: intra-op threads gain nothing on tiny
    batches, and on 2 shared cores their spin-waiting slows such tests several-fold. Restored
    afterwards for the other modules. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path) -> Path:
    """A temporary folder for one MLflow store (mlflow.db, created by the first job on it),
    job folders and artifacts."""
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


@pytest.fixture
def client(store):
    """An MlflowClient on `store`'s SQLite database."""
    return mlflow_client(store)


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    """The real 10k-image CIFAR-10 sample in ../shared/data, or a skip saying why not."""
    folder = SHARED_CIFAR / "cifar-10-batches-py"
    if not folder.is_dir():
        pytest.skip(f"real CIFAR-10 sample not found at {SHARED_CIFAR} (expected ../shared/data beside the repository)")
    return SHARED_CIFAR
