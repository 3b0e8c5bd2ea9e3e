"""One short job per model of the zoo (synthetic data, 100 classes): it finishes, logs to MLflow
with a multistep schedule, and a continuation from its epoch-1 checkpoint ends with the same
weights and metrics as the uninterrupted job. Also the automatic teacher's own recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import run_job

CONF = Path(__file__).resolve().parents[1] / "conf"
# The five largest (5-16 s each here) run with -m slow; the default run keeps every family.
LARGE = {"resnet110", "resnet32x4", "wrn_40_2", "vgg11", "vgg13"}
ZOO = [pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name
       for name in sorted(path.stem for path in (CONF / "model").glob("*.yaml") if path.stem not in ("light", "deep"))]
# Enough to step the schedule (lr x0.1 after epoch 1) and to resume; small enough for 19 models.
SHORT = ["data=synthetic", "data.num_classes=100", "data.num_train=64", "data.num_test=32", "quiet=true",
         "epochs=2", "batch_size=32", "optimizer=sgd", "optimizer.lr=0.05", "scheduler=multistep",
         "scheduler.milestones=[1]", "device=cpu"]


def compose_job(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*SHORT, f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                                            f"cache.dir={store / 'cache'}", *overrides])


pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.mark.parametrize("model", ZOO)
def test_model_trains_logs_and_resumes(tmp_path, model):
    cfg = compose_job(tmp_path, f"model={model}")
    job = run_job(cfg, tmp_path / "job")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"{model}-ce"
    assert run.data.params["model.num_classes"] == "100"
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(job.run_id, "lr")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.05), (2, pytest.approx(0.005))]

    # The job interrupted after epoch 1: its folder holds only that checkpoint; resume finishes it.
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "job" / "checkpoints" / "epoch_0001.pt", interrupted / "checkpoints")
    # Its run as a stopped job leaves it (a FINISHED run is never reopened).
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").set_terminated(job.run_id, "KILLED")
    resumed = run_job(compose_job(tmp_path, f"model={model}", f"resume={interrupted}"), tmp_path / "unused")
    assert resumed.run_id == job.run_id
    done, again = load_checkpoint(job.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, tensor in done["model"].items():
        assert torch.equal(tensor, again["model"][key]), key
    assert done["scheduler"] == again["scheduler"]
    metrics = {k: v for k, v in done["metrics"].items() if k != "epoch_seconds"}
    assert metrics == {k: v for k, v in again["metrics"].items() if k != "epoch_seconds"}
