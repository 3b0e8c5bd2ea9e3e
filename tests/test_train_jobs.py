"""Training jobs on tiny synthetic data, with MLflow in a temporary folder: what lands in MLflow
(metrics per epoch, tags, params, artifacts, run names), teacher reuse, determinism, and clean
one-line errors for bad input. The jobs run in-process (conftest.train_in_process); two bad inputs
go through a real `python train.py`, for what it and Hydra print."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import (
    FAST,
    check_ok,
    experiment_runs,
    mlflow_client,
    run_parallel,
    run_train,
    train_in_process,
)

from kdresearch.models import DeepNN, LightNN
from kdresearch.tracking.store import metric_history
from kdresearch.training.checkpoint import save_checkpoint

EPOCH_METRICS = ("train/loss", "test/acc", "test/loss", "lr", "epoch_seconds")
CE_EPOCHS = 2  # the student-CE job runs 2 epochs, so step=epoch is visible


def all_metrics(client, run):
    """{key: [(step, value), ...]} for every metric the run logged."""
    return metric_history(client, run.info.run_id, run.data.metrics.keys())


def without_timing(history):
    # times differ, and so does the budget's teacher work (a later job reads the cache an earlier one built)
    return {key: values for key, values in history.items() if key != "epoch_seconds" and not key.startswith("budget/")}


def by_name(runs, name):
    found = [run for run in runs if run.info.run_name == name]
    assert len(found) == 1, f"expected one run named {name}, got {[r.info.run_name for r in runs]}"
    return found[0]


def assert_none_running(client):
    running = [(r.info.run_name, r.info.status) for r in experiment_runs(client) if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"


class Store:
    """One temporary MLflow store with the jobs run on it, read back through MlflowClient."""

    def __init__(self, path):
        self.path = path
        self.jobs = {}

    def run(self, key, *overrides):
        self.jobs[key] = check_ok(train_in_process(self.path, *overrides))
        return self.jobs[key]

    @property
    def client(self):
        return mlflow_client(self.path)

    def runs(self, **filters):
        runs = experiment_runs(self.client)
        return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]

    def download(self, run, artifact, tmp_path):
        return self.client.download_artifacts(run.info.run_id, artifact, str(tmp_path))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores:

    A ("explicit"): a teacher trained by `model=deep`, a student CE, then two KD students
    (T=2, T=4) that find that teacher on their own;
    B ("automatic"): a KD student with no teacher anywhere (trained first, automatically), the
    same command again, and the student-CE command of store A again.
    """
    explicit = Store(tmp_path_factory.mktemp("explicit"))
    automatic = Store(tmp_path_factory.mktemp("automatic"))

    explicit.run("teacher", *FAST, "model=deep")
    explicit.run("ce", *FAST, f"epochs={CE_EPOCHS}")
    explicit.run("kd", *FAST, "loss=kd")
    explicit.run("kd4", *FAST, "loss=kd", "T=4")
    automatic.run("kd", *FAST, "loss=kd")
    automatic.run("kd_again", *FAST, "loss=kd")
    automatic.run("ce", *FAST, f"epochs={CE_EPOCHS}")
    return explicit, automatic


@pytest.fixture(scope="module")
def explicit(stores):
    return stores[0]


@pytest.fixture(scope="module")
def automatic(stores):
    return stores[1]


# --- the teacher -----------------------------------------------------------------------------

def test_teacher_run(explicit, tmp_path):
    client = explicit.client
    runs = explicit.runs()
    teacher = by_name(runs, "deep-ce")
    assert teacher.info.status == "FINISHED"
    tags = teacher.data.tags
    assert (tags["role"], tags["model"], tags["loss"]) == ("teacher", "deep", "ce")
    assert "teacher_run_id" not in tags
    assert "model=deep" in tags["overrides"]
    assert teacher.data.params["parameter_count"] == "1186986"
    assert teacher.data.params["model.name"] == "deep"

    history = all_metrics(client, teacher)
    for key in (*EPOCH_METRICS, "train/ce"):
        assert [step for step, _ in history[key]] == [1], key
    assert "train/kd" not in history
    assert [step for step, _ in history["first_layer_norm"]] == [0, 1]
    assert history["lr"] == [(1, 0.001)]
    assert 0 <= history["test/acc"][0][1] <= 100

    checkpoint = torch.load(explicit.download(teacher, "checkpoints/final.pt", tmp_path), weights_only=True)
    assert checkpoint["model_class"] == "DeepNN" and checkpoint["epoch"] == 1
    DeepNN().load_state_dict(checkpoint["model"])
    with open(explicit.download(teacher, "config/config.yaml", tmp_path)) as handle:
        config = yaml.safe_load(handle)
    assert config["model"]["name"] == "deep" and config["loss"]["name"] == "ce"


# --- the student, cross-entropy ----------------------------------------------------------------

def test_student_ce_run(explicit, tmp_path):
    client = explicit.client
    student = by_name(explicit.runs(), "light-ce")
    assert student.info.status == "FINISHED"
    tags = student.data.tags
    assert (tags["role"], tags["model"], tags["loss"]) == ("student", "light", "ce")
    assert "teacher_run_id" not in tags
    assert student.data.params["parameter_count"] == "267738"
    assert student.data.params["epochs"] == str(CE_EPOCHS)
    assert student.data.params["device.keep_freed_memory"] == "True"

    history = all_metrics(client, student)
    for key in (*EPOCH_METRICS, "train/ce"):
        assert [step for step, _ in history[key]] == [1, 2], key
    norms = history["first_layer_norm"]
    assert [step for step, _ in norms] == [0, 1, 2]
    assert round(norms[0][1], 4) == 2.3274
    assert norms[1][1] != norms[0][1]  # training moved the first layer
    # CE alone: the total is the CE part
    assert history["train/loss"] == history["train/ce"]

    checkpoint = torch.load(explicit.download(student, "checkpoints/final.pt", tmp_path), weights_only=True)
    assert checkpoint["model_class"] == "LightNN" and checkpoint["epoch"] == CE_EPOCHS
    assert list(checkpoint["model"]) == list(LightNN().state_dict())
    model = LightNN()
    model.load_state_dict(checkpoint["model"])
    assert torch.linalg.vector_norm(model.features[0].weight).item() == pytest.approx(norms[-1][1], rel=1e-6)


# --- the student, knowledge distillation --------------------------------------------------------

def test_kd_run(explicit, tmp_path):
    client = explicit.client
    runs = explicit.runs()
    teacher, ce, kd = by_name(runs, "deep-ce"), by_name(runs, "light-ce"), by_name(runs, "light-kd-T2")
    assert kd.info.status == "FINISHED"
    tags = kd.data.tags
    assert (tags["role"], tags["model"], tags["loss"]) == ("student", "light", "kd")
    assert tags["teacher_run_id"] == teacher.info.run_id
    assert kd.data.params["loss.T"] == "2" and kd.data.params["loss.distill_weight"] == "0.25"
    assert f"teacher: reusing MLflow run {teacher.info.run_id}" in explicit.jobs["kd"].output

    history = all_metrics(client, kd)
    for key in (*EPOCH_METRICS, "train/ce", "train/kd"):
        assert [step for step, _ in history[key]] == [1], key
    (_, total), (_, ce_part), (_, kd_part) = history["train/loss"][0], history["train/ce"][0], history["train/kd"][0]
    assert total == pytest.approx(0.75 * ce_part + 0.25 * kd_part, rel=1e-5)
    assert kd_part > 0
    # Both students start from the same weights (the tutorial's check).
    ce_norms = metric_history(client, ce.info.run_id, ["first_layer_norm"])["first_layer_norm"]
    assert history["first_layer_norm"][0] == ce_norms[0]
    assert round(history["first_layer_norm"][0][1], 4) == 2.3274

    checkpoint = torch.load(explicit.download(kd, "checkpoints/final.pt", tmp_path), weights_only=True)
    assert checkpoint["model_class"] == "LightNN"
    LightNN().load_state_dict(checkpoint["model"])
    with open(explicit.download(kd, "config/config.yaml", tmp_path)) as handle:
        config = yaml.safe_load(handle)
    assert config["loss"]["name"] == "kd" and config["loss"]["T"] == 2  # resolved, not ${T}


def test_second_kd_run_reuses_the_teacher(explicit):
    runs = explicit.runs()
    teachers = explicit.runs(role="teacher")
    assert len(teachers) == 1, [r.info.run_name for r in teachers]
    kd2, kd4 = by_name(runs, "light-kd-T2"), by_name(runs, "light-kd-T4")
    assert kd4.data.tags["teacher_run_id"] == kd2.data.tags["teacher_run_id"] == teachers[0].info.run_id
    assert kd4.data.params["loss.T"] == "4"
    assert "training one first" not in explicit.jobs["kd4"].output
    assert len(runs) == 4  # no extra runs appeared
    assert all(run.info.status == "FINISHED" for run in runs)
    h2 = metric_history(explicit.client, kd2.info.run_id, ["train/kd"])["train/kd"]
    h4 = metric_history(explicit.client, kd4.info.run_id, ["train/kd"])["train/kd"]
    assert h2 != h4  # the temperature reached the loss


def test_teacher_trained_automatically_then_reused(automatic):
    teachers = automatic.runs(role="teacher")
    assert len(teachers) == 1, [r.info.run_name for r in teachers]
    teacher = teachers[0]
    assert teacher.info.run_name == "deep-ce" and teacher.info.status == "FINISHED"
    assert "automatically" in teacher.data.tags["overrides"]
    students = automatic.runs(loss="kd")
    assert [run.info.run_name for run in students] == ["light-kd-T2", "light-kd-T2"]
    assert {run.data.tags["teacher_run_id"] for run in students} == {teacher.info.run_id}
    assert "training one first" in automatic.jobs["kd"].output
    assert "training one first" not in automatic.jobs["kd_again"].output
    assert f"teacher: reusing MLflow run {teacher.info.run_id}" in automatic.jobs["kd_again"].output


# --- determinism ------------------------------------------------------------------------------

def test_same_command_twice_gives_identical_metrics(explicit, automatic):
    b = automatic.client
    first, second = automatic.runs(loss="kd")
    h1, h2 = all_metrics(b, first), all_metrics(b, second)
    assert set(h1) == set(h2) and "train/kd" in h1
    assert without_timing(h1) == without_timing(h2)

    # The same CE command in two stores, and the same KD command with its teacher trained on the
    # fly in one store and reused in the other.
    a = explicit.client
    pairs = [(by_name(explicit.runs(), "light-ce"), by_name(automatic.runs(), "light-ce")),
             (by_name(explicit.runs(), "light-kd-T2"), first)]
    for run_a, run_b in pairs:
        assert without_timing(all_metrics(a, run_a)) == without_timing(all_metrics(b, run_b)), run_a.info.run_name


def test_automatic_teacher_is_the_explicit_teacher_job(explicit, automatic):
    """`loss=kd` with no teacher trains exactly what `python train.py model=deep` trains."""
    auto_teacher = automatic.runs(role="teacher")[0]
    explicit_teacher = explicit.runs(role="teacher")[0]
    assert auto_teacher.data.tags["config_hash"] == explicit_teacher.data.tags["config_hash"]
    assert without_timing(all_metrics(automatic.client, auto_teacher)) == \
        without_timing(all_metrics(explicit.client, explicit_teacher))


# --- bad input ---------------------------------------------------------------------------------

def assert_clean_failure(done, message, store):
    """Non-zero exit, no traceback, the message on one line, no MLflow run left RUNNING."""
    output = done.output
    assert done.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert any(message in line for line in output.splitlines()), f"expected {message!r} in:\n{output[-3000:]}"
    if message.startswith("error: "):  # our own errors: exactly one error line, holding the whole message
        errors = [line for line in output.splitlines() if "error: " in line]
        assert len(errors) == 1 and message in errors[0], output[-3000:]
    assert_none_running(mlflow_client(store))


def light_checkpoint(path, bare=False, num_classes=10):
    """A LightNN checkpoint (ours, or a bare state_dict): the wrong architecture for a DeepNN teacher."""
    model = LightNN(num_classes)
    save_checkpoint(model.state_dict() if bare else
                    {"format": 1, "model_class": "LightNN", "epoch": 1, "model": model.state_dict()}, path)
    return path


BAD_INPUTS = {
    "unknown-option": (("loss=nope",), "Could not find 'loss/nope'"),
    "T-abc": (("loss=kd", "T=abc"), "error: T must be a number, got 'abc'"),
    "T-zero": (("loss=kd", "T=0"), "error: T must be > 0, got 0"),
    "negative-weight": (("loss=kd", "loss.distill_weight=-1"), "error: loss.distill_weight must be >= 0, got -1"),
    "missing-teacher-checkpoint": (("loss=kd", "teacher.checkpoint=/does/not/exist"),
                                   "error: checkpoint /does/not/exist does not exist"),
    "wrong-architecture-teacher": (("loss=kd", "teacher.checkpoint={light}"),
                                   "error: teacher checkpoint {light} holds a LightNN, but the teacher model is a DeepNN"),
    "incompatible-cosine-pair": (("loss=cosine", "model=deep", "teacher=light"),
                                 "error: loss=cosine: the teacher's hidden size (1024) must be a multiple of the "
                                 "student's (2048); student DeepNN (stages 64x16x16, 32x8x8; embedding 512; 10 classes), "
                                 "teacher LightNN"),
    "teacher-for-other-classes": (("loss=kd", "teacher=light", "teacher.checkpoint={light100}"),
                                  "error: teacher checkpoint {light100} was trained for 100 classes but the data has 10"),
    "sgd-nesterov-without-momentum": (("optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"),
                                      "error: optimizer: Nesterov momentum requires a momentum and zero dampening"),
    "divergence": (("optimizer=sgd", "optimizer.lr=1e30"), "error: training diverged"),
}

# Hydra's own error for an unknown option, and one of ours, as `python train.py` prints them.
THROUGH_TRAIN_PY = ("unknown-option", "T-abc")

MORE_BAD_INPUTS = {
    "regressor-with-smaller-maps": (("loss=regressor", "model=vgg8"),
                                    "error: loss=regressor: the last feature maps differ in size (4x4 vs 8x8); student vgg8"),
    "multimargin-p3": (("loss=multimargin", "loss.p=3"), "error: loss=multimargin"),
    "zero-epochs": (("epochs=0",), "error: epochs must be an integer >= 1, got 0"),
    "cifar10-missing": (("data=cifar10", "data.root=/does/not/exist", "data.download=false"),
                        "error: CIFAR-10 not found"),
    "bare-state-dict-teacher": (("loss=kd", "teacher.checkpoint={bare}"), "error: teacher checkpoint {bare} does not fit a DeepNN"),
}


@pytest.fixture(scope="module")
def bad_jobs(tmp_path_factory):
    """All of BAD_INPUTS against one store; {case: (finished job, message)}. The cases in
    THROUGH_TRAIN_PY run as `python train.py` (side by side), the others in-process meanwhile."""
    store = tmp_path_factory.mktemp("bad")
    files = {"light": light_checkpoint(store / "light.pt"),
             "light100": light_checkpoint(store / "light100.pt", num_classes=100)}
    cases = {name: (tuple(o.format(**files) for o in overrides), message.format(**files))
             for name, (overrides, message) in BAD_INPUTS.items()}

    def in_process():
        return {name: train_in_process(store, *FAST, *overrides) for name, (overrides, _) in cases.items()
                if name not in THROUGH_TRAIN_PY}

    tasks = {name: (lambda o=cases[name][0]: run_train(store, *FAST, *o)) for name in THROUGH_TRAIN_PY}
    results = run_parallel({**tasks, "in-process": in_process}, workers=len(tasks) + 1)
    results.update(results.pop("in-process"))
    return store, {name: (results[name], message) for name, (_, message) in cases.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(bad_jobs, case):
    store, results = bad_jobs
    done, message = results[case]
    assert_clean_failure(done, message, store)


def test_divergence_ends_the_run_failed(bad_jobs):
    store, results = bad_jobs
    done, _ = results["divergence"]
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", done.output).group(1)
    assert mlflow_client(store).get_run(run_id).info.status == "FAILED"


def test_bad_inputs_start_no_runs(bad_jobs):
    """Every refusal happens before an MLflow run starts; only the diverged run exists (FAILED)."""
    store, _ = bad_jobs
    runs = experiment_runs(mlflow_client(store))
    assert [(r.info.run_name, r.info.status) for r in runs] == [("light-ce", "FAILED")]


@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_more_bad_input_fails_cleanly(tmp_path, case):
    files = {"bare": light_checkpoint(tmp_path / "bare.pt", bare=True)}
    overrides, message = MORE_BAD_INPUTS[case]
    done = train_in_process(tmp_path, *FAST, *(o.format(**files) for o in overrides))
    assert_clean_failure(done, message.format(**files), tmp_path)


def test_student_sweeps_reuse_one_teacher_trained_with_its_own_recipe(tmp_path):
    """The automatic teacher trains with teacher.* (its own recipe): students that differ in their
    optimizer, lr, schedule, epochs or loss share it; a change of the teacher's recipe trains another."""
    students = [("loss=kd",), ("loss=kd", "optimizer=sgd", "optimizer.lr=0.02", "scheduler=cosine"),
                ("loss=cosine", "epochs=2")]
    for overrides in students:
        check_ok(train_in_process(tmp_path, *FAST, *overrides))
    client = mlflow_client(tmp_path)
    teachers = [run for run in experiment_runs(client) if run.info.run_name == "deep-ce"]
    assert len(teachers) == 1
    teacher = teachers[0]
    assert (teacher.data.params["epochs"], teacher.data.params["optimizer.name"]) == ("1", "adam")
    assert teacher.data.params["scheduler.name"] == "constant"
    students_runs = [run for run in experiment_runs(client) if run.data.tags["role"] == "student"]
    assert {run.data.tags["teacher_run_id"] for run in students_runs} == {teacher.info.run_id}

    check_ok(train_in_process(tmp_path, *FAST, "loss=kd", "teacher.optimizer.lr=0.002"))
    teachers = [run for run in experiment_runs(client) if run.info.run_name == "deep-ce"]
    assert len(teachers) == 2 and teachers[-1].data.params["optimizer.lr"] == "0.002"
