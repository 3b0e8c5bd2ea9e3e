"""Data-parallel training under torchrun (and as srun starts it): 2 CPU processes with the gloo
backend (-m slow: each job is a launcher and two ranks)."""

import os
import sys
from pathlib import Path

import pytest
from conftest import run_command
from mlflow.tracking import MlflowClient
from processes import Process, process_env

from kdresearch.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_one_run_per_job(tmp_path):
    run_dir = tmp_path / "ddp-job"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "loss=regressor", "data=synthetic", "debug=tiny", "epochs=2", "teacher.epochs=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache.dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    done = run_command(command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # The teacher was trained first (data-parallel as well), then the student: one run per job.
    by_name = {run.info.run_name: run for run in runs}
    assert sorted(by_name) == ["deep-ce", "light-regressor"]
    student, teacher = by_name["light-regressor"], by_name["deep-ce"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["device"] == "cpu x2 (DDP)"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")]
        assert steps == [1, 2]  # logged once per epoch, by rank 0 only
    assert student.data.tags["teacher_run_id"] == teacher.info.run_id
    norms = client.get_metric_history(student.info.run_id, "first_layer_norm")
    assert [round(m.value, 4) for m in norms if m.step == 0] == [2.3274]
    assert {"train/loss", "train/ce", "train/regressor", "test/loss", "lr", "epoch_seconds"} <= set(student.data.metrics)

    # One Hydra job folder; rank 0's checkpoints in it, in the single-process format.
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["run_id"] == student.info.run_id
    assert "regressor.weight" in checkpoint["loss"]  # the loss module's DDP wrapper is not saved
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    artifacts = [a.path for a in client.list_artifacts(student.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/final.pt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ddp")] == ["ddp-job"]


DDP_JOB = ("data=synthetic", "debug=tiny", "epochs=3", "data.limit_train=1024", "optimizer=sgd",
           "optimizer.lr=0.02", "scheduler=multistep", "scheduler.milestones=[2]")


def job_command(store: Path, name: str, *overrides: str) -> list[str]:
    """train.py with DDP_JOB on the MLflow store in `store`, in the job folder `store`/`name`."""
    return ["train.py", *DDP_JOB, f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"cache.dir={store / 'cache'}",
            f"hydra.run.dir={store / name}", *overrides]


def torchrun(store: Path, name: str, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={max_restarts}", *job_command(store, name, *overrides)]


def histories(client, run_id: str) -> dict:
    keys = sorted(k for k in client.get_run(run_id).data.metrics
                  if k != "epoch_seconds" and not k.startswith("budget/"))  # times, and each attempt's teacher pass
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def only_run(store: Path):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The store of DDP_JOB run by torchrun (2 ranks) without interruption; its job folder is job/."""
    store = tmp_path_factory.mktemp("uninterrupted")
    done = run_command(torchrun(store, "job"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return store


def assert_same_result(store: Path, folder: Path, baseline: Path) -> None:
    """The store's one run FINISHED, each epoch logged once, with the baseline's metrics; the final
    checkpoint in `folder` holds the baseline's weights."""
    import torch

    client, run = only_run(store)
    baseline_client, baseline_run = only_run(baseline)
    assert run.info.status == "FINISHED"
    metrics = histories(client, run.info.run_id)
    assert [step for step, _ in metrics["test/acc"]] == [1, 2, 3]  # each epoch logged once
    assert metrics == histories(baseline_client, baseline_run.info.run_id)
    final, expected = (load_checkpoint(job / "checkpoints" / "final.pt") for job in (folder, baseline / "job"))
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key


def rank_processes(launcher: Process) -> dict:
    """{rank: psutil.Process} of a torchrun launcher's training processes (the RANK torchrun gave each)."""
    import psutil

    return {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "train.py" in " ".join(p.cmdline())}


def test_torchrun_job_with_a_killed_rank_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """SIGKILL to one of two ranks mid-epoch 2; torchrun ... resume=<job folder> ends with the
    metrics and weights of the same job run without interruption."""
    import signal

    store = tmp_path / "killed"
    launcher = Process(torchrun(store, "job"), tmp_path / "killed.log")
    first = store / "job" / "checkpoints" / "epoch_0001.pt"
    launcher.wait_until(first.exists, first.name)
    ranks = rank_processes(launcher)
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].send_signal(signal.SIGKILL)  # one rank dies, mid-epoch 2
    assert launcher.wait(timeout=300) != 0
    assert not (store / "job" / "checkpoints" / "final.pt").exists()

    resumed = run_command(torchrun(store, "resumed", f"resume={store / 'job'}"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_result(store, store / "job", uninterrupted)


def test_torchrun_max_restarts_continues_a_killed_rank_without_a_second_command(tmp_path, uninterrupted):
    """torchrun --max-restarts=1: rank 0 SIGKILLed mid-epoch 2 (its MLflow run left RUNNING); the
    restarted ranks continue the same run from epoch 1's checkpoint in the job folder, and the one
    command ends with the metrics and weights of the job run without interruption."""
    import signal

    store = tmp_path / "restarted"
    launcher = Process(torchrun(store, "job", max_restarts=1), tmp_path / "restarted.log")
    first = store / "job" / "checkpoints" / "epoch_0001.pt"
    launcher.wait_until(first.exists, first.name)
    ranks = rank_processes(launcher)
    assert sorted(ranks) == [0, 1], ranks
    ranks[0].send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=300) == 0, launcher.describe()
    assert "torchrun restart 1: continuing the job in" in launcher.output
    assert_same_result(store, store / "job", uninterrupted)


def test_tasks_started_as_srun_starts_them_train_one_job(tmp_path, uninterrupted):
    """hydra/launcher=slurm: srun starts one process per GPU, with SLURM's variables and none of
    torchrun's. Two such tasks on this machine (the variables srun would give them) find their
    ranks, rank 0's node and the job's port, and train the job torchrun trains, to the same result."""
    import socket

    def free(port: int) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0

    job_id = next(job_id for job_id in range(os.getpid() % 10000, 20000) if free(20000 + job_id % 10000))
    store = tmp_path / "srun"
    tasks = [Process([sys.executable, *job_command(store, "job")], tmp_path / f"task{rank}.log",
                     env=process_env(one_thread=True,  # as torchrun gives its ranks
                                     SLURM_JOB_ID=str(job_id), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                                     SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost"))
             for rank in (0, 1)]
    for task in tasks:
        task.check_ok(timeout=300)
    _, run = only_run(store)
    assert run.data.tags["device"] == "cpu x2 (DDP)"
    assert_same_result(store, store / "job", uninterrupted)
