"""Tracking and data housekeeping: tag names and the one filter-quoting rule against a real store,
the interruptible lock with a timeout, no import cycle in the package, a full disk under the SQLite
store reported in one line, and limits drawn across the classes for every kind of data.
"""

from __future__ import annotations

import ast
import errno
import logging
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from filelock import FileLock
from hydra import compose, initialize_config_dir
from PIL import Image

from kdresearch.data.cifar import CIFAR10_CLASSES, load_cifar10
from kdresearch.data.image_folder import load_image_folder
from kdresearch.data.splits import LIMIT_SEED, in_memory_data, select_splits, stratified_sample
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.reports.compare import select_runs
from kdresearch.runtime import interrupts, locks
from kdresearch.sweeps.parent_runs import children
from kdresearch.sweeps.search import sweep_runs
from kdresearch.tracking import names
from kdresearch.tracking.run import full_disk
from kdresearch.tracking.store import Tracker


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    """One migrated store for the tests that only add runs of their own."""
    folder = tmp_path_factory.mktemp("store")
    return Tracker(f"sqlite:///{folder / 'mlflow.db'}", "kdresearch")


# --- tag names and filters --------------------------------------------------------------------------

def test_filters_find_runs_by_tags_whatever_quotes_the_value_holds(tracker, tmp_path):
    folder = tmp_path / "it's a sweep"  # a folder name with a quote: the filter must quote it the other way
    parent = tracker.start_run("parent", {names.ROLE: names.SWEEP_ROLE, names.SWEEP_DIR: str(folder)}, {})
    child = tracker.start_run("child", {names.ROLE: names.STUDENT_ROLE, names.SWEEP: str(folder),
                                        names.OUTPUT_DIR: str(folder / "0")}, {}, parent_run_id=parent.run_id)
    summary = tracker.start_run("summary", {names.ROLE: names.SUMMARY_ROLE, names.SWEEP: str(folder)}, {})
    for run in (parent, child, summary):
        run.end("FINISHED")
    assert [run.info.run_id for run in children(tracker, parent.run_id)] == [child.run_id]
    assert {run.info.run_id for run in sweep_runs(tracker, str(folder))} == {child.run_id, summary.run_id}
    # Runs that train nothing (the summary) are never rows of a comparison.
    assert [run.info.run_id for run in select_runs(tracker, sweep=str(folder))] == [child.run_id]
    assert names.tag_equals(names.PARENT_RUN_ID, "x") == "tags.`mlflow.parentRunId` = 'x'"
    with pytest.raises(KDResearchError, match="both quote characters"):
        names.quote("it's \"odd\"")


# --- the lock ---------------------------------------------------------------------------------------

@pytest.fixture
def held_lock(tmp_path, monkeypatch):
    """A lock file held by "another job" (a second lock object: flock excludes it in this process too)."""
    monkeypatch.setattr(locks, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(interrupts, "_requested", None)  # restored afterwards: the flag is process-wide
    path = tmp_path / ".locks" / "teacher-abc.lock"
    path.parent.mkdir()
    with FileLock(str(path)):
        yield path


def test_a_waiting_job_stops_on_ctrl_c_or_sigterm(held_lock):
    # What the signal handler that interrupts.install() sets, arriving while the job waits.
    threading.Timer(0.3, interrupts._handle, (signal.SIGTERM, None)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        locks.InterruptibleLock(held_lock).acquire()  # no timeout: it would wait for ever
    assert 0.3 <= time.monotonic() - started < 3


def test_a_lock_wait_times_out_with_one_line_naming_the_lock_file(held_lock, caplog):
    with caplog.at_level(logging.INFO, logger="kdresearch.runtime.locks"):
        with pytest.raises(KDResearchError) as caught:
            locks.InterruptibleLock(held_lock, timeout=0.2).acquire()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"waited 0.2 s for lock {held_lock};")
    assert [r.getMessage() for r in caplog.records] == [f"waiting for lock {held_lock}, held by another job"]


def test_the_store_and_shared_teacher_locks_are_the_interruptible_lock(tracker, monkeypatch):
    monkeypatch.setattr(locks, "POLL_SECONDS", 0.05)
    path = tracker.lock_dir / "teacher-abc.lock"
    with tracker.lock("teacher-abc.lock"):  # how teacher.sources takes it: free, so taken at once
        with pytest.raises(KDResearchError, match=f"for lock {path};"):
            tracker.lock("teacher-abc.lock", timeout=0.1).acquire()
    with tracker.lock("teacher-abc.lock", timeout=0.1):  # released by the with block
        pass


# --- no import cycle ----------------------------------------------------------------------------------

def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The kdresearch modules `path` imports at run time (in functions too; not `if TYPE_CHECKING:`)."""
    found = set()
    tree = ast.parse(path.read_text())
    type_only = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    skipped = {id(inner) for node in type_only for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for end in range(len(parts), 0, -1):  # the longest prefix that is a module of the package
                if ".".join(parts[:end]) in known:
                    found.add(".".join(parts[:end]))
                    break
    return found - {module}


def test_the_package_has_no_import_cycle():
    package = REPO_ROOT / "kdresearch"
    paths = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {module: _imports(path, module, set(paths)) for module, path in paths.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [module, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["kdresearch.tracking.lineage"] == {"kdresearch.layout"}


# --- a full disk under the SQLite store -------------------------------------------------------------

def compose_job(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["debug=tiny", "data=synthetic", "device=cpu",
                                             f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                                             f"cache.dir={store / 'cache'}", *overrides])


@pytest.fixture
def full_database(monkeypatch):
    """SQLite's own full-disk error, raised where sqlite3 executes a statement: SQLAlchemy wraps it,
    MLflow logs and re-raises it exactly as for a real full disk. `fill(match)` makes every later
    statement whose SQL and parameters contain all of `match` fail; `fill(None)` frees the space."""
    import sqlalchemy
    from sqlalchemy import event

    full = {"match": None}

    def execute(conn, cursor, statement, parameters, context, executemany):
        match = full["match"]
        if match and all(part in f"{statement} {parameters}" for part in match):
            raise sqlite3.OperationalError("database or disk is full")

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", execute)
    yield lambda match: full.update(match=match)
    event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", execute)


def job_statuses(tracker: Tracker, folder: Path) -> list[str]:
    """The MLflow status of every run made in job folder `folder`."""
    found = tracker.find_runs(names.tag_equals(names.OUTPUT_DIR, str(folder.resolve())), max_results=10)
    return [run.info.status for run in found]


def test_full_database_disk_is_one_line_the_run_failed_and_resume_completes_it(tracker, tmp_path, full_database,
                                                                               caplog):
    from kdresearch.training.job import run_job

    store, job = tracker.db_path.parent, tmp_path / "job"
    full_database(("INSERT INTO metrics", "test/acc"))  # the first epoch's metrics no longer fit
    with caplog.at_level(logging.INFO), pytest.raises(KDResearchError) as caught:
        run_job(compose_job(store), job)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        f"MLflow store {tracker.uri} cannot be written: the disk holding {store} is full "
        f"(database or disk is full); free space there, then resume={job.resolve()} completes MLflow run ")
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert not [r for r in caplog.records if r.exc_info]  # MLflow's traceback of the error is not shown
    assert job_statuses(tracker, job) == ["FAILED"]

    full_database(None)  # space freed: the advice works
    run_job(compose_job(store, f"resume={job}"), tmp_path / "unused")
    assert job_statuses(tracker, job) == ["FINISHED"]


def test_full_artifact_disk_is_one_line_and_the_run_failed(tracker, tmp_path, monkeypatch, caplog):
    from mlflow.store.artifact import local_artifact_repo

    from kdresearch.training.job import run_job

    def no_space(*args, **kwargs):  # what copying the final checkpoint next to the store meets
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_artifact_repo.shutil, "copyfileobj", no_space)
    with caplog.at_level(logging.INFO), pytest.raises(KDResearchError) as caught:
        run_job(compose_job(tracker.db_path.parent), tmp_path / "job")
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message and f"the disk holding {tracker.db_path.parent} is full (No space left on device)" in message
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert job_statuses(tracker, tmp_path / "job") == ["FAILED"]


def test_full_disk_before_the_run_exists_says_to_start_again(tracker, full_database):
    full_database(("INSERT INTO runs",))
    with pytest.raises(KDResearchError, match=r"is full \(database or disk is full\); free space there, "
                                              r"then start the job again$"):
        tracker.start_run("never", {}, {})


def test_full_disk_is_recognised_through_mlflow_wrapping():
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as error:
            raise MlflowException(f"(sqlite3.OperationalError) {error}") from error
    except MlflowException as wrapped:
        assert full_disk(wrapped) == "database or disk is full"
    assert full_disk(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert full_disk(OSError(errno.EACCES, "Permission denied")) is None
    assert full_disk(MlflowException("database is locked")) is None


FULL_TMPFS_JOB = """
set -e
mount -t tmpfs -o size=8m tmpfs "$STORE"
"$PYTHON" -c "from kdresearch.tracking.store import Tracker; Tracker('sqlite:///$STORE/mlflow.db', 'kdresearch')"
free=$(df --output=avail -k "$STORE" | tail -1)
dd if=/dev/zero of="$STORE/filler" bs=1k count=$((free - 256)) 2>/dev/null || true
set +e
"$PYTHON" train.py debug=tiny data=synthetic device=cpu "tracking.uri=sqlite:///$STORE/mlflow.db" \
    "hydra.run.dir=$JOB" "cache.dir=$JOB/cache"
echo "exit $?"
"""


@pytest.mark.slow
def test_a_real_full_disk_under_the_store(tmp_path):
    """The same on a real 8 MB file system filled up to 256 KB (a private mount namespace: needs
    root or unprivileged user namespaces, else skipped)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small file system here (no user namespaces)")
    (tmp_path / "store").mkdir()
    env = {"STORE": str(tmp_path / "store"), "JOB": str(tmp_path / "job"), "PYTHON": sys.executable,
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_TMPFS_JOB], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("exit 1"), output
    assert "Traceback" not in output and "unreachable" not in output, output
    (line,) = [line for line in output.splitlines() if "error:" in line]
    assert f"the disk holding {tmp_path / 'store'} is full" in line, output


# --- limits drawn across the classes ------------------------------------------------------------------

def class_sorted(per_class: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images listed class by class, as an image folder lists its files."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=generator), labels


def test_limits_and_validation_draw_every_class_the_same_way_each_time():
    train, test = class_sorted(20, 3), class_sorted(10, 3, seed=1)
    data = in_memory_data("sorted", train, test, ("a", "b", "c"), 10, 6, (0.5,) * 3, (0.25,) * 3, False,
                          val_size=5)
    # 10 drawn as 4/3/3 (largest remainders, ties to the lower class), then 5 held out as 2/2/1
    assert data.train_labels.bincount().tolist() == [2, 1, 2]
    assert data.val_labels.bincount().tolist() == [2, 2, 1]
    assert data.test_labels.bincount().tolist() == [2, 2, 2]
    again = in_memory_data("sorted", train, test, ("a", "b", "c"), 10, 6, (0.5,) * 3, (0.25,) * 3, False,
                           val_size=5)
    assert data.fingerprint() == again.fingerprint()  # same limit, same images
    positions = stratified_sample(train[1], 10, LIMIT_SEED)
    kept = torch.cat([data.train_images, data.val_images])
    assert sorted(map(bytes, kept.flatten(1).numpy())) == sorted(map(bytes, train[0][positions].flatten(1).numpy()))
    # no limit and no validation: everything, untouched
    assert select_splits(train[1], test[1], None, 1000, 0, 0) == (None, None, None)


def test_synthetic_limits_keep_every_class():
    data = make_synthetic(num_train=200, num_test=100, num_classes=4, limit_train=40, limit_test=20)
    full = make_synthetic(num_train=200, num_test=100, num_classes=4)
    for limited, labels in ((data.train_labels, full.train_labels), (data.test_labels, full.test_labels)):
        shares = labels.bincount() * len(limited) / len(labels)
        assert (limited.bincount() - shares).abs().max() < 1  # each class in proportion


def write_class_sorted_cifar(root: Path) -> None:
    """A CIFAR-10 python layout holding its images class by class (batch i: classes 2i-2 and 2i-1)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": [2 * i - 2] * 10 + [2 * i - 1] * 10 for i in range(1, 6)}
    batches["test_batch"] = [index // 3 for index in range(30)]
    for name, labels in batches.items():
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels},
                        handle, protocol=2)


def test_cifar_limits_keep_every_class_of_class_sorted_files(tmp_path):
    write_class_sorted_cifar(tmp_path)
    data = load_cifar10(root=str(tmp_path), download=False, verify=False, limit_train=20, limit_test=10)
    assert data.classes == CIFAR10_CLASSES
    assert data.train_labels.bincount(minlength=10).tolist() == [2] * 10
    assert data.test_labels.bincount(minlength=10).tolist() == [1] * 10


def test_image_folder_limits_draw_every_class_in_train_validation_and_test(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for name in ("cat", "dog", "owl"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{index:02d}.png")
    data = load_image_folder(str(tmp_path), num_classes=3, num_workers=0, limit_train=10, limit_test=6,
                             val_size=5)
    assert data.train_labels.bincount().tolist() == [2, 1, 2]
    assert data.val_labels.bincount().tolist() == [2, 2, 1]
    assert data.test_labels.bincount().tolist() == [2, 2, 2]
    for files, labels in ((data.train_files, data.train_labels), (data.val_files, data.val_labels),
                          (data.test_files, data.test_labels)):
        assert [data.classes[label] for label in labels.tolist()] == [path.parent.name for path in files]
    again = load_image_folder(str(tmp_path), num_classes=3, num_workers=0, limit_train=10, limit_test=6,
                              val_size=5)
    assert (again.train_files, again.val_files, again.test_files) == (data.train_files, data.val_files,
                                                                       data.test_files)
