"""A sweep killed part-way and run again in its folder (`hydra.sweep.dir=<old folder>`): finished
jobs are not trained again, a job that left a checkpoint continues its own MLflow run, the rest
run; every configuration ends with exactly one FINISHED run, the sweep's parent run FINISHED.
Real processes: the whole sweep (launcher and its workers) is SIGKILLed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import (
    FAST,
    TRAIN_PY,
    experiment_runs,
    mlflow_client,
    new_store,
    run_command,
    tracking_uri,
)
from processes import Process

from kdresearch.reports.compare import select_runs
from kdresearch.tracking.store import Tracker

SEEDS = (1, 2, 3)
# Long enough per job (3 epochs of ~1 s) that a kill lands inside the sweep, with checkpoints per epoch.
SLOW_JOB = (*FAST, "data=synthetic", "epochs=3", "data.limit_train=1500", "checkpoint.keep_last=3")


def sweep_command(folder: Path, *launcher: str) -> list[str]:
    return [sys.executable, str(TRAIN_PY), "-m", *SLOW_JOB, *launcher,
            f"seed={','.join(map(str, SEEDS))}", f"tracking.uri={tracking_uri(folder)}",
            f"cache.dir={folder / 'cache'}", f"hydra.sweep.dir={folder / 'sweep'}"]


def finished_students(client):
    return [run for run in experiment_runs(client) if run.data.tags.get("role") == "student"
            and run.info.status == "FINISHED"]


def kill_when(command: list[str], done, log_path: Path, timeout: float = 300) -> None:
    """Start the sweep in its own process group and SIGKILL the whole group once `done()`."""
    process = Process(command, log_path, one_thread=True, new_session=True)
    try:
        process.wait_until(done, "the kill point", timeout, poll=0.05)
    finally:
        process.kill()


@pytest.mark.slow  # SIGKILLs a sweep
@pytest.mark.parametrize("launcher", [(), ("hydra/launcher=parallel",)], ids=["basic", "parallel"])
def test_killed_sweep_run_again_does_each_configuration_once(tmp_path, launcher):
    client = mlflow_client(new_store(tmp_path))
    sweep = tmp_path / "sweep"

    def one_finished_and_one_checkpointed() -> bool:
        done = finished_students(client)
        folders = [path.parent.parent for path in sweep.glob("*/checkpoints/epoch_0001.pt")]
        finished = {run.data.tags["output_dir"] for run in done}
        return bool(done) and any(str(folder.resolve()) not in finished for folder in folders)

    kill_when(sweep_command(tmp_path, *launcher), one_finished_and_one_checkpointed, tmp_path / "killed.log")
    before = {run.info.run_id: run for run in experiment_runs(client)}
    finished_before = {run.info.run_id for run in finished_students(client)}
    interrupted = {run.info.run_id for run in before.values() if run.info.status == "RUNNING"
                   and run.data.tags.get("role") == "student"}
    assert finished_before and interrupted
    # Which interrupted jobs left a checkpoint, read now: run again, a job trains in the same folder.
    with_checkpoint = [rid for rid in interrupted
                       if any((Path(before[rid].data.tags["output_dir"]) / "checkpoints").glob("epoch_*.pt"))]

    done = run_command(sweep_command(tmp_path, *launcher), timeout=600)
    assert done.returncode == 0, done.output[-5000:]
    print(f"{len(SEEDS)}-job sweep killed with {len(finished_before)} FINISHED and {len(interrupted)} RUNNING "
          f"(SIGKILL); run again: {done.output.count('already FINISHED in MLflow run')} skipped, "
          f"{done.output.count('resume: continuing MLflow run')} resumed")
    assert "already FINISHED in MLflow run" in done.output

    runs = experiment_runs(client)
    students = [run for run in runs if run.data.tags.get("role") == "student"]
    finished = [run for run in students if run.info.status == "FINISHED"]
    assert sorted(int(run.data.params["seed"]) for run in finished) == list(SEEDS)  # each configuration once
    assert not [run.info.run_name for run in runs if run.info.status == "RUNNING"]
    # Finished jobs were not trained again: same runs, each epoch logged once.
    assert finished_before <= {run.info.run_id for run in finished}
    for run in finished:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")]
        assert steps == [1, 2, 3], (run.info.run_name, steps)  # no epoch lost, none logged twice
    print(f"at the end: {len(finished)} FINISHED runs for {len(SEEDS)} configurations, 0 RUNNING, "
          f"every run's test/acc at epochs 1-3 exactly once")
    # A job that had left a checkpoint continued its own run.
    resumed = [run for run in finished if run.info.run_id in interrupted]
    assert {run.info.run_id for run in resumed} >= set(with_checkpoint) and with_checkpoint

    (parent,) = [run for run in runs if run.data.tags.get("role") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in students} == {parent.info.run_id}
    # compare.py shows each configuration once.
    selected = select_runs(Tracker(tracking_uri(tmp_path), "kdresearch"), sweep=str(sweep))
    assert sorted(int(run.data.params["seed"]) for run in selected) == list(SEEDS)
