"""Shared fixtures: paths, `python train.py` subprocesses on a temporary MLflow store, and the
real CIFAR-10 sample beside the repository.

Every training subprocess runs from the repository root with `data=synthetic quiet=true`, its
own `hydra.run.dir` and an SQLite MLflow store inside the test's temporary folder, so tests never
touch the project's `mlflow.db`, `outputs/` or caches.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
TRAIN_PY = REPO_ROOT / "train.py"
# ../shared beside the repository (in CI the repository is cloned elsewhere with ../shared next to it).
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-real-10k"
EXPERIMENT = "kdresearch"

# Small and fast: what integration tests use unless accuracy matters.
# Small and fast: conf/debug/tiny.yaml (1 epoch of student and automatic teacher, 256/128 images).
FAST = ("debug=tiny",)

_run_numbers = itertools.count(1)


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def run_command(command: list[str], timeout: float = 600, one_thread: bool = False) -> subprocess.CompletedProcess:
    """Run a `train.py` command line from the repository root as a user would see it.

    Returns the CompletedProcess with `.output` (stdout + stderr) and `.seconds` (wall time).
    `one_thread` gives the job one compute thread, for tests that run two jobs side by side.
    """
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)  # users see the short error, so tests do too
    env["PYTHONUNBUFFERED"] = "1"
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    done.seconds = time.perf_counter() - started
    done.output = done.stdout + done.stderr
    return done


def run_train(store: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` from the repository root, on the MLflow store in `store`.

    Returns the CompletedProcess; `.stdout` / `.stderr` hold the text, `.output` both together.
    """
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    run_dir = store / f"run-{next(_run_numbers)}"
    command = [
        sys.executable, str(TRAIN_PY),
        f"tracking.uri={tracking_uri(store)}", "data=synthetic", "quiet=true",
        f"hydra.run.dir={run_dir}", f"cache.dir={store / 'cache'}", *overrides,
    ]
    # One compute thread per job: tests run two jobs side by side (run_parallel) on 2 cores.
    done = run_command(command, timeout, one_thread=True)
    done.run_dir = run_dir
    return done


def check_ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the job's own output when it did not exit 0."""
    assert done.returncode == 0, f"{' '.join(done.args)}\nexit {done.returncode}\n{done.output[-6000:]}"
    return done


def run_parallel(tasks: dict[str, Callable[[], object]], workers: int = 2) -> dict[str, object]:
    """Run independent tasks (each typically one or a chain of `run_train` calls) `workers` at a
    time: a job's start-up (imports, store) is single-threaded, so two at once halve the wall time
    on 2 cores. Returns {name: result}; a task's exception is re-raised here."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        return {name: future.result() for name, future in futures.items()}


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(store))


def experiment_runs(client, experiment: str = EXPERIMENT, filter_string: str = ""):
    """All runs of the experiment (oldest first); [] when the store or experiment does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


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
    """A temporary folder holding one MLflow store (mlflow.db), job folders and artifacts."""
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
