"""The one checkpoint loader (kdresearch.training.weights) as the teacher and scripts/evaluate.py
use it: where a run's, a job folder's or a file's checkpoint comes from, what a checkpoint that
does not fit its model is told, benchmark suites' files (a RepDistiller `*_last.pth` included),
plain pickles, weights or outputs that are not finite, and the one evaluation loop."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, FAST, experiment_runs, mlflow_client, tracking_uri
from hydra import compose, initialize_config_dir

from kdresearch.architectures.resnet import resnet8
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError
from kdresearch.models import DeepNN, LightNN
from kdresearch.reports.evaluation import evaluate_model, run_evaluation
from kdresearch.teacher.sources import load_teacher_weights
from kdresearch.training import weights
from kdresearch.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from kdresearch.training.job import run_job
from kdresearch.training.loop import evaluate

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CPU = torch.device("cpu")
EVALUATE_TINY = ("data=synthetic", *FAST, "device=cpu")  # scripts/evaluate.py overrides for a tiny pass


def ours(model: torch.nn.Module, **fields) -> dict:
    """A checkpoint as a job writes it (the fields the loader reads)."""
    return {"format": FORMAT, "model_class": type(model).__name__, "epoch": 1, "model": model.state_dict(),
            "num_classes": model.num_classes, **fields}


def load_teacher(teacher: torch.nn.Module, path: Path) -> weights.CheckpointSource:
    """What `teacher.checkpoint=<path>` does to the teacher model."""
    source = weights.from_path(path, "teacher checkpoint")
    load_teacher_weights(teacher, source)
    return source


def teacher_error(tmp_path: Path, content, name: str = "teacher.pt") -> str:
    """The one-line error `teacher.checkpoint=<a file holding content>` gives a DeepNN teacher
    (content: what torch.save writes, or bytes written as they are)."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(KDResearchError) as refused:
        load_teacher(DeepNN(), path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    return message


# --- where the checkpoint comes from -----------------------------------------------------------------

def test_run_checkpoint_is_read_from_a_temporary_copy_that_is_deleted(tmp_path):
    saved = tmp_path / "saved.pt"
    save_checkpoint(ours(LightNN(), run_id="run1"), saved)
    downloads = []

    class Store:
        uri = "sqlite:///fake.db"

        def download_artifact(self, run_id, artifact_path, destination):
            downloads.append((run_id, artifact_path, destination))
            copy = destination / Path(artifact_path).name
            copy.write_bytes(saved.read_bytes())
            return copy

    source = weights.from_run(Store(), "run1", "teacher run")
    [(run_id, artifact, destination)] = downloads
    assert (run_id, artifact) == ("run1", "checkpoints/final.pt")
    assert not destination.exists()  # the copy is gone, nothing is left in any job folder
    assert (source.description, source.label, source.run_id) == (
        "teacher run run1", "runs:/run1/checkpoints/final.pt", "run1")
    assert source.checkpoint["model_class"] == "LightNN"


def test_job_folder_gives_its_final_checkpoint_else_its_newest_readable_epoch(tmp_path, caplog):
    folder = tmp_path / "job"
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(parents=True)
    with pytest.raises(KDResearchError, match=r"holds no checkpoints/final\.pt and no readable "
                                              r"checkpoints/epoch_\*\.pt"):
        weights.from_path(folder)
    for epoch in (1, 2):
        save_checkpoint(ours(LightNN(), epoch=epoch, run_id="run1"), checkpoints / f"epoch_{epoch:04d}.pt")
    (checkpoints / "epoch_0003.pt").write_bytes(b"damaged")
    source = weights.from_path(folder)
    assert source.epoch == 2 and source.run_id == "run1"
    assert source.label == str((checkpoints / "epoch_0002.pt").resolve())
    assert "skipping" in caplog.text and "epoch_0003.pt" in caplog.text
    save_checkpoint(ours(LightNN(), epoch=5), checkpoints / "final.pt")
    source = weights.from_path(folder, "teacher checkpoint")
    assert source.epoch == 5 and source.description == f"teacher checkpoint {checkpoints / 'final.pt'}"


def test_a_teacher_checkpoint_may_be_a_job_folder(tmp_path):
    deep = DeepNN()
    save_checkpoint(ours(deep, run_id="run7"), tmp_path / "job" / "checkpoints" / "final.pt")
    teacher = DeepNN()
    assert load_teacher(teacher, tmp_path / "job").run_id == "run7"  # recorded as the student's teacher run
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), deep.state_dict().values()))


# --- a checkpoint that does not fit ----------------------------------------------------------------

def test_missing_unexpected_and_misshapen_weights_are_named_in_one_line(tmp_path):
    state = DeepNN().state_dict()
    first, last = next(iter(state)), list(state)[-1]
    missing = {key: value for key, value in state.items() if key != first}
    message = teacher_error(tmp_path, missing)
    assert f"does not fit a DeepNN (teacher.model): 1 missing key ({first})" in message
    assert "Error(s) in loading" not in message

    message = teacher_error(tmp_path, {**state, "extra.weight": torch.ones(2)})
    assert message.endswith("does not fit a DeepNN (teacher.model): 1 unexpected key (extra.weight)")

    misshapen = dict(state)
    misshapen[first] = torch.zeros(7, *state[first].shape[1:])
    message = teacher_error(tmp_path, misshapen)
    assert message.endswith(f"first shape mismatch {first}: checkpoint {tuple(misshapen[first].shape)}, "
                            f"model {tuple(state[first].shape)}")

    everything_wrong = {key: value for key, value in misshapen.items() if key != last}
    everything_wrong.update({f"extra{i}.weight": torch.ones(1) for i in range(5)})
    message = teacher_error(tmp_path, everything_wrong)
    assert (f"1 missing key ({last}), 5 unexpected keys (extra0.weight, extra1.weight, extra2.weight, ...), "
            f"first shape mismatch {first}: checkpoint (7," in message)


def test_an_empty_checkpoint_holds_no_weights(tmp_path):
    assert teacher_error(tmp_path, {}).endswith("does not fit a DeepNN (teacher.model): it holds no weights")


def test_architecture_and_classes_are_checked_before_the_keys(tmp_path):
    assert "holds a LightNN, but the teacher model is a DeepNN (teacher.model)" in teacher_error(
        tmp_path, ours(LightNN()))
    assert "was trained for 100 classes but the data has 10 (data.num_classes=10)" in teacher_error(
        tmp_path, DeepNN(num_classes=100).state_dict())


def test_evaluation_names_the_model_key_of_a_checkpoint_that_does_not_fit(tmp_path):
    state = LightNN().state_dict()
    first = next(iter(state))
    path = tmp_path / "light.pt"
    torch.save({key: value for key, value in state.items() if key != first}, path)
    with pytest.raises(KDResearchError) as refused:
        run_evaluation(str(path), ["model=light", *EVALUATE_TINY], log_to_mlflow=False)
    assert str(refused.value) == f"checkpoint {path} does not fit a LightNN (model=light): 1 missing key ({first})"


# --- benchmark suites' files -----------------------------------------------------------------------

def test_repdistiller_last_checkpoint_loads_weights_only(tmp_path):
    """RepDistiller's `*_last.pth`: its command line (an argparse.Namespace) under `opt`, weights
    saved from a DataParallel model (`module.` prefix)."""
    model = resnet8(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "resnet8_last.pth"
    opt = argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180, 210])
    torch.save({"opt": opt, "model": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": 240}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["opt"].lr_decay_epochs == [150, 180, 210]

    outcome = run_evaluation(str(path), ["model=resnet8", *EVALUATE_TINY], log_to_mlflow=False)
    assert outcome.source.epoch == 240 and outcome.evaluation.count == 128
    teacher = resnet8(num_classes=10)
    weights.load_weights(teacher, checkpoint, "teacher checkpoint", "teacher.model")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("key", ["net", "state_dict"])
def test_other_suites_keep_the_weights_under_net_or_state_dict(tmp_path, key):
    model = LightNN()
    path = tmp_path / "suite.pth"
    torch.save({key: model.state_dict(), "epoch": 3, "best_acc": torch.tensor(71.5)}, path)
    loaded = LightNN()
    weights.load_weights(loaded, load_checkpoint(path), f"checkpoint {path}", "model=light")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_namespace_is_no_way_to_smuggle_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil_last.pth"
    torch.save({"opt": argparse.Namespace(model=Evil()), "model": {}}, path)
    with pytest.raises(KDResearchError, match="refusing to load .* could run code"):
        load_checkpoint(path)
    assert not marker.exists()


# --- plain pickles ---------------------------------------------------------------------------------

def test_a_plain_pickle_is_not_called_corrupt(tmp_path):
    state = DeepNN().state_dict()
    message = teacher_error(tmp_path, pickle.dumps({"model": state}, protocol=4))
    assert "is a plain Python pickle, not a torch checkpoint (torch.save)" in message
    assert "could run code" in message and "truncated or corrupt" not in message

    message = teacher_error(tmp_path, pickle.dumps({"epoch": 3, "lr": [0.1, 0.01]}, protocol=4))
    assert message.endswith("is a plain Python pickle, not a torch checkpoint; write it with torch.save")

    cut = pickle.dumps({"model": state}, protocol=4)[:-200]
    assert "is truncated or corrupt" in teacher_error(tmp_path, cut)


# --- weights and outputs that are not finite -------------------------------------------------------

def test_a_teacher_with_nan_weights_is_refused_before_training(tmp_path):
    state = LightNN().state_dict()
    poisoned = [key for key, value in state.items() if value.is_floating_point()][-1]
    state[poisoned] = torch.full_like(state[poisoned], float("nan"))
    path = tmp_path / "nan_teacher.pt"
    torch.save(state, path)
    store = tmp_path / "store"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", *FAST, "device=cpu", "loss=kd", "teacher=light",
                                           f"teacher.checkpoint={path}", f"tracking.uri={tracking_uri(store)}",
                                           f"cache.dir={tmp_path / 'cache'}"])
    with pytest.raises(KDResearchError) as refused:
        run_job(cfg, tmp_path / "job")
    assert str(refused.value) == (f"teacher checkpoint {path} holds weights that are not finite "
                                  f"(NaN or inf in 1 tensor: {poisoned})")
    assert experiment_runs(mlflow_client(store)) == []  # no student run was started


def test_evaluation_refuses_nan_weights_and_non_finite_outputs(tmp_path):
    nan_path, huge_path = tmp_path / "nan.pt", tmp_path / "huge.pt"
    nan_state = LightNN().state_dict()
    nan_state["classifier.3.weight"] = torch.full_like(nan_state["classifier.3.weight"], float("nan"))
    torch.save(nan_state, nan_path)
    with pytest.raises(KDResearchError, match=r"nan\.pt holds weights that are not finite \(NaN or inf in 1 "
                                              r"tensor: classifier\.3\.weight\)"):
        run_evaluation(str(nan_path), ["model=light", *EVALUATE_TINY], log_to_mlflow=False)

    # Finite weights whose outputs overflow: NaN logits would argmax to class 0 and report ~10 %.
    torch.save({key: value * 1e30 if value.is_floating_point() else value
                for key, value in LightNN().state_dict().items()}, huge_path)
    with pytest.raises(KDResearchError) as refused:
        run_evaluation(str(huge_path), ["model=light", *EVALUATE_TINY], log_to_mlflow=False)
    assert str(refused.value).startswith(f"checkpoint {huge_path}: the model's outputs on the test split are "
                                         f"not finite (mean loss nan)")


# --- the one evaluation loop -----------------------------------------------------------------------

def test_trainer_and_evaluation_report_the_same_pass():
    data = make_synthetic(num_train=64, num_test=96, limit_test=96)
    model = LightNN()
    accuracy, loss = evaluate(model, data.batches("test", 40, CPU), CPU, "fp32")
    evaluation = evaluate_model(model, data.batches("test", 40, CPU), data.num_classes, CPU)
    assert evaluation.count == 96
    assert (accuracy, loss) == (evaluation.accuracy, evaluation.loss)
    with torch.no_grad():
        images, labels = zip(*((images, labels) for images, labels, _ in data.batches("test", 96, CPU)))
        logits = model.eval()(torch.cat(images))
    assert accuracy == pytest.approx(100.0 * (logits.argmax(1) == torch.cat(labels)).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.cat(labels)).item(), rel=1e-5)
