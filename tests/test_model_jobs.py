"""One short job per model of the zoo (synthetic data, 100 classes): it finishes, logs to MLflow
with a multistep schedule, and a continuation from its epoch-1 checkpoint ends with the same
weights and metrics as the uninterrupted job. The jobs export no MLflow model (seconds each, 38
of them); every model's export is its own test, with -m slow."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import CONF_DIR, compose_job
from mlflow.tracking import MlflowClient

from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import run_job

MODELS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
# The default run trains the smallest model of each family: resnet8, wrn_16_1, vgg8, MobileNetV2,
# ShuffleV1, ShuffleV2 and torchvision's resnet18, mobilenet_v1 and mobilenet_v2. Their larger siblings
# (the same code at other depths and widths; resnet50: resnet18's with bottleneck blocks) run with -m slow.
LARGER_SIBLINGS = {"resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                   "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg11", "vgg13", "resnet34", "resnet50"}
ZOO = [pytest.param(name, marks=pytest.mark.slow) if name in LARGER_SIBLINGS else name
       for name in MODELS if name not in ("light", "deep")]
# Enough to step the schedule (lr x0.1 after epoch 1) and to resume; small enough for 19 models
# (one training image per class at least, two steps per epoch).
SHORT = ["data.num_classes=100", "data.num_train=100", "data.num_test=32", "epochs=2", "batch_size=50",
         "optimizer=sgd", "optimizer.lr=0.05", "scheduler=multistep", "scheduler.milestones=[1]", "device=cpu",
         "tracking.log_model=false"]


pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.mark.parametrize("model", ZOO)
def test_model_trains_logs_and_resumes(tmp_path, model):
    cfg = compose_job(tmp_path, *SHORT, f"model={model}")
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
    resumed = run_job(compose_job(tmp_path, *SHORT, f"model={model}", f"resume={interrupted}"), tmp_path / "unused")
    assert resumed.run_id == job.run_id
    done, again = load_checkpoint(job.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, tensor in done["model"].items():
        assert torch.equal(tensor, again["model"][key]), key
    assert done["scheduler"] == again["scheduler"]
    metrics = {k: v for k, v in done["metrics"].items() if k != "epoch_seconds"}
    assert metrics == {k: v for k, v in again["metrics"].items() if k != "epoch_seconds"}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_model_exports_as_an_mlflow_model(tmp_path, model):
    """What a job's end logs (tracking.log_model): the model in torch.export's pt2 format with its
    signature and input example, loadable again with the same outputs."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from kdresearch.config.groups import build

    student = build(compose_job(tmp_path, *SHORT, f"model={model}").model, "model").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
    mlflow.pytorch.save_model(student, tmp_path / "model", serialization_format="pt2", input_example=images.numpy(),
                              signature=infer_signature(images.numpy(), expected.numpy()))
    loaded = mlflow.pytorch.load_model(str(tmp_path / "model"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-5)
