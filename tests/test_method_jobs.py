"""Every distillation method as a job on a benchmark pair (resnet14 -> resnet8, synthetic data):
it trains, logs its loss parts, and a continuation from its epoch-1 checkpoint ends with the
weights, metrics and loss state (connectors, heads, memory banks) of the uninterrupted job."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_resumed_exactly, compose_job, interrupted_after_epoch_1
from mlflow.tracking import MlflowClient

from kdresearch.training.job import run_job

PAIR = ["model=resnet8", "teacher=resnet14", "data.num_train=256", "data.num_test=64", "device=cpu", "epochs=2",
        "batch_size=64", "teacher.epochs=1", "teacher.batch_size=64", "optimizer=sgd", "optimizer.lr=0.05",
        "scheduler=multistep", "scheduler.milestones=[1]", "tracking.log_model=false"]
METHODS = {  # loss overrides -> the loss part it must log
    "fitnet": (["loss=fitnet"], "fitnet"),
    "at": (["loss=at"], "at"),
    "dkd": (["loss=dkd", "loss.warmup=2"], "dkd"),
    "dist": (["loss=dist"], "dist"),
    "kd-standardized": (["loss=kd", "loss.standardize=true"], "kd"),
    "crd": (["loss=crd", "loss.nce_k=32", "loss.kd_weight=0.5"], "crd"),
}


pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods")  # one store: the teacher is trained once, then reused


def pair_job(store: Path, *overrides: str):
    return compose_job(store, *PAIR, *overrides)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_resumes_exactly(store, method):
    overrides, part = METHODS[method]
    job = run_job(pair_job(store, *overrides), store / method)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["teacher_cache"] == "used"
    assert {f"train/{part}", "train/ce", "test/acc"} <= set(run.data.metrics)

    interrupted = store / f"{method}-interrupted"
    interrupted_after_epoch_1(client, job, interrupted)
    resumed = run_job(pair_job(store, *overrides, f"resume={interrupted}"), store / "unused")
    assert_resumed_exactly(job.checkpoint, resumed.checkpoint)
    deep_runs = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name == "resnet14-ce"]
    assert len(deep_runs) == 1  # every method reused the one teacher
