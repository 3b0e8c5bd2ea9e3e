"""Data-parallel training under torchrun: 2 CPU processes with the gloo backend (-m slow: each
job is a launcher and two ranks)."""

import sys
from pathlib import Path

import pytest
from conftest import run_command
from mlflow.tracking import MlflowClient
from processes import Process

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


def torchrun(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            *DDP_JOB, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache.dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}", *overrides]


def histories(client, run_id: str) -> dict:
    keys = sorted(k for k in client.get_run(run_id).data.metrics
                  if k != "epoch_seconds" and not k.startswith("budget/"))  # times, and each attempt's teacher pass
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def test_torchrun_job_with_a_killed_rank_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL to one of two ranks mid-epoch 2; torchrun ... resume=<job folder> ends with the
    metrics and weights of the same job run without interruption."""
    import signal

    import psutil
    import torch

    baseline_store, store = tmp_path / "baseline", tmp_path / "killed"
    done = run_command(torchrun(baseline_store, "job"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    launcher = Process(torchrun(store, "job"), tmp_path / "killed.log")
    first = store / "job" / "checkpoints" / "epoch_0001.pt"
    launcher.wait_until(first.exists, first.name)
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2, ranks
    ranks[-1].send_signal(signal.SIGKILL)  # one rank dies, mid-epoch 2
    assert launcher.wait(timeout=300) != 0
    assert not (store / "job" / "checkpoints" / "final.pt").exists()

    resumed = run_command(torchrun(store, "resumed", f"resume={store / 'job'}"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    baseline_client, client = (MlflowClient(f"sqlite:///{folder / 'mlflow.db'}") for folder in (baseline_store, store))
    (baseline_run,) = baseline_client.search_runs([e.experiment_id for e in baseline_client.search_experiments()])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert histories(client, run.info.run_id) == histories(baseline_client, baseline_run.info.run_id)
    final, expected = (load_checkpoint(folder / "job" / "checkpoints" / "final.pt") for folder in (store, baseline_store))
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
