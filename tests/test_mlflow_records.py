"""What a run records about itself, read back from MLflow: the experiment's kind, the lineage
(source, user, git commit and uncommitted changes, versions, hardware), the data as dataset
inputs, the trained student as a loadable MLflow model (and its registry entry), and MLflow's
system metrics. A store outside a git checkout or an unreachable registry costs tags, not runs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import (
    FAST,
    REPO_ROOT,
    TRAIN_PY,
    check_ok,
    experiment_runs,
    mlflow_client,
    new_store,
    tracking_uri,
    train_in_process,
)
from processes import free_port

from kdresearch.tracking import lineage
from kdresearch.tracking.store import Tracker
from kdresearch.training.checkpoint import load_checkpoint

VERSIONS = ("python", "torch", "torchvision", "hydra-core", "mlflow", "kdresearch")


def git(*args: str, cwd=REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def is_checkout() -> bool:
    try:
        return git("rev-parse", "--show-toplevel") == str(REPO_ROOT)
    except (OSError, subprocess.CalledProcessError):
        return False


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One job with validation split, model logging, registration and system metrics, trained
    in-process as `python train.py` would run it (the script it records as its source is argv[0])."""
    store = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        patch.setattr(sys, "argv", [str(TRAIN_PY)])
        done = check_ok(train_in_process(store, *FAST, "epochs=2", "data.limit_train=1000", "data.val_size=100",
                                         "tracking.log_model=true", "tracking.register_model=tiny-light",
                                         "tracking.system_metrics=true"))
    (run,) = experiment_runs(mlflow_client(store))
    return store, run, done


def test_new_experiment_opens_on_the_runs_table(recorded):
    store, run, _ = recorded
    experiment = mlflow_client(store).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_existing_experiment_without_the_kind_gets_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(new_store(tmp_path))
    Tracker(uri, "older")  # opens the store
    client = MlflowClient(uri)
    legacy = client.create_experiment("legacy")  # made by hand: no kind
    assert "mlflow.experimentKind" not in client.get_experiment(legacy).tags
    assert Tracker(uri, "legacy").experiment_id == legacy
    assert client.get_experiment(legacy).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_records_source_user_versions_and_hardware(recorded):
    _, run, _ = recorded
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    for name in VERSIONS:
        assert tags[f"version.{name}"] not in ("", "not installed"), name
    assert tags["version.torch"] == torch.__version__.split("+")[0] or tags["version.torch"] == torch.__version__
    assert tags["host.cpu"] and int(tags["host.threads"]) >= 1 and int(tags["host.cpu_count"]) >= 1


def test_run_records_the_git_commit_and_uncommitted_changes(recorded):
    if not is_checkout():
        pytest.skip("the project is not a git checkout here: the git tags are absent by design")
    store, run, _ = recorded
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=normal"))
    assert tags["git.dirty"] == str(dirty).lower()
    listed = [item.path for item in mlflow_client(store).list_artifacts(run.info.run_id, "lineage")]
    assert listed == (["lineage/git_diff.patch"] if dirty else [])


def test_git_state_of_a_dirty_checkout(tmp_path, monkeypatch):
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py", cwd=tmp_path)
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "first", cwd=tmp_path)
    monkeypatch.setattr(lineage, "PROJECT_ROOT", tmp_path.resolve())
    lineage.git_state.cache_clear()
    try:
        clean = lineage.git_state()
        assert clean.commit == git("rev-parse", "HEAD", cwd=tmp_path) and not clean.dirty
        lineage.git_state.cache_clear()
        (tmp_path / "code.py").write_text("x = 2\n")
        (tmp_path / "new.py").write_text("")
        dirty = lineage.git_state()
        assert dirty.dirty and "-x = 1" in dirty.diff and "+x = 2" in dirty.diff and "new.py" in dirty.diff
        assert lineage.lineage_tags()["git.dirty"] == "true"
    finally:
        lineage.git_state.cache_clear()


def test_outside_a_git_checkout_the_git_tags_are_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(lineage, "PROJECT_ROOT", tmp_path.resolve())  # a folder that is no checkout
    lineage.git_state.cache_clear()
    try:
        tags = lineage.lineage_tags()
        assert not any(key.startswith(("mlflow.source.git", "git.")) for key in tags)
        assert tags["mlflow.user"] and tags["version.mlflow"]
        lineage.git_state.cache_clear()
        monkeypatch.setenv("PATH", str(tmp_path))  # and no git program at all
        assert lineage.git_state() is None
    finally:
        lineage.git_state.cache_clear()


def test_data_is_logged_as_dataset_inputs(recorded):
    _, run, _ = recorded
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-validation", "synthetic-test"}
    for name, context, rows in (("synthetic-train", "train", 900), ("synthetic-validation", "validation", 100),
                                ("synthetic-test", "test", 128)):
        item = inputs[name]
        assert {tag.key: tag.value for tag in item.tags}["mlflow.data.context"] == context
        assert item.dataset.digest == run.data.tags["data_fingerprint"]
        assert "synthetic" in item.dataset.source
        assert f'"num_rows": {rows}' in item.dataset.profile


def test_final_student_is_a_loadable_mlflow_model(recorded, tmp_path):
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch

    store, run, _ = recorded
    mlflow.set_tracking_uri(tracking_uri(store))
    uri = f"runs:/{run.info.run_id}/model"
    model = mlflow.pytorch.load_model(uri)
    images = torch.randn(5, 3, 32, 32)
    checkpoint = load_checkpoint(mlflow_client(store).download_artifacts(run.info.run_id, "checkpoints/final.pt",
                                                                          str(tmp_path)))
    from kdresearch.models import LightNN

    student = LightNN(num_classes=10)
    student.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        torch.testing.assert_close(model(images), student.eval()(images), rtol=1e-5, atol=1e-5)
    served = mlflow.pyfunc.load_model(uri)
    assert served.predict(images.numpy()).shape == (5, 10)
    signature = served.metadata.signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert list(signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    assert served.metadata.saved_input_example_info is not None
    assert (served.metadata.flavors["pytorch"].get("serialization_format") or "pt2") == "pt2"


def test_register_model_creates_a_registry_version(recorded):
    store, run, _ = recorded
    versions = mlflow_client(store).search_model_versions("name = 'tiny-light'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert run.data.tags["registered_model"] == "tiny-light/1"


def test_system_metrics_are_sampled(recorded):
    _, run, _ = recorded
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_unreachable_registry_costs_a_warning_not_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    done = check_ok(train_in_process(tmp_path, *FAST, "tracking.log_model=true", "tracking.register_model=nowhere"))
    (run,) = experiment_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED"
    assert "model not registered as nowhere" in done.output and "Traceback" not in done.output
    assert run.data.tags["registered_model_error"]
    assert [m.model_id for m in run.outputs.model_outputs]  # the model itself is logged
