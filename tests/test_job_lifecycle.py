"""A job's life across attempts: killed before its first checkpoint, killed in the student's first
epoch after its automatic teacher finished, resumed after it finished with a damaged newest
checkpoint, and a second sweep started in the folder of another.

Each ends with one line saying what happened, no MLflow run left RUNNING, no metric logged twice
and no file of the earlier attempt overwritten. The states a SIGKILL leaves are made in process
(a job whose run is then set back to RUNNING, as a killed process leaves it) where that is the
same state; the real kills run as `-m slow` tests.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from pathlib import Path

import pytest
from conftest import (
    CONF_DIR,
    FAST,
    TRAIN_PY,
    experiment_runs,
    mlflow_client,
    new_store,
    run_command,
    start_train,
    tracking_uri,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdresearch.errors import KDResearchError
from kdresearch.layout import JobFolder
from kdresearch.training.job import run_job
from kdresearch.training.result import JobResult, objective

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TWO_EPOCHS = (*FAST, "epochs=2", "checkpoint.keep_last=2")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """One MLflow store for the in-process tests (its schema is made once). Each test trains in its
    own folder with its own seed, so no test finds another's runs (teacher reuse, config hashes)."""
    return new_store(tmp_path_factory.mktemp("lifecycle"))


@pytest.fixture
def store(shared_store, tmp_path) -> Path:
    """The shared store's folder (what compose_job tracks into); the test's jobs live in tmp_path."""
    return shared_store


@pytest.fixture
def client(shared_store):
    return mlflow_client(shared_store)


_seeds = iter(range(100, 10_000))


@pytest.fixture
def seed() -> str:
    return f"seed={next(_seeds)}"


def compose_job(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        return compose("config", overrides=["data=synthetic", "quiet=true", f"tracking.uri={tracking_uri(store)}",
                                            f"cache.dir={store / 'cache'}", *overrides])


def steps(client, run_id: str, key: str = "test/acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def statuses(client, under: Path) -> list[tuple[str, str, str]]:
    """(role, status, output_dir) of every run that trained under the folder `under`, oldest first."""
    return [(run.data.tags.get("role"), run.info.status, run.data.tags.get("output_dir"))
            for run in experiment_runs(client)
            if Path(run.data.tags.get("output_dir", "/")).is_relative_to(under.resolve())]


def runs_under(client, under: Path) -> list:
    return [run for run in experiment_runs(client)
            if Path(run.data.tags.get("output_dir", "/")).is_relative_to(under.resolve())]


def as_killed(client, folder: JobFolder, run_id: str) -> None:
    """What SIGKILL in the job's first epoch leaves: its run RUNNING, no epoch checkpoint."""
    for path in folder.checkpoints.glob("*.pt"):
        path.unlink()
    client.update_run(run_id, status="RUNNING")


# --- killed before its first checkpoint ----------------------------------------------------------

def test_resume_of_a_job_killed_in_epoch_1_marks_its_run_killed_and_trains_again(store, client, tmp_path, seed,
                                                                                 caplog):
    folder = JobFolder(tmp_path / "job")
    first = run_job(compose_job(store, *TWO_EPOCHS, seed), folder.path)
    as_killed(client, folder, first.run_id)

    with caplog.at_level(logging.INFO):
        again = run_job(compose_job(store, *TWO_EPOCHS, seed, f"resume={folder.path}"), tmp_path / "unused")
    assert (f"resume: {folder.path} holds no complete checkpoint (the job stopped in its first epoch); its MLflow "
            f"run {first.run_id}, left RUNNING, is marked KILLED; training it again from epoch 1 as a new MLflow "
            f"run") in caplog.text
    assert client.get_run(first.run_id).info.status == "KILLED"
    run = client.get_run(again.run_id)
    assert again.run_id != first.run_id and run.info.status == "FINISHED"
    assert run.data.tags["output_dir"] == str(folder.path.resolve())  # the same folder, not `unused`
    assert steps(client, again.run_id) == [1, 2]
    assert again.checkpoint == folder.final_checkpoint and folder.final_checkpoint.is_file()
    assert not (tmp_path / "unused").exists()


def test_resume_by_run_id_of_a_job_killed_in_epoch_1_trains_again(store, client, tmp_path, seed):
    folder = JobFolder(tmp_path / "job")
    first = run_job(compose_job(store, *FAST, seed), folder.path)
    as_killed(client, folder, first.run_id)
    again = run_job(compose_job(store, *FAST, seed, f"resume={first.run_id}"), tmp_path / "unused")
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert [status for _, status, _ in statuses(client, tmp_path)] == ["KILLED", "FINISHED"]


def test_resume_with_other_settings_of_a_job_killed_in_epoch_1_is_refused(store, client, tmp_path, seed):
    folder = JobFolder(tmp_path / "job")
    first = run_job(compose_job(store, *FAST, seed), folder.path)
    as_killed(client, folder, first.run_id)
    with pytest.raises(KDResearchError, match=rf"resume={folder.path}: the job in {folder.path} \(MLflow run "
                                              rf"{first.run_id}\) was started with other training settings; "
                                              "give the interrupted job's overrides again"):
        run_job(compose_job(store, *FAST, seed, "optimizer.lr=0.5", f"resume={folder.path}"), tmp_path / "unused")
    # Left as it was, for a resume with the right overrides.
    assert [status for _, status, _ in statuses(client, tmp_path)] == ["RUNNING"]


def test_resume_of_a_folder_no_job_trained_in_is_refused(store, client, tmp_path, seed):
    empty = tmp_path / "not-a-job"
    empty.mkdir()
    with pytest.raises(KDResearchError, match=rf"resume={empty}: no complete checkpoint in {empty}/checkpoints"):
        run_job(compose_job(store, *FAST, seed, f"resume={empty}"), tmp_path / "unused")
    assert statuses(client, tmp_path) == [] and list(empty.iterdir()) == []


def test_resume_of_a_kd_job_killed_in_the_students_epoch_1_reuses_its_teacher(store, client, tmp_path, seed,
                                                                              caplog):
    """The teacher FINISHED, the student's run is left RUNNING without a checkpoint: the student
    trains again (its dead run KILLED) with that same teacher; nothing says it was the teacher."""
    kd = (*FAST, "loss=kd", seed)
    folder = JobFolder(tmp_path / "job")
    student = run_job(compose_job(store, *kd), folder.path)
    teacher, _ = runs_under(client, tmp_path)
    teacher_final = folder.teacher.final_checkpoint.read_bytes()
    as_killed(client, folder, student.run_id)

    with caplog.at_level(logging.INFO):
        again = run_job(compose_job(store, *kd, f"resume={folder.path}"), tmp_path / "unused")
    assert "stopped while training its teacher" not in caplog.text
    assert f"its MLflow run {student.run_id}, left RUNNING, is marked KILLED" in caplog.text
    assert f"teacher: reusing MLflow run {teacher.info.run_id}" in caplog.text
    assert statuses(client, tmp_path) == [("teacher", "FINISHED", str(folder.teacher.path.resolve())),
                                          ("student", "KILLED", str(folder.path.resolve())),
                                          ("student", "FINISHED", str(folder.path.resolve()))]
    assert client.get_run(again.run_id).data.tags["teacher_run_id"] == teacher.info.run_id
    assert folder.teacher.final_checkpoint.read_bytes() == teacher_final  # the teacher's files untouched
    assert steps(client, teacher.info.run_id) == [1]


def test_resume_of_a_kd_job_killed_in_its_teachers_epoch_1_trains_the_teacher_again(store, client, tmp_path, seed,
                                                                                    caplog):
    """Killed in the automatic teacher's first epoch: no student run yet, the teacher's run left
    RUNNING. The teacher's run is marked KILLED, the teacher trains again, then the student."""
    kd = (*FAST, "loss=kd", seed)
    folder = JobFolder(tmp_path / "job")
    run_job(compose_job(store, *kd), folder.path)
    teacher, student = runs_under(client, tmp_path)
    client.delete_run(student.info.run_id)  # as if the student had never started
    for path in folder.checkpoints.glob("*.pt"):
        path.unlink()
    as_killed(client, folder.teacher, teacher.info.run_id)

    with caplog.at_level(logging.INFO):
        run_job(compose_job(store, *kd, f"resume={folder.path}"), tmp_path / "unused")
    assert f"resume: {folder.path} was stopped while training its teacher" in caplog.text
    assert f"its MLflow run {teacher.info.run_id}, left RUNNING, is marked KILLED" in caplog.text
    assert statuses(client, tmp_path) == [("teacher", "KILLED", str(folder.teacher.path.resolve())),
                                          ("teacher", "FINISHED", str(folder.teacher.path.resolve())),
                                          ("student", "FINISHED", str(folder.path.resolve()))]


# --- resumed after it finished -------------------------------------------------------------------

@pytest.mark.parametrize("newest", ["damaged", "intact"])
def test_resume_of_a_finished_job_trains_nothing_and_leaves_its_run_as_it_is(store, client, tmp_path, seed,
                                                                             caplog, newest):
    folder = JobFolder(tmp_path / "job")
    done = run_job(compose_job(store, *TWO_EPOCHS, seed), folder.path)
    before = client.get_run(done.run_id)
    if newest == "damaged":
        data = folder.epoch_checkpoint(2).read_bytes()
        folder.epoch_checkpoint(2).write_bytes(data[: len(data) // 2])
    files = {path.name: path.read_bytes() for path in folder.checkpoints.iterdir()}

    with caplog.at_level(logging.INFO):
        again = run_job(compose_job(store, *TWO_EPOCHS, seed, f"resume={folder.path}"), tmp_path / "unused")
    assert (f"resume: MLflow run {done.run_id} already FINISHED (job folder {folder.path}); nothing to train, "
            "the run stays as it is") in caplog.text
    after = client.get_run(done.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    for key in ("test/acc", "train/loss", "lr"):
        assert steps(client, done.run_id, key) == [1, 2], key  # nothing logged twice
    assert len(runs_under(client, tmp_path)) == 1
    assert {path.name: path.read_bytes() for path in folder.checkpoints.iterdir()} == files
    assert again == JobResult(done.run_id, done.test_acc, folder.final_checkpoint, done.objective)


# --- what a sweeper optimises --------------------------------------------------------------------

def test_objective_is_val_acc_when_there_is_a_validation_split():
    assert objective({"test/acc": 50.0, "val/acc": 60.0}) == 60.0
    assert objective({"test/acc": 50.0}) == 50.0
    assert objective({"train/loss": 1.0}) is None
    assert JobResult.of("r", {"test/acc": 50.0, "val/acc": 60.0}, Path("f")).objective == 60.0


# --- a second sweep in the folder of another ------------------------------------------------------

def sweep_config(store: Path, folder: Path, *overrides: str):
    """The config Hydra hands the multirun callbacks of `python train.py -m <overrides>` (its sweep
    overrides, e.g. seed=1,2, as the command line gave them)."""
    task = [f"tracking.uri={tracking_uri(store)}", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        config = compose("config", overrides=[f"tracking.uri={tracking_uri(store)}", f"hydra.sweep.dir={folder}"],
                         return_hydra_config=True)
    OmegaConf.set_readonly(config, False)
    config.hydra.overrides.task = task
    return config


@pytest.fixture
def parent_runs(monkeypatch):
    """kdresearch.sweeps.parent_runs, with the parent run id it exports to jobs unset afterwards."""
    from kdresearch.sweeps import parent_runs

    monkeypatch.delenv(parent_runs.PARENT_ENV, raising=False)
    return parent_runs


def test_another_sweep_in_a_sweeps_folder_is_refused_and_the_same_one_continues(store, client, tmp_path,
                                                                                parent_runs):
    folder = tmp_path / "sweep"
    first = parent_runs.SweepParentRun()
    first.on_multirun_start(sweep_config(store, folder, *FAST, "data=synthetic", "seed=1,2"))
    (folder / "0").mkdir()  # a job of it
    try:
        with pytest.raises(SystemExit, match=rf"^error: hydra.sweep.dir={folder} holds another sweep \(overrides "
                                             rf"'tracking.uri=\S+ debug=tiny data=synthetic seed=1,2'\); run it again "
                                             "with those overrides to continue it, or give this sweep another "
                                             "hydra.sweep.dir$"):
            parent_runs.SweepParentRun().on_multirun_start(
                sweep_config(store, folder, *FAST, "data=synthetic", "seed=3,4", "epochs=2"))
        again = parent_runs.SweepParentRun()
        again.on_multirun_start(sweep_config(store, folder, "seed=1,2", "data=synthetic", *FAST))  # any order
        assert again.run_id == first.run_id
        assert [run.info.run_id for run in experiment_runs(client) if run.data.tags.get("sweep_dir") == str(folder)] \
            == [first.run_id]
    finally:
        parent_runs.end_if_open(first.tracker, first.run_id)


def test_a_sweeps_folder_whose_parent_run_is_gone_is_refused(store, client, tmp_path, parent_runs):
    folder = tmp_path / "sweep"
    config = sweep_config(store, folder, *FAST, "seed=1,2")
    first = parent_runs.SweepParentRun()
    first.on_multirun_start(config)
    parent_runs.end_if_open(first.tracker, first.run_id)
    client.delete_run(first.run_id)
    with pytest.raises(SystemExit, match=rf"^error: hydra.sweep.dir={folder}: its sweep's parent MLflow run "
                                         rf"{first.run_id} was deleted from .*mlflow runs restore --run-id "
                                         rf"{first.run_id}\) to continue that sweep"):
        parent_runs.SweepParentRun().on_multirun_start(config)

    (folder / parent_runs.PARENT_FILE).unlink()
    (folder / "0").mkdir()
    with pytest.raises(SystemExit, match=rf"^error: hydra.sweep.dir={folder} holds the job folders 0 of a sweep but "
                                         rf"no {parent_runs.PARENT_FILE}; give this sweep another hydra.sweep.dir$"):
        parent_runs.SweepParentRun().on_multirun_start(config)
    assert [run.info.run_id for run in experiment_runs(client) if run.data.tags.get("sweep_dir") == str(folder)] \
        == []  # the deleted one aside, no parent was opened


# --- the real kills and sweeps ---------------------------------------------------------------------

# Epochs of many small batches: a SIGKILL sent when the student's epoch 1 starts lands before its
# checkpoint. The automatic teacher keeps its own batch size.
SLOW_EPOCH = (*FAST, "batch_size=4")


def killed_in_students_epoch_1(store: Path, *overrides: str):
    """A job SIGKILLed as soon as its student (LightNN) starts epoch 1; its process, reaped."""
    job = start_train(store, "job", *SLOW_EPOCH, *overrides)
    job.wait_until(lambda: re.search(r"LightNN: \d+ parameters", job.output), "the student's first epoch")
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert not JobFolder(job.run_dir).has_epoch_checkpoint(), f"the epoch ended before the kill:\n{job.describe()}"
    return job


@pytest.mark.slow
def test_sigkill_in_epoch_1_then_resume_restarts_the_job_and_leaves_no_run_running(tmp_path):
    store = new_store(tmp_path / "store")
    client = mlflow_client(store)
    job = killed_in_students_epoch_1(store)
    (killed,) = experiment_runs(client)
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves

    resumed = start_train(store, "resumed", *SLOW_EPOCH, f"resume={job.run_dir}").check_ok()
    assert f"its MLflow run {killed.info.run_id}, left RUNNING, is marked KILLED; training it again from epoch 1" \
        in resumed.output
    first, again = experiment_runs(client)
    assert (first.info.run_id, first.info.status, again.info.status) == (killed.info.run_id, "KILLED", "FINISHED")
    assert again.data.tags["output_dir"] == str(job.run_dir.resolve())
    assert JobFolder(job.run_dir).final_checkpoint.is_file()


@pytest.mark.slow
def test_sigkill_in_the_students_epoch_1_after_its_teacher_then_resume(tmp_path):
    """The automatic teacher FINISHED, then the student was killed: resume= says so (not that the
    teacher was stopped), marks the student's run KILLED and trains the student with that teacher."""
    store = new_store(tmp_path / "store")
    client = mlflow_client(store)
    job = killed_in_students_epoch_1(store, "loss=kd")
    teacher, killed = experiment_runs(client)
    assert (teacher.info.status, killed.info.status) == ("FINISHED", "RUNNING")

    resumed = start_train(store, "resumed", *SLOW_EPOCH, "loss=kd", f"resume={job.run_dir}").check_ok()
    assert "stopped while training its teacher" not in resumed.output
    assert f"its MLflow run {killed.info.run_id}, left RUNNING, is marked KILLED" in resumed.output
    runs = experiment_runs(client)
    assert [(run.data.tags["role"], run.info.status) for run in runs] == [
        ("teacher", "FINISHED"), ("student", "KILLED"), ("student", "FINISHED")]
    assert runs[2].data.tags["teacher_run_id"] == teacher.info.run_id
    assert runs[2].data.tags["output_dir"] == str(job.run_dir.resolve())


def sweep(store: Path, folder: Path, *overrides: str):
    """`python train.py -m <overrides>` in the sweep folder `folder`, tracked in `store`."""
    return run_command([sys.executable, str(TRAIN_PY), "-m", *FAST, "data=synthetic", "quiet=true", *overrides,
                        f"tracking.uri={tracking_uri(store)}", f"cache.dir={store / 'cache'}",
                        f"hydra.sweep.dir={folder}"], timeout=600, one_thread=True)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_second_sweep_in_a_sweeps_folder_is_refused_and_overwrites_nothing(tmp_path):
    store = new_store(tmp_path / "store")
    client = mlflow_client(store)
    folder = tmp_path / "S"
    first = sweep(store, folder, "seed=1,2")
    assert first.returncode == 0, first.output[-3000:]
    jobs = {name: folder_files(folder / name) for name in ("0", "1")}
    runs = experiment_runs(client)

    second = sweep(store, folder, "seed=3,4", "epochs=2")
    assert second.returncode == 1 and "Traceback" not in second.output, second.output[-3000:]
    (line,) = [line for line in second.output.splitlines() if "error:" in line]
    assert line == (f"error: hydra.sweep.dir={folder} holds another sweep (overrides 'debug=tiny data=synthetic "
                    f"quiet=true seed=1,2 tracking.uri={tracking_uri(store)} cache.dir={store / 'cache'}'); run it "
                    f"again with those overrides to continue it, or give this sweep another hydra.sweep.dir")
    assert {name: folder_files(folder / name) for name in ("0", "1")} == jobs and not (folder / "2").exists()
    assert [(run.info.run_id, run.info.status) for run in experiment_runs(client)] == \
        [(run.info.run_id, run.info.status) for run in runs]  # no run opened, none changed

    again = sweep(store, folder, "seed=1,2")  # the same sweep: continued, each job already done
    assert again.returncode == 0 and again.output.count("already FINISHED in MLflow run") == 2, again.output[-3000:]
    assert len(experiment_runs(client)) == len(runs) == 3
