"""kdresearch.evaluation and scripts/evaluate.py: the confusion matrix on a hand-computed example,
then a tiny synthetic job evaluated by run id, by checkpoint file and as a foreign bare state_dict,
read back from a temporary MLflow store; and the one-line errors."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import FAST, compose_job, load_script, tracking_uri
from mlflow.tracking import MlflowClient

from kdresearch.reports.evaluation import confusion_matrix, per_class_accuracy
from kdresearch.training.checkpoint import load_checkpoint, model_state
from kdresearch.training.job import run_job

pytestmark = pytest.mark.usefixtures("one_compute_thread")


evaluate_script = load_script("evaluate")


# --- the numbers ----------------------------------------------------------------------------------

def test_confusion_matrix_and_per_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    matrix = confusion_matrix(predictions, labels, num_classes=4)
    # rows: true class, columns: predicted class; class 3 has no samples.
    assert matrix.tolist() == [[2, 1, 0, 0],
                               [0, 2, 0, 0],
                               [1, 1, 2, 0],
                               [0, 0, 0, 0]]
    assert matrix.dtype == torch.int64
    accuracy = per_class_accuracy(matrix)
    assert accuracy[:3].tolist() == pytest.approx([200 / 3, 100.0, 50.0])
    assert math.isnan(accuracy[3].item())
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), num_classes=4)


# --- a trained job ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One tiny LightNN job on synthetic data (1 epoch, 256 / 128 images) in a temporary store."""
    folder = tmp_path_factory.mktemp("evaluate")
    store = folder / "store"
    result = run_job(compose_job(store, *FAST, "device=cpu"), folder / "job")
    return result, store, folder


def run_script(capsys, *argv):
    status = evaluate_script.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_artifacts(client, run_id, folder):
    return {item.path for item in client.list_artifacts(run_id, folder)}


def test_run_id_logs_to_the_same_run(job, capsys, tmp_path):
    result, store, _ = job
    uri = tracking_uri(store)
    status, out, err = run_script(capsys, result.run_id, f"tracking.uri={uri}", "device=cpu", "--out", tmp_path)
    assert status == 0, err
    assert "accuracy" in out and "pattern_0" in out and "true\\pred" in out

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    # The same weights on the same 128 test images: the run's own last test/acc and test/loss.
    assert abs(metrics["eval/synthetic/acc"] - metrics["test/acc"]) < 1e-6
    assert metrics["eval/synthetic/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)
    assert abs(metrics["eval/synthetic/acc"] - result.test_acc) < 1e-6
    [logged] = client.get_metric_history(result.run_id, "eval/synthetic/acc")
    assert logged.step == 1  # the checkpoint's epoch, as the run's test/acc
    per_class = {int(key.rsplit("_", 1)[1]): value for key, value in metrics.items()
                 if key.startswith("eval/synthetic/acc/class_")}
    assert sorted(per_class) == list(range(10))
    assert run.data.tags["eval/synthetic/test_images"] == "128"
    assert run.info.status == "FINISHED"

    assert run_artifacts(client, result.run_id, "evaluation/synthetic") == {
        "evaluation/synthetic/confusion_matrix.png", "evaluation/synthetic/confusion_matrix.csv",
        "evaluation/synthetic/per_class.csv"}
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "confusion_matrix.csv") as stream:
        rows = list(csv.reader(stream))
    assert rows[0][1:] == [f"pattern_{i}" for i in range(10)]
    counts = [[int(value) for value in row[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == 128
    assert sum(counts[i][i] for i in range(10)) == round(metrics["test/acc"] * 128 / 100)
    with open(tmp_path / "per_class.csv") as stream:
        table = list(csv.DictReader(stream))
    assert sum(int(row["images"]) for row in table) == 128
    for row in table:
        if row["accuracy_percent"]:
            assert float(row["accuracy_percent"]) == pytest.approx(per_class[int(row["class"])])


def test_checkpoint_file_and_foreign_state_dict(job, capsys, tmp_path):
    result, store, _ = job
    uri = tracking_uri(store)
    client = MlflowClient(uri)

    # Our checkpoint file: its run_id is a run of this store, so the results go there.
    status, out, err = run_script(capsys, result.checkpoint, f"tracking.uri={uri}", "device=cpu",
                                  "data.limit_test=64")
    assert status == 0, err
    assert "the run that trained it" in out
    history = client.get_metric_history(result.run_id, "eval/synthetic/acc")
    assert len(history) >= 1
    assert client.get_run(result.run_id).data.tags["eval/synthetic/test_images"] == "64"

    # A bare state_dict from elsewhere: model=NAME builds it, the data comes from conf, a new run.
    foreign = tmp_path / "light_state.pt"
    torch.save(model_state(load_checkpoint(result.checkpoint)), foreign)
    status, out, err = run_script(capsys, foreign, f"tracking.uri={uri}", "device=cpu", "model=light",
                                  "data=synthetic", "debug=tiny")
    assert status == 0, err
    runs = client.search_runs([client.get_experiment_by_name("kdresearch").experiment_id],
                              filter_string="tags.role = 'evaluation'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id != result.run_id
    assert run.info.run_name == "evaluate-light"
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluated_checkpoint"] == str(foreign.resolve())
    assert abs(run.data.metrics["eval/synthetic/acc"] - result.test_acc) < 1e-6
    assert "evaluation/synthetic/confusion_matrix.png" in run_artifacts(client, run.info.run_id,
                                                                        "evaluation/synthetic")


def one_line_error(capsys, *argv) -> str:
    status, _, err = run_script(capsys, *argv)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_one_line_errors(job, capsys, tmp_path):
    result, store, _ = job
    uri = f"tracking.uri={tracking_uri(store)}"
    assert "neither a checkpoint file nor the id of an MLflow run" in one_line_error(
        capsys, "0123456789abcdef0123456789abcdef", uri)
    assert "does not exist" in one_line_error(capsys, tmp_path / "missing.pt", uri)
    mismatch = one_line_error(capsys, result.run_id, uri, "device=cpu", "data.num_classes=5")
    assert "trained for 10 classes" in mismatch and "data.num_classes=5" in mismatch
    foreign = tmp_path / "bare.pt"
    torch.save(model_state(load_checkpoint(result.checkpoint)), foreign)
    assert "model=NAME" in one_line_error(capsys, foreign, uri, "data=synthetic")
    assert "bad override" in one_line_error(capsys, result.run_id, uri, "data.no_such_key=1")
