"""The pipelines' shared machinery: a job run as its own process and its runs found by its job
folder, the method benchmark's file of published figures checked before the first job, its jobs as
children of one parent run, and a child process run to its end through Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    FAST,
    mlflow_client,
    new_store,
    tracking_uri,
    train_command_in_process,
)
from processes import REPO_ROOT, wait_until

import kdresearch.pipelines.method_benchmark as method_benchmark
from kdresearch.errors import KDResearchError
from kdresearch.layout import train_command
from kdresearch.pipelines import jobs
from kdresearch.pipelines.jobs import PlannedJob, run_job_process, runs_of_job_folder
from kdresearch.runtime.processes import child_env, run_to_end
from kdresearch.sweeps.parent_runs import PARENT_ENV
from kdresearch.tracking.store import Tracker

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import benchmark_methods  # noqa: E402  (the script's entry point)

PAIR = "cifar100_res56_res20"
HEADER = "pair,method,top1,source,epochs,views\n"


# --- the file of published figures (its format: tests/test_published_figures.py) ------------------

@pytest.mark.parametrize("published", ["bad.csv", "missing.csv"])
def test_bad_published_file_stops_the_benchmark_before_any_job(tmp_path, monkeypatch, capsys, published):
    (tmp_path / "bad.csv").write_text(f"{HEADER}{PAIR},kd,n/a,x,240,1\n")

    def no_job(command):
        raise AssertionError(f"a job ran: {command}")

    monkeypatch.setattr(jobs, "run_to_end", no_job)
    store = tmp_path / "store"
    code = benchmark_methods.main(["--pairs", PAIR, "--methods", "kd", "--published", str(tmp_path / published),
                                   "--out", str(tmp_path / "bench"), f"tracking.uri={tracking_uri(store)}"])
    err = capsys.readouterr().err
    assert code == 1
    problem = "line 2: top1 'n/a' is not a number" if published == "bad.csv" else "no such file"
    assert err == f"error: published figures {tmp_path / published}: {problem}\n"
    assert not store.exists() and not (tmp_path / "bench").exists()  # no store opened, no folder made


# --- a job's runs found by its folder -------------------------------------------------------------

def test_runs_of_a_job_folder_are_its_teachers_then_its_own_since_it_started(tmp_path):
    tracker = Tracker(tracking_uri(new_store(tmp_path / "store")), "kdresearch")
    folder = tmp_path / "job"

    def run(path: Path, start: int, end):
        made = tracker.client.create_run(tracker.experiment_id, start_time=start,
                                         tags={"output_dir": str(path.resolve())}).info.run_id
        if end is not None:
            tracker.client.set_terminated(made, end_time=end)
        return made

    run(folder, 100, 200)  # an earlier job in the same folder, ended before this one started
    run(tmp_path / "other", 1000, 2000)  # another job's
    own = run(folder, 1500, 1900)
    teacher = run(folder / "teacher", 1100, 1400)
    running = run(folder, 1600, None)  # still running (a job of the same folder started meanwhile)
    assert runs_of_job_folder(tracker, folder, ended_since_ms=1000) == [teacher, own, running]


def test_a_kd_job_process_returns_its_teachers_run_then_its_own(tmp_path, monkeypatch):
    store = new_store(tmp_path / "store")
    folder = tmp_path / "kd-job"
    overrides = [*FAST, "data=synthetic", "quiet=true", "loss=kd", f"tracking.uri={tracking_uri(store)}",
                 f"cache.dir={store / 'cache'}", f"hydra.run.dir={folder}"]
    job = PlannedJob("kd", 1, str(folder), overrides)
    assert job.command == [*train_command(), *overrides]
    monkeypatch.setattr(jobs, "run_to_end", train_command_in_process)
    tracker = Tracker(tracking_uri(store), "kdresearch")

    teacher, student = run_job_process(job, 1, 1, tracker)  # the automatic teacher, then the student
    assert job.run_ids == [teacher, student]
    client = mlflow_client(store)
    assert client.get_run(teacher).data.tags["output_dir"] == str((folder / "teacher").resolve())
    assert client.get_run(student).data.tags["teacher_run_id"] == teacher


def test_a_failed_job_process_is_one_line_and_its_parent_run_does_not_stay_running(tmp_path, monkeypatch):
    store = new_store(tmp_path / "store")
    monkeypatch.setattr(jobs, "run_to_end", lambda command: 3)
    with pytest.raises(KDResearchError, match=r"^job .*\|ce \(seed 1\) failed \(exit code 3\); command: "):
        method_benchmark.benchmark([PAIR], ["kd"], [1], [f"tracking.uri={tracking_uri(store)}"],
                                   out=tmp_path / "bench", published_path=None)
    (parent,) = mlflow_client(store).search_runs(
        [mlflow_client(store).get_experiment_by_name("kdresearch").experiment_id])
    assert parent.data.tags["role"] == "benchmark" and parent.info.status == "FAILED"
    assert PARENT_ENV not in os.environ  # later jobs of this process belong to no group


# --- child processes ------------------------------------------------------------------------------

def test_run_to_end_returns_the_exit_status_with_unbuffered_output():
    assert child_env(EXTRA="1")["PYTHONUNBUFFERED"] == "1"
    code = "import os, sys; sys.exit(7 if os.environ.get('PYTHONUNBUFFERED') == '1' else 1)"
    assert run_to_end([sys.executable, "-c", code]) == 7


CHILD_STOPPING_SLOWLY = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1.5)  # longer than subprocess.run waits before it kills a child after Ctrl-C
    (folder / "stopped").write_text("cleanly")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
(folder / "ready").write_text("")
time.sleep(60)
"""
# The parent takes Ctrl-C as in a terminal (KeyboardInterrupt) even when the test run itself was started
# in the background by a shell, which makes SIGINT ignored and so inherited as ignored.
PARENT = ("import signal, sys; from kdresearch.runtime.processes import run_to_end\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "try:\n    run_to_end(sys.argv[1:])\nexcept KeyboardInterrupt:\n    sys.exit(42)\n")


# The same parent, slow to come back from starting its child (as on a busy machine): Ctrl-C arrives
# while it is still inside subprocess.Popen, once the child is up.
PARENT_SLOW_TO_START = ("import pathlib, subprocess, sys, time\n"
                        "popen = subprocess.Popen\n"
                        "def slow_popen(command, **kwargs):\n"
                        "    child = popen(command, **kwargs)\n"
                        "    while not (pathlib.Path(command[-1]) / 'ready').exists():\n"
                        "        time.sleep(0.01)\n"
                        "    time.sleep(1.0)  # Ctrl-C arrives here\n"
                        "    return child\n"
                        "subprocess.Popen = slow_popen\n" + PARENT)


@pytest.mark.parametrize("parent_code", [PARENT, PARENT_SLOW_TO_START], ids=["waiting", "starting"])
def test_ctrl_c_waits_until_the_child_has_stopped(tmp_path, parent_code):
    """Ctrl-C reaches the whole process group: the parent waits for its child to finish stopping,
    also when it comes while the parent is still starting the child."""
    child = [sys.executable, "-c", CHILD_STOPPING_SLOWLY, str(tmp_path)]
    parent = subprocess.Popen([sys.executable, "-c", parent_code, *child], cwd=REPO_ROOT, start_new_session=True)
    try:
        wait_until(lambda: (tmp_path / "ready").exists(), "the child's SIGINT handler", timeout=60)
        os.killpg(parent.pid, signal.SIGINT)
        assert parent.wait(timeout=60) == 42
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert (tmp_path / "stopped").read_text() == "cleanly"
