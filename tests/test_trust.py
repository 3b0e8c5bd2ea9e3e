"""Numbers a reader can check: a student's fidelity to its teacher per epoch, the teacher's
provenance (weight digest, source, measured against claimed accuracy) and the run's budget."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import shutil

import pytest
import torch
from torch import nn

from conftest import FAST, compose_config, experiment_runs, mlflow_client, train_in_process
from kdresearch.config.groups import build
from kdresearch.config.validation import check_config
from kdresearch.errors import KDResearchError
from kdresearch.reports.compare import build_rows, read_run, write_csv
from kdresearch.teacher.provenance import TeacherSource, check_claim, claimed_accuracy, weight_digest
from kdresearch.tracking import names
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.loop import predict
from kdresearch.training.weights import from_path

pytestmark = pytest.mark.usefixtures("one_compute_thread")

KD = (*FAST, "loss=kd", "device=cpu")


class FixedLogits(nn.Module):
    """A "model" whose logits for image i are row i of a table (the images are the indices)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[images]


def test_fidelity_matches_a_plain_computation_on_fixed_logits():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(10, 4, generator=generator), torch.randn(10, 4, generator=generator)
    labels = torch.randint(0, 4, (10,), generator=generator)
    batches = [(index, labels[index], index) for index in torch.arange(10).split(4)]
    result = predict(FixedLogits(student), batches, torch.device("cpu"), "fp32", reference=teacher)

    agreeing = sum(int(student[i].argmax() == teacher[i].argmax()) for i in range(10))
    kl = 0.0
    for i in range(10):
        p = [math.exp(v) / sum(math.exp(w) for w in teacher[i].tolist()) for v in teacher[i].tolist()]
        q = [math.exp(v) / sum(math.exp(w) for w in student[i].tolist()) for v in student[i].tolist()]
        kl += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    assert result.agreement == pytest.approx(100.0 * agreeing / 10)
    assert result.kl_to_reference == pytest.approx(kl / 10, rel=1e-5)
    assert result.logits is None  # kept only when asked
    kept = predict(FixedLogits(teacher), batches, torch.device("cpu"), "fp32", keep_logits=True)
    assert torch.equal(kept.logits, teacher) and kept.agreement is None
    # against itself: full agreement, no divergence
    same = predict(FixedLogits(teacher), batches, torch.device("cpu"), "fp32", reference=teacher)
    assert same.agreement == 100.0 and same.kl_to_reference == pytest.approx(0.0, abs=1e-6)


def test_claimed_accuracy_reads_ours_and_the_suites_files():
    assert claimed_accuracy({"metrics": {"test/acc": 71.5}}) == 71.5
    assert claimed_accuracy({"model": {}, "best_acc": torch.tensor(74.3)}) == pytest.approx(74.3)  # RepDistiller best
    assert claimed_accuracy({"model": {}, "accuracy": 70.0}) == 70.0  # RepDistiller's epoch files
    assert claimed_accuracy({"model": {}}) is None


def test_a_teacher_within_the_margin_of_its_claim_gives_no_warning(caplog):
    with caplog.at_level(logging.WARNING):
        check_claim(TeacherSource("r", claimed_acc=75.0), 70.5, margin=5)
        check_claim(TeacherSource(None), 10.0, margin=5)  # claims nothing
    assert not caplog.records


def test_a_negative_accuracy_margin_is_refused_in_one_line():
    with pytest.raises(KDResearchError, match=r"^teacher\.accuracy_margin") as error:
        check_config(compose_config("loss=kd", "teacher.accuracy_margin=-1"))
    assert "\n" not in str(error.value)


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_kd_job_logs_fidelity_per_epoch_its_teacher_run_provenance_and_its_budget(store):
    job = train_in_process(store, *KD, "epochs=2", "data.val_size=64")
    assert job.returncode == 0, job.stdout
    client = mlflow_client(store)  # after the job: a client on a store not yet made would migrate one (seconds)
    student = experiment_runs(client, filter_string=f"tags.{names.ROLE} = 'student'")[0]
    teacher_run = experiment_runs(client, filter_string=f"tags.{names.ROLE} = 'teacher'")[0]
    run_id = student.info.run_id
    for key in ("test/agreement", "test/kl_teacher", "val/agreement", "val/kl_teacher"):
        assert metric_steps(client, run_id, key) == [1, 2], key
    assert 0 <= student.data.metrics["test/agreement"] <= 100 and student.data.metrics["test/kl_teacher"] >= 0

    # provenance: the automatic teacher's run, its weight digest, claimed and measured accuracy
    tags = student.data.tags
    teacher = build(compose_config("loss=kd").teacher.model, "teacher.model")
    teacher.load_state_dict(from_path(job.run_dir / "teacher").checkpoint["model"])
    assert tags[names.TEACHER_RUN_ID] == teacher_run.info.run_id
    assert tags[names.TEACHER_DIGEST] == weight_digest(teacher)
    assert float(tags[names.TEACHER_CLAIMED_ACC]) == pytest.approx(teacher_run.data.metrics["test/acc"], abs=0.01)
    # the same teacher on the same test images: the measured accuracy is the claimed one
    assert tags[names.TEACHER_TEST_ACC] == tags[names.TEACHER_CLAIMED_ACC]
    assert names.TEACHER_FILE not in tags and "measures" not in job.stdout

    # budget: 192 training images (256 less 64 held out) in 2 batches of 128, for 2 epochs; the
    # teacher ran over the training images once (building the cache) and over test and validation
    # once; every step read the cache
    budget = {key[len("budget/"):]: value for key, value in student.data.metrics.items() if key.startswith("budget/")}
    assert budget["epochs"] == 2 and budget["steps"] == 4 and budget["images"] == 384
    assert budget["views_per_image"] == 1
    assert budget["teacher_forwards"] == 192 + 128 + 64 and budget["teacher_cache_hits"] == 384
    assert 0 < budget["wall_hours"] == budget["device_hours"]
    # the automatic teacher trained inside this job is a run with its own budget, left out of the student's
    teacher_seconds = (teacher_run.info.end_time - teacher_run.info.start_time) / 1000
    assert budget["wall_hours"] * 3600 < job.seconds - teacher_seconds
    assert teacher_run.data.metrics["budget/teacher_forwards"] == 0  # a run without a teacher

    # the comparison's CSV carries fidelity and budget columns
    rows = build_rows([read_run(client, student)])
    with open(write_csv(rows, store / "table.csv"), newline="") as stream:
        line = next(csv.DictReader(stream))
    assert float(line["agreement_mean"]) == pytest.approx(student.data.metrics["test/agreement"])
    assert float(line["kl_teacher_mean"]) == pytest.approx(student.data.metrics["test/kl_teacher"])
    assert float(line["steps_mean"]) == 4 and float(line["device_hours_mean"]) == pytest.approx(budget["device_hours"])

    # resumed after epoch 1: the budget adds up both attempts (the second measures the teacher
    # again, 128 + 64 images, and reads the cache its first attempt built)
    interrupted = store / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(job.run_dir / "checkpoints" / "epoch_0001.pt", interrupted / "checkpoints")
    client.set_terminated(run_id, "KILLED")  # as a stopped job leaves it
    resumed = train_in_process(store, *KD, "epochs=2", "data.val_size=64", f"resume={interrupted}")
    assert resumed.returncode == 0 and resumed.result.run_id == run_id, resumed.stdout
    metrics = client.get_run(run_id).data.metrics
    assert (metrics["budget/steps"], metrics["budget/images"]) == (4, 384)
    assert metrics["budget/teacher_forwards"] == 2 * (192 + 128 + 64) - 192
    assert metrics["budget/teacher_cache_hits"] == 384
    first_attempt = load_checkpoint(interrupted / "checkpoints" / "epoch_0001.pt")["budget"]["wall_seconds"]
    assert metrics["budget/wall_hours"] > first_attempt / 3600


def test_a_file_teacher_is_recorded_and_one_that_measures_far_below_its_claim_is_warned_about(store):
    teacher = build(compose_config("loss=kd").teacher.model, "teacher.model")
    file = store / "teacher.pth"
    store.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": teacher.state_dict(), "best_acc": torch.tensor(75.0)}, file)  # RepDistiller's
    job = train_in_process(store, *KD, f"teacher.checkpoint={file}", "cache.enabled=false")
    assert job.returncode == 0, job.stdout
    client = mlflow_client(store)

    tags = experiment_runs(client)[0].data.tags
    assert tags[names.TEACHER_FILE] == str(file.resolve())
    assert tags[names.TEACHER_FILE_SHA256] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert tags[names.TEACHER_DIGEST] == weight_digest(teacher)
    assert tags[names.TEACHER_CLAIMED_ACC] == "75.00" and names.TEACHER_RUN_ID not in tags
    measured = float(tags[names.TEACHER_TEST_ACC])
    assert measured < 30  # an untrained network on 10 classes: chance
    warning = [line for line in job.stdout.splitlines() if "WARNING" in line and "claims" in line]
    assert len(warning) == 1 and f"{measured:.2f} %" in warning[0] and "75.00 %" in warning[0], job.stdout
    metrics = experiment_runs(client)[0].data.metrics
    # online teacher: every training image of the epoch, then test once; nothing read from a cache
    assert metrics["budget/teacher_forwards"] == 256 + 128 and metrics["budget/teacher_cache_hits"] == 0
