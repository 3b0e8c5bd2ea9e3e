"""Fault tolerance: resume after a kill, interrupts, divergence, untrusted checkpoint
files, tracking-server and SQLite faults, the determinism switch, and bounded disk use.

Jobs that are stopped with real signals (or need a process of their own: a file-size limit, a
store opened by parallel processes) are real `python train.py` subprocesses (conftest.start_train),
most of them with -m slow; the others run in-process (conftest.train_in_process). Each has an
SQLite MLflow store (a copy of the session's migrated empty store), job folder and teacher-output
cache inside pytest's temporary folder. Jobs are tiny (synthetic data, <= 1024 training images,
<= 4 epochs); those a test compares bit for bit all run single-threaded (OMP_NUM_THREADS=1). Unit
tests call kdresearch.training.checkpoint, .resume, .devices, .tracking and .teacher directly.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    EXPERIMENT,
    FAST,
    REPO_ROOT,
    check_ok,
    describe,
    experiment_runs,
    mlflow_client,
    new_store,
    start_train,
    tracking_uri,
    train_in_process,
)
from omegaconf import OmegaConf
from processes import Process, free_port, wait_until

from kdresearch.errors import KDResearchError
from kdresearch.runtime import devices
from kdresearch.teacher import outputs as teacher_outputs
from kdresearch.training import checkpoint as ckpt
from kdresearch.training import resume

# A job long enough to be killed between epochs 2 and 4, short enough to run often. The
# uninterrupted baseline, the killed jobs and their continuations all use exactly these.
# SGD with a multistep schedule (lr x0.1 after epochs 2 and 3), so a kill lands mid-schedule.
RESUMABLE = ("debug=tiny", "epochs=4", "data.limit_train=1024", "checkpoint.keep_last=2", "optimizer=sgd",
             "optimizer.lr=0.02", "scheduler=multistep", "scheduler.milestones=[2,3]")
TINY = FAST


# --- helpers --------------------------------------------------------------------------------------

def start_job(store: Path, name: str, *overrides: str, preexec_fn=None, fresh: bool = False,
        outlives_test: bool = False) -> Process:
    """One `python train.py ...` subprocess on `store` (job folder `store/<name>`, `.checkpoints`
    its checkpoint folder); `fresh`: on a store that does not exist yet."""
    job = start_train(store, name, *overrides, fresh_store=fresh, preexec_fn=preexec_fn,
                      outlives_test=outlives_test)
    job.checkpoints = job.run_dir / "checkpoints"
    return job


def signal_when(job: Process, done, what: str, signum: int) -> None:
    """Send `signum` as soon as `done()`, while the job is still training."""
    job.wait_until(done, what, timeout=240, poll=0.005)
    job.send_signal(signum)
    assert not (job.checkpoints / "final.pt").exists(), (
        f"the job finished before it could be interrupted; the test needs slower epochs:\n{job.describe()}"
    )


def all_runs(store: Path):
    return experiment_runs(mlflow_client(store))


def only_run(store: Path):
    runs = all_runs(store)
    assert len(runs) == 1, f"expected one MLflow run in {store}, found {[(r.info.run_id, r.info.status) for r in runs]}"
    return runs[0]


def metric_histories(store: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of every metric but the wall-clock epoch_seconds and the budget
    (its times, and the teacher's evaluation pass each attempt makes)."""
    client = mlflow_client(store)
    keys = sorted(client.get_run(run_id).data.metrics)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys if key != "epoch_seconds" and not key.startswith("budget/")
    }


def assert_same_training(store_a: Path, run_a: str, final_a: Path, store_b: Path, run_b: str, final_b: Path):
    """Bit-identical metric histories (but epoch_seconds) and final weights/optimizer state."""
    history_a, history_b = metric_histories(store_a, run_a), metric_histories(store_b, run_b)
    assert history_a.keys() == history_b.keys()
    for key in history_a:
        assert history_a[key] == history_b[key], f"metric {key} differs:\n{history_a[key]}\n{history_b[key]}"
    assert [step for step, _ in history_a["test/acc"]] == [1, 2, 3, 4]
    a, b = ckpt.load_checkpoint(final_a), ckpt.load_checkpoint(final_b)
    assert a["epoch"] == b["epoch"] == 4
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"final weights differ in {name}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            other = b["optimizer"]["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer state {index}/{key}"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


def assert_clean_error(job, *phrases: str) -> str:
    """Non-zero exit, one `error:` line holding `phrases`, and no Python traceback, for a finished
    job: a subprocess or an in-process one."""
    assert job.returncode not in (0, None), describe(job)
    output = job.output
    assert "Traceback" not in output, describe(job)
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, describe(job)
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in the error line:\n{lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The uninterrupted RESUMABLE job as a subprocess (the interrupted ones it is compared with bit
    for bit are subprocesses too), started when the first test asks for it and running while that
    test's own jobs run; each test waits for it when it needs its result."""
    return start_job(tmp_path_factory.mktemp("baseline"), "job", *RESUMABLE, outlives_test=True)


def finished_baseline(baseline: Process):
    """(store, run id, final.pt) of the finished baseline job."""
    baseline.check_ok()
    run = only_run(baseline.store)
    assert run.info.status == "FINISHED"
    return baseline.store, run.info.run_id, baseline.checkpoints / "final.pt"


def sample_state() -> dict:
    return {"format": 1, "epoch": 1, "model": {"w": torch.arange(1000, dtype=torch.float32)},
            "metrics": {"test/acc": 50.0}, "rng": {"python": [3, [1, 2, 3], None]}}


class Evil:
    """Unpickling this runs `touch <marker>`; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- 1. resume --------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_then_resume_from_job_folder_matches_uninterrupted_run(tmp_path, baseline):
    """SIGKILL right after epoch 2's checkpoint; `resume=<job folder>` continues the same MLflow
    run and ends with the metrics and weights of the uninterrupted baseline, bit for bit."""
    store = tmp_path / "store"
    killed = start_job(store, "job", *RESUMABLE)
    epoch_2 = killed.checkpoints / "epoch_0002.pt"  # then MLflow gets epoch 2's metrics: kill in between or after
    signal_when(killed, epoch_2.exists, epoch_2.name, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    run = only_run(store)
    assert run.info.status == "RUNNING"  # nothing can end it on SIGKILL: the continuation does

    resumed = start_job(store, "resumed", *RESUMABLE, f"resume={killed.run_dir}").check_ok()
    assert "resume: continuing MLflow run" in resumed.output
    run_after = only_run(store)
    assert run_after.info.run_id == run.info.run_id
    assert run_after.info.status == "FINISHED"
    # The continuation writes into the original job folder and logs the final checkpoint.
    final = killed.checkpoints / "final.pt"
    assert final.is_file() and not (resumed.run_dir / "checkpoints").exists()
    artifacts = [a.path for a in mlflow_client(store).list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/final.pt"]
    assert sorted(p.name for p in killed.checkpoints.glob("epoch_*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]

    assert_same_training(store, run.info.run_id, final, *finished_baseline(baseline))


def interrupt(store: Path, signum: int, after_epoch: int = 2) -> tuple[Process, object]:
    """Start the RESUMABLE job and send `signum` in the middle of epoch `after_epoch + 1` (once
    epoch `after_epoch` is logged: an interrupt inside an MLflow write is
    test_interrupt_during_mlflow_write_still_ends_run_killed). Checks the Ctrl-C contract: exit
    code 128 + signum (not a death by signal), an 'interrupted' line, MLflow run KILLED, no temp file, the
    newest epoch checkpoint loads. Returns the job and its MLflow run."""
    job = start_job(store, "job", *RESUMABLE)
    line = f"epoch {after_epoch}/4"
    signal_when(job, lambda: line in job.output, f"the line {line!r}", signum)
    code = job.wait()
    assert code == 128 + signum, job.describe()  # the shell's convention: SIGINT 130, SIGTERM 143
    assert "interrupted" in job.output and "Traceback" not in job.output, job.describe()
    run = only_run(store)
    assert run.info.status == "KILLED"
    assert temp_files(job.checkpoints) == []
    state = ckpt.load_checkpoint(sorted(job.checkpoints.glob("epoch_*.pt"))[-1])
    assert state["epoch"] >= after_epoch and state["run_id"] == run.info.run_id
    logged = [step for step, _ in metric_histories(store, run.info.run_id).get("test/acc", [])]
    assert max(logged, default=0) in (state["epoch"] - 1, state["epoch"])  # checkpoint first, then MLflow
    return job, run


@pytest.mark.slow
def test_sigint_ends_run_killed_and_keeps_last_checkpoint(tmp_path):
    """Ctrl-C (SIGINT) mid-training."""
    interrupt(tmp_path / "store", signal.SIGINT)


@pytest.mark.slow
def test_sigterm_ends_run_killed_and_resume_with_other_overrides_is_refused(tmp_path):
    """SIGTERM (a scheduler stopping the job) takes the Ctrl-C path. Continuing the job with other
    settings is refused in one line and leaves the run as it was."""
    store = tmp_path / "store"
    job, _ = interrupt(store, signal.SIGTERM, after_epoch=1)
    other = [o.replace("epochs=4", "epochs=5") for o in RESUMABLE] + ["optimizer.lr=0.01"]
    refused = start_job(store, "refused", *other, f"resume={job.run_dir}")
    refused.wait()
    line = assert_clean_error(refused, "resume:", "epochs: 4 -> 5", "optimizer.lr: 0.02 -> 0.01")
    assert "overrides" in line
    assert only_run(store).info.status == "KILLED"  # untouched by the refused attempt


@pytest.mark.slow
def test_ctrl_c_while_training_the_automatic_teacher_then_resume_the_job_folder(tmp_path):
    """A KD job stopped while it trains its own teacher continues with resume=<its job folder>:
    the teacher's run goes on from its checkpoint, then the student trains with it."""
    store = tmp_path / "store"
    overrides = (*TINY, "loss=kd", "teacher=light", "teacher.epochs=3", "data.limit_train=1024")
    job = start_job(store, "job", *overrides)
    teacher_epoch_1 = job.run_dir / "teacher" / "checkpoints" / "epoch_0001.pt"
    signal_when(job, teacher_epoch_1.exists, teacher_epoch_1.name, signal.SIGINT)
    assert job.wait() == 130, job.describe()
    (teacher,) = all_runs(store)
    assert teacher.info.status == "KILLED" and teacher.data.tags["role"] == "teacher"

    resumed = start_job(store, "resumed", *overrides, f"resume={job.run_dir}").check_ok()
    assert "stopped while training its teacher" in resumed.output
    runs = {run.data.tags["role"]: run for run in all_runs(store)}
    assert set(runs) == {"teacher", "student"} and len(all_runs(store)) == 2
    assert runs["teacher"].info.run_id == teacher.info.run_id and runs["teacher"].info.status == "FINISHED"
    assert [s for s, _ in metric_histories(store, teacher.info.run_id)["test/acc"]] == [1, 2, 3]
    assert runs["student"].info.status == "FINISHED"
    assert runs["student"].data.tags["teacher_run_id"] == teacher.info.run_id
    assert (job.checkpoints / "final.pt").is_file()  # the student went on in the original folder


@pytest.mark.slow
def test_ctrl_c_then_resume_by_run_id_matches_uninterrupted_run(tmp_path, baseline):
    """`resume=<MLflow run id>` after Ctrl-C finishes that same run like the uninterrupted job."""
    store = tmp_path / "store"
    job, run = interrupt(store, signal.SIGINT)
    start_job(store, "resumed", *RESUMABLE, f"resume={run.info.run_id}").check_ok()
    run_after = only_run(store)
    assert run_after.info.run_id == run.info.run_id and run_after.info.status == "FINISHED"
    assert_same_training(store, run.info.run_id, job.checkpoints / "final.pt", *finished_baseline(baseline))


@pytest.mark.slow
def test_interrupt_during_mlflow_write_still_ends_run_killed(tmp_path):
    """Ctrl-C while the job waits for the store (another process holds the SQLite write lock,
    as a busy shared store does) to log epoch 1: the run must still end KILLED."""
    import sqlite3

    store = tmp_path / "store"
    job = start_job(store, "job", *RESUMABLE)
    job.wait_until(lambda: "first_layer_norm at init" in job.output, "the job's first MLflow writes")
    other_writer = sqlite3.connect(store / "mlflow.db", timeout=60, isolation_level=None)
    other_writer.execute("BEGIN EXCLUSIVE")
    try:
        epoch_1 = job.checkpoints / "epoch_0001.pt"
        job.wait_until(epoch_1.exists, epoch_1.name)
        time.sleep(0.5)  # now in log_batch, waiting for the lock
        job.send_signal(signal.SIGINT)
        time.sleep(0.5)
    finally:
        other_writer.execute("ROLLBACK")
        other_writer.close()
    code = job.wait()
    assert only_run(store).info.status == "KILLED", job.describe()
    assert code not in (0, -signal.SIGINT)
    assert "interrupted" in job.output and "Traceback" not in job.output, job.describe()


def test_resume_locate_by_run_id_and_its_errors(tmp_path):
    """resume=<run id> finds the job folder through the run's `output_dir` tag; an unknown id or a
    folder that is not on this machine is one clear line."""
    from kdresearch.tracking.store import Tracker

    store = new_store(tmp_path / "store")
    tracker = Tracker(tracking_uri(store), EXPERIMENT)
    folder = tmp_path / "job"
    here = tracker.start_run("light-ce", {"output_dir": str(folder)}, {})
    ckpt.save_checkpoint({**sample_state(), "run_id": here.run_id}, folder / "checkpoints" / "epoch_0001.pt")
    gone = tracker.start_run("light-ce", {"output_dir": str(tmp_path / "elsewhere")}, {})

    point = resume.locate(here.run_id, tracker)
    assert point.output_dir == folder and point.checkpoint["epoch"] == 1
    with pytest.raises(KDResearchError, match="is not on this machine"):
        resume.locate(gone.run_id, tracker)
    with pytest.raises(KDResearchError, match="neither a job folder nor an MLflow run id"):
        resume.locate("0123456789abcdef0123456789abcdef", tracker)


def test_resume_locate_skips_unloadable_checkpoints(tmp_path):
    """The newest checkpoint is unreadable (crafted or cut short): resume takes the one before,
    without ever running the crafted file's code."""
    folder = tmp_path / "job"
    marker = tmp_path / "pwned"
    good = {**sample_state(), "run_id": "abc", "epoch": 1}
    ckpt.save_checkpoint(good, folder / "checkpoints" / "epoch_0001.pt")
    torch.save({"model": Evil(marker)}, folder / "checkpoints" / "epoch_0002.pt")
    data = (folder / "checkpoints" / "epoch_0001.pt").read_bytes()
    (folder / "checkpoints" / "epoch_0003.pt").write_bytes(data[: len(data) // 2])
    point = resume.locate(str(folder), tracker=None)
    assert point.checkpoint["epoch"] == 1 and point.run_id == "abc" and point.output_dir == folder
    assert not marker.exists()

    for name in ("epoch_0001.pt",):
        (folder / "checkpoints" / name).unlink()
    with pytest.raises(KDResearchError, match="no complete checkpoint"):
        resume.locate(str(folder), tracker=None)
    assert not marker.exists()


def test_check_same_job_compares_the_training_identity():
    """Where and how a job runs may change on resume (tracking, progress bars, device switches,
    the data's path); what it trains may not (kdresearch.identity)."""
    from kdresearch.config.identity import training_identity

    config = {"seed": 42, "epochs": 4, "quiet": False, "resume": None, "optimizer.lr": 0.001,
              "data.root": "data", "device.channels_last": True, "tracking.uri": "sqlite:///a.db"}
    saved = {"identity": training_identity(config, "fingerprint", with_teacher=False)}
    moved = {**config, "quiet": True, "resume": "/some/folder", "data.root": "/elsewhere",
             "device.channels_last": False, "tracking.uri": "sqlite:///b.db"}
    resume.check_same_job(saved, training_identity(moved, "fingerprint", with_teacher=False))
    with pytest.raises(KDResearchError, match=r"optimizer\.lr: 0\.001 -> 0\.01"):
        resume.check_same_job(saved, training_identity({**config, "optimizer.lr": 0.01}, "fingerprint", False))
    with pytest.raises(KDResearchError, match=r"data\.fingerprint: 'fingerprint' -> 'other data'"):
        resume.check_same_job(saved, training_identity(config, "other data", with_teacher=False))


# --- 1. atomic checkpoints --------------------------------------------------------------------

@pytest.fixture
def previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "epoch_0001.pt"
    ckpt.save_checkpoint(sample_state(), path)
    return path


def assert_previous_intact(path: Path) -> None:
    state = ckpt.load_checkpoint(path)
    assert torch.equal(state["model"]["w"], sample_state()["model"]["w"])
    assert temp_files(path.parent) == [], "a temp file was left behind"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_save_interrupted_mid_write_keeps_previous_checkpoint(previous_checkpoint, monkeypatch, failure):
    real_save = torch.save

    def partial_save(obj, stream, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        stream.write(buffer.getvalue()[:1000])  # some bytes reach the file, then the crash
        raise failure

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(type(failure)):
        ckpt.save_checkpoint({**sample_state(), "epoch": 2, "model": {"w": torch.zeros(5)}}, previous_checkpoint)
    monkeypatch.undo()
    assert_previous_intact(previous_checkpoint)


def test_save_with_failing_rename_is_a_clear_error(previous_checkpoint, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "replace", full_disk)
    with pytest.raises(KDResearchError, match=r"could not write checkpoint .*epoch_0001\.pt: No space left on device"):
        ckpt.save_checkpoint({**sample_state(), "epoch": 2}, previous_checkpoint)
    monkeypatch.undo()
    assert_previous_intact(previous_checkpoint)


def test_save_replaces_atomically(previous_checkpoint):
    new = {**sample_state(), "epoch": 2, "model": {"w": torch.ones(3)}}
    ckpt.save_checkpoint(new, previous_checkpoint)
    assert ckpt.load_checkpoint(previous_checkpoint)["epoch"] == 2
    assert temp_files(previous_checkpoint.parent) == []


# --- 7. disk: failing writes ------------------------------------------------------------------

def test_save_with_disk_full_during_write_is_a_clear_error(previous_checkpoint, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def fdopen(fd, mode="r", *args, **kwargs):
        return FullDisk(fd, "wb") if "w" in mode else real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    try:
        with pytest.raises(KDResearchError, match=r"could not write checkpoint .*No space left on device"):
            ckpt.save_checkpoint({**sample_state(), "model": {"w": torch.zeros(10_000)}}, previous_checkpoint)
    finally:
        monkeypatch.undo()
        assert_previous_intact(previous_checkpoint)


@pytest.mark.parametrize("blocked", ["parent-is-a-file", "permission-denied"])
def test_save_into_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch, blocked):
    if blocked == "parent-is-a-file":
        (tmp_path / "checkpoints").write_text("not a folder")
    else:
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    with pytest.raises(KDResearchError, match="could not write checkpoint"):
        ckpt.save_checkpoint(sample_state(), tmp_path / "checkpoints" / "epoch_0001.pt")


def _file_size_limit():  # runs in the child before exec: writes beyond 2 MB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_train_with_failing_checkpoint_write_reports_it(tmp_path):
    """End to end: the checkpoint (3.2 MB) cannot be written; the job says so in one line, the
    MLflow run ends FAILED and no temp file stays."""
    store = tmp_path / "store"
    job = start_job(store, "job", *TINY, preexec_fn=_file_size_limit)
    job.wait()
    assert only_run(store).info.status == "FAILED"
    assert temp_files(job.checkpoints) == []
    assert_clean_error(job, "could not write checkpoint", "epoch_0001.pt")


# --- 2/3. divergence --------------------------------------------------------------------------

def test_divergence_stops_with_epoch_and_step_and_run_failed(tmp_path):
    """optimizer=sgd optimizer.lr=1e30: the first step is finite, the second one is not."""
    job = train_in_process(tmp_path, *TINY, "optimizer=sgd", "optimizer.lr=1e30")
    line = assert_clean_error(job, "training diverged", "epoch 1, step 2")
    assert "nan" in line or "inf" in line
    assert only_run(tmp_path).info.status == "FAILED"
    checkpoints = job.run_dir / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.glob("*.pt"))


# --- 4. untrusted files -----------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["torch.save", "pickle", "pickle-protocol-0"])
def test_load_checkpoint_refuses_code_carrying_pickle(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as stream:
            pickle.dump(payload, stream, protocol=0 if writer.endswith("0") else pickle.HIGHEST_PROTOCOL)
    with pytest.raises(KDResearchError, match=r"evil\.pt") as refused:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    if writer == "torch.save":  # a plain pickle may also be refused as "not a torch checkpoint"
        assert "refusing to load" in str(refused.value) and "could run code" in str(refused.value)


def test_refusal_message_names_the_blocked_call_and_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(tmp_path / "pwned")}, path)
    with pytest.raises(KDResearchError) as refused:
        ckpt.load_checkpoint(path)
    message = str(refused.value)
    assert "system" in message
    assert "weights_only" not in message or "will likely succeed" not in message


def real_checkpoint(tmp_path: Path) -> Path:
    from kdresearch.models import LightNN

    model = LightNN()
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / "real.pt"
    ckpt.save_checkpoint({"format": 1, "model_class": "LightNN", "epoch": 1, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "metrics": {"test/acc": 10.0}}, path)
    return path


def test_load_checkpoint_truncated_files_are_clear_errors(tmp_path):
    data = real_checkpoint(tmp_path).read_bytes()
    cut = tmp_path / "cut.pt"
    for length in (0, 4, 100, 1000, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        cut.write_bytes(data[:length])
        with pytest.raises(KDResearchError, match=r"cut\.pt is truncated or corrupt"):
            ckpt.load_checkpoint(cut)


def test_load_checkpoint_other_clear_errors(tmp_path):
    with pytest.raises(KDResearchError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(KDResearchError, match="holds a list, not a dict"):
        ckpt.load_checkpoint(tmp_path / "list.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "bare.pt")  # a bare state_dict is fine
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "bare.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("content", ["text", "random-bytes", "first-3-bytes"])
def test_load_checkpoint_garbage_is_truncated_or_corrupt(tmp_path, content):
    path = tmp_path / "garbage.pt"
    if content == "text":
        path.write_bytes(b"hello world\n")
    elif content == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(1000))
    else:  # a checkpoint cut after 1-3 bytes ("PK\x03") is read as a legacy pickle
        path.write_bytes(real_checkpoint(tmp_path).read_bytes()[:3])
    with pytest.raises(KDResearchError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_load_checkpoint_detects_damaged_tensor_bytes(tmp_path):
    path = real_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored weights
    path.write_bytes(bytes(data))
    with pytest.raises(KDResearchError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_train_refuses_crafted_teacher_checkpoint(tmp_path):
    """teacher.checkpoint= a pickle whose loading would run `touch <marker>`."""
    evil, marker = tmp_path / "teacher.pt", tmp_path / "pwned"
    torch.save({"format": 1, "model_class": "LightNN", "model": Evil(marker)}, evil)
    store = tmp_path / "store"
    job = train_in_process(store, *TINY, "loss=kd", "teacher=light", f"teacher.checkpoint={evil}")
    assert_clean_error(job, "refusing to load", str(evil), "could run code")
    assert not marker.exists()
    assert all_runs(store) == []  # refused before any run was started


def test_cifar10_files_cannot_run_code(tmp_path):
    import numpy as np

    from kdresearch.data.cifar import CIFAR10_FOLDER, load_cifar10

    marker = tmp_path / "pwned"
    folder = tmp_path / CIFAR10_FOLDER
    folder.mkdir()
    batch = {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 1]}
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "data_batch_1").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(Exception) as refused:
        load_cifar10(str(tmp_path), download=False, verify=False)
    assert not marker.exists(), "unpickling a data file ran its code"
    assert isinstance(refused.value, KDResearchError)


def test_train_reports_truncated_teacher_checkpoint(tmp_path):
    data = real_checkpoint(tmp_path).read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    job = train_in_process(tmp_path / "store", *TINY, "loss=kd", "teacher=light", f"teacher.checkpoint={half}")
    assert_clean_error(job, str(half), "truncated or corrupt")


# --- 5. tracking faults -----------------------------------------------------------------------

def test_unreachable_tracking_server_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    job = train_in_process(tmp_path / "store", *TINY, f"tracking.uri={uri}")
    assert_clean_error(job, f"MLflow tracking server {uri} is unreachable")
    assert job.seconds < 30, f"took {job.seconds:.1f} s"


@pytest.mark.slow
def test_silent_tracking_server_times_out(tmp_path):
    """A server that accepts the connection and never answers: bounded by the health check's
    timeout (tracking._check_server) plus the job's start-up."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        job = start_job(tmp_path / "store", "job", *TINY, f"tracking.uri={uri}")
        job.wait(timeout=120)
    assert_clean_error(job, f"MLflow tracking server {uri} is unreachable", "timed out")
    assert job.seconds < 60, f"took {job.seconds:.1f} s"


@pytest.mark.slow
def test_parallel_jobs_on_fresh_sqlite_store_all_land(tmp_path):
    """Three jobs started at once on a store that does not exist yet all land FINISHED. (Whether
    they collide depends on timing; test_tracker_opens_fresh_store_from_parallel_processes lines
    them up on purpose.)"""
    store = tmp_path / "store"
    jobs = [start_job(store, f"job{i}", *TINY, f"seed={i}", fresh=True) for i in range(3)]
    for job in jobs:
        job.wait()
    failed = [job.describe() for job in jobs if job.returncode != 0]
    assert not failed, "\n\n".join(failed)
    runs = all_runs(store)
    assert sorted(run.data.params["seed"] for run in runs) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" for run in runs)


_OPEN_STORE = """
import sys, time
from pathlib import Path
from kdresearch.tracking.store import Tracker
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
Tracker(sys.argv[1], "kdresearch")
"""


@pytest.mark.slow  # three processes, each importing MLflow
def test_tracker_opens_fresh_store_from_parallel_processes(tmp_path):
    """Three processes open one fresh store at the same instant (before the store lock covered
    MlflowClient(), which migrates a new schema, 2-3 of 3 failed here: 'table _alembic_tmp_tags
    already exists', 'Online migration expected to match one row')."""
    uri = tracking_uri(tmp_path)
    procs = [Process([sys.executable, "-c", _OPEN_STORE, uri, str(tmp_path), str(i)], tmp_path / f"open-{i}.log",
                     one_thread=True) for i in range(3)]
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 3, "three processes ready", timeout=120, poll=0.01)
    (tmp_path / "go").touch()
    failed = [proc.describe() for proc in procs if proc.wait(timeout=120) != 0]
    assert not failed, "\n\n".join(failed)


# --- 6. determinism switch --------------------------------------------------------------------

def test_deterministic_run_is_recorded(tmp_path):
    check_ok(train_in_process(tmp_path, *TINY, "device.deterministic=true"))
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["device.deterministic"] == "True"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_cuda_runs_repeat_bit_identically(tmp_path):
    """On CUDA, device.deterministic=true makes two runs of one job equal, bit for bit."""
    overrides = ("device=cuda", "device.deterministic=true", "epochs=2", "data.limit_train=1024",
                 "data.limit_test=128")
    jobs = [start_job(tmp_path / f"store{i}", "job", *overrides) for i in range(2)]
    for job in jobs:
        job.check_ok()
    (a, b) = [(job.store, only_run(job.store).info.run_id, job.checkpoints / "final.pt") for job in jobs]
    assert metric_histories(a[0], a[1]) == metric_histories(b[0], b[1])
    weights_a, weights_b = ckpt.load_checkpoint(a[2])["model"], ckpt.load_checkpoint(b[2])["model"]
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_set_deterministic_switches_torch_and_cuda_settings(restore_determinism):
    devices.set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    devices.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


# --- 7. disk: bounded checkpoints and caches --------------------------------------------------

def test_keep_last_default_is_documented_and_applied(tmp_path):
    """The 4-epoch job with checkpoint.keep_last=2 keeps epochs 3 and 4 plus final.pt."""
    assert OmegaConf.load(REPO_ROOT / "conf" / "config.yaml").checkpoint.keep_last == 2
    job = check_ok(train_in_process(tmp_path / "store", *RESUMABLE))
    assert sorted(p.name for p in (job.run_dir / "checkpoints").iterdir()) == [
        "epoch_0003.pt", "epoch_0004.pt", "final.pt"]

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in range(1, 6):
        (folder / f"epoch_{epoch:04d}.pt").write_bytes(b"x")
    ckpt.keep_last(folder, "epoch_*.pt", 3)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0003.pt", "epoch_0004.pt", "epoch_0005.pt"]
    ckpt.keep_last(folder, "epoch_*.pt", None)  # null / 0: keep everything
    ckpt.keep_last(folder, "epoch_*.pt", 0)
    assert len(list(folder.iterdir())) == 3


def test_teacher_cache_size_limit_removes_least_recently_used(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    now = time.time()
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = folder / f"{name}.pt"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - 100 * age, now - 100 * age))
    teacher_outputs._enforce_size_limit(folder, max_bytes=2500)
    assert sorted(p.name for p in folder.iterdir()) == ["middle.pt", "newest.pt"]
    teacher_outputs._enforce_size_limit(folder, max_bytes=10)  # never the entry just written
    assert sorted(p.name for p in folder.iterdir()) == ["newest.pt"]


def test_teacher_cache_size_limit_removes_stale_temp_files(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    entry = folder / "abc-logits.pt"
    entry.write_bytes(b"x" * 1000)
    stale = folder / ".def-logits.pt.k2j3h4.tmp"  # what save_checkpoint leaves on SIGKILL
    stale.write_bytes(b"x" * 5000)
    day_ago = time.time() - 86400
    os.utime(stale, (day_ago, day_ago))
    teacher_outputs._enforce_size_limit(folder, max_bytes=2000)
    assert entry.exists() and not stale.exists()


def test_readme_documents_resume_and_keep_last():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "resume=" in readme
    assert re.search(r"checkpoint\.keep_last`?\s*[(=]\s*2", readme), "keep_last and its default 2"


def test_teacher_cache_goes_to_cache_dir(tmp_path):
    """loss=kd with teacher=light: the teacher is trained first, its outputs cached in cache.dir."""
    store = tmp_path / "store"
    check_ok(train_in_process(store, *TINY, "loss=kd", "teacher=light"))
    cached = list((store / "cache").glob("*.pt"))
    assert len(cached) == 1, list((store / "cache").iterdir())
    student = [run for run in all_runs(store) if run.data.tags.get("role") == "student"]
    assert student and student[0].data.tags.get("teacher_cache") == "used"
