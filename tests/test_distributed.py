"""Data-parallel training under torchrun: 2 CPU processes with the gloo backend."""

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from kdresearch.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_one_run_per_job(tmp_path):
    run_dir = tmp_path / "ddp-job"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "loss=regressor", "data=synthetic", "debug=tiny", "epochs=2", "teacher.epochs=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache.dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
