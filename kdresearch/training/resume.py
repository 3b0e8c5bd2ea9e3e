"""Where a job starts: afresh, from its newest complete checkpoint, again from epoch 1, or not at all.

A job continues an earlier attempt in two ways. `resume=` names the job's folder (Hydra's run
folder, outputs/<date>/<time>) or its MLflow run id; the run records its folder in the tag
`output_dir`. A sweep run again in its folder (`hydra.sweep.dir=<old folder>`) finds each
configuration's earlier run among its parent run's children (tag `config_hash`). A job that
torchrun restarted (--max-restarts: a rank failed) continues in its own folder, as with
`resume=<its folder>`, without a person; afresh when the failed start left nothing there. Then:

- the run FINISHED: nothing is trained and the run is not reopened (its metrics are complete;
  training again from an older checkpoint, when the newest is damaged, would log epochs twice);
- the job left a complete checkpoint: the run that checkpoint names is reopened and continues
  from it, bit for bit. Checkpoints are written atomically, so the newest file is complete unless
  the disk itself failed; an unreadable one is skipped for the one before. The run must be in the
  tracking store and not deleted;
- it left none (it stopped in its first epoch, or every checkpoint is damaged): a run that a
  SIGKILL left RUNNING is marked KILLED, and the job trains again from epoch 1 as a new MLflow run
  in the same folder. A KD job stopped while it trained its automatic teacher (only the folder's
  `teacher/` shows it) goes on the same way: its teacher's job continues, then the student trains.

What the job trains (its training identity, kdresearch.config.identity) must not change.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kdresearch.config.identity import differences, identity_hash
from kdresearch.errors import KDResearchError
from kdresearch.layout import JobFolder
from kdresearch.runtime import distributed
from kdresearch.tracking.names import CONFIG_HASH, OUTPUT_DIR, PARENT_RUN_ID, tag_equals
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.result import JobResult
from kdresearch.training.weights import newest_epoch_checkpoint

log = logging.getLogger(__name__)

# Keys that may differ between the interrupted job and its continuation.
FREE_KEYS = ("resume", "quiet")
FINISHED, RUNNING, KILLED = "FINISHED", "RUNNING", "KILLED"


@dataclass
class ResumePoint:
    checkpoint: dict
    run_id: str
    output_dir: Path  # the original job folder: checkpoints keep going there
    path: Path  # the checkpoint file

    def history(self) -> dict[int, dict]:
        """{epoch: metrics} of every epoch the checkpoint has seen (only its own epoch for
        checkpoints written before histories were kept)."""
        history = self.checkpoint.get("history") or {str(self.checkpoint["epoch"]): self.checkpoint["metrics"]}
        return {int(step): dict(values) for step, values in history.items()}


@dataclass
class JobStart:
    """Where a job trains and from what: from `point`, else from epoch 1; nothing at all when
    `finished_run_id` names the run that already did the job."""

    output_dir: Path
    point: Optional[ResumePoint] = None
    finished_run_id: Optional[str] = None


class NoCompleteCheckpoint(KDResearchError):
    """The job folder holds no checkpoint that loads (then `job_start` decides what to do)."""

    def __init__(self, spec: str, folder: Path):
        super().__init__(f"resume={spec}: no complete checkpoint in {JobFolder(folder).checkpoints}")
        self.folder = folder


# --- the decision, made by rank 0 -----------------------------------------------------------------

def job_start(resume_spec: Optional[str], output_dir: Path, identity: dict, tracker, world,
              sweep_parent_run_id: Optional[str] = None) -> JobStart:
    """Where this job trains and from what (the module docstring): `resume_spec` is `resume=`'s
    value, `sweep_parent_run_id` the parent run of the sweep the job belongs to. Rank 0, which alone
    talks to MLflow, decides; the other ranks follow and read the same checkpoint file."""
    if not world.is_main:
        decided = distributed.broadcast_object(world)
        if isinstance(decided, KDResearchError):
            raise decided
        if decided.point is not None:
            decided.point.checkpoint = load_checkpoint(decided.point.path)
        return decided
    try:
        if resume_spec:
            decided = _resumed(str(resume_spec), identity, tracker)
        elif sweep_parent_run_id:
            decided = _continued_in_sweep(output_dir, sweep_parent_run_id, identity, tracker)
        elif world.restart:
            decided = _restarted(output_dir, identity, tracker, world.restart)
        else:
            decided = JobStart(output_dir)
    except KDResearchError as error:
        distributed.broadcast_object(world, error)
        raise
    # The other ranks read the checkpoint file themselves rather than receive it pickled.
    distributed.broadcast_object(world, decided if decided.point is None else dataclasses.replace(
        decided, point=dataclasses.replace(decided.point, checkpoint=None)))
    return decided


def finished_result(tracker, run_id: Optional[str]) -> JobResult:
    """The result of the job's FINISHED run, read from MLflow (what a sweeper optimises);
    `tracker` None: a data-parallel rank other than 0."""
    if tracker is None:
        return JobResult.untracked()
    run = tracker.client.get_run(run_id)
    return JobResult.of(run_id, run.data.metrics, JobFolder(run.data.tags.get(OUTPUT_DIR, "")).final_checkpoint)


def _resumed(spec: str, identity: dict, tracker) -> JobStart:
    try:
        point = locate(spec, tracker)
    except NoCompleteCheckpoint as missing:
        return _started_again(spec, missing, identity, tracker)
    return _from_checkpoint(point, identity, tracker)


def _restarted(output_dir: Path, identity: dict, tracker, restart: int) -> JobStart:
    """torchrun started the job's processes again: continue the job in its folder like
    `resume=<folder>`; afresh when the failed start stopped before it trained or tracked anything."""
    folder = JobFolder(output_dir)
    if not (job_started(folder, tracker) or job_started(folder.teacher, tracker)):
        log.info("torchrun restart %d: the job had not started in %s; starting it", restart, folder.path)
        return JobStart(output_dir)
    log.info("torchrun restart %d: continuing the job in %s", restart, folder.path)
    return _resumed(str(folder.path), identity, tracker)


def _continued_in_sweep(output_dir: Path, parent_run_id: str, identity: dict, tracker) -> JobStart:
    """A sweep run again in its folder does each configuration once: its latest run in the sweep
    FINISHED -> nothing to train; it left a checkpoint -> continue it; else train it again."""
    runs = tracker.find_runs(f"{tag_equals(PARENT_RUN_ID, parent_run_id)} and "
                             f"{tag_equals(CONFIG_HASH, identity_hash(identity))}")
    if not runs:
        return JobStart(output_dir)
    earlier = runs[0]
    run_id, status, name = earlier.info.run_id, earlier.info.status, earlier.info.run_name
    if status == FINISHED:
        log.info("sweep: %s already FINISHED in MLflow run %s; not trained again", name, run_id)
        return JobStart(output_dir, finished_run_id=run_id)
    folder = earlier.data.tags.get(OUTPUT_DIR)
    if folder and JobFolder(folder).has_epoch_checkpoint():
        try:
            return _from_checkpoint(locate(folder, tracker), identity, tracker)
        except NoCompleteCheckpoint:
            pass  # every checkpoint damaged: as if it had left none
    _mark_killed(tracker, [earlier])
    log.info("sweep: %s's earlier run %s (%s) left no checkpoint; training it again", name, run_id, status)
    return JobStart(output_dir)


def _from_checkpoint(point: ResumePoint, identity: dict, tracker) -> JobStart:
    check_same_job(point.checkpoint, identity)
    if tracker.client.get_run(point.run_id).info.status == FINISHED:
        return _finished(point.run_id, point.output_dir)
    log.info("resume: continuing MLflow run %s from %s (epoch %d done)", point.run_id, point.path,
             point.checkpoint["epoch"])
    return JobStart(point.output_dir, point)


def _started_again(spec: str, missing: NoCompleteCheckpoint, identity: dict, tracker) -> JobStart:
    """The folder holds no complete checkpoint: train the job again from epoch 1 in it, when MLflow
    or the folder shows that this job was started there; else refuse."""
    folder = JobFolder(missing.folder)
    runs = runs_in(folder, tracker)
    if runs:
        latest = runs[0]
        if latest.data.tags.get(CONFIG_HASH) != identity_hash(identity):
            raise KDResearchError(
                f"resume={spec}: the job in {folder.path} (MLflow run {latest.info.run_id}) was started with other "
                f"training settings; give the interrupted job's overrides again"
            )
        if latest.info.status == FINISHED:
            return _finished(latest.info.run_id, folder.path)
        killed = _mark_killed(tracker, runs)
        log.info("resume: %s holds no complete checkpoint (the job stopped in its first epoch)%s; training it "
                 "again from epoch 1 as a new MLflow run", folder.path,
                 f"; its MLflow run {', '.join(killed)}, left RUNNING, is marked KILLED" if killed else "")
        return JobStart(folder.path)
    if job_started(folder.teacher, tracker):
        # The student's run starts once its teacher is there: the provider continues that teacher's job.
        log.info("resume: %s was stopped while training its teacher; continuing the teacher, then the student",
                 folder.path)
        return JobStart(folder.path)
    raise KDResearchError(f"{missing}, and no MLflow run in {tracker.uri} trained in {folder.path}; start the job "
                          f"without resume")


def _finished(run_id: str, folder: Path) -> JobStart:
    log.info("resume: MLflow run %s already FINISHED (job folder %s); nothing to train, the run stays as it is",
             run_id, folder)
    return JobStart(folder, finished_run_id=run_id)


def runs_in(folder: JobFolder, tracker) -> list:
    """The MLflow runs of jobs that trained in `folder` (tag output_dir), newest first."""
    return tracker.find_runs(tag_equals(OUTPUT_DIR, str(folder.path.resolve())), max_results=100)


def job_started(folder: JobFolder, tracker) -> bool:
    """Whether a job was started in `folder` before: it holds an epoch checkpoint or MLflow has a run of it."""
    return folder.has_epoch_checkpoint() or bool(runs_in(folder, tracker))


def _mark_killed(tracker, runs) -> list[str]:
    """End the runs a dead process left RUNNING (SIGKILL, a lost node) as KILLED; their ids."""
    killed = [run.info.run_id for run in runs if run.info.status == RUNNING]
    for run_id in killed:
        tracker.client.set_terminated(run_id, status=KILLED)
    return killed


# --- the checkpoint to continue from ---------------------------------------------------------------

def locate(spec: str, tracker) -> ResumePoint:
    """The newest complete checkpoint of the job `spec` names (a job folder or an MLflow run id);
    `tracker` (None in tests of the folder alone) checks the MLflow run it continues.
    NoCompleteCheckpoint when none loads."""
    folder = Path(spec).expanduser()
    checked_run = None
    if not folder.is_dir():
        folder = _folder_of_run(spec, tracker)
        checked_run = spec
    found = newest_epoch_checkpoint(JobFolder(folder))
    if found is None:
        raise NoCompleteCheckpoint(spec, folder)
    path, checkpoint = found
    if tracker is not None and checkpoint["run_id"] != checked_run:
        if _stored_run(spec, checkpoint["run_id"], tracker) is None:
            raise KDResearchError(
                f"resume={spec}: the job's MLflow run {checkpoint['run_id']} is not in {tracker.uri}; "
                f"give the tracking.uri the job was tracked in"
            )
    return ResumePoint(checkpoint, checkpoint["run_id"], folder, path)


def _stored_run(spec: str, run_id: str, tracker):
    """The MLflow run `run_id` in the tracker's store, None when the store has no such run. A
    deleted run (get_run still returns it) cannot be reopened: one line says how to restore it."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted":
        raise KDResearchError(
            f"resume={spec}: MLflow run {run_id} was deleted from {tracker.uri}; restore it "
            f"(MLFLOW_TRACKING_URI={tracker.uri} mlflow runs restore --run-id {run_id}) or start the job "
            f"again without resume"
        )
    return run


def _folder_of_run(run_id: str, tracker) -> Path:
    run = _stored_run(run_id, run_id, tracker)
    if run is None:
        raise KDResearchError(
            f"resume={run_id} is neither a job folder nor an MLflow run id in {tracker.uri}"
        )
    folder = run.data.tags.get(OUTPUT_DIR)
    if not folder or not Path(folder).is_dir():
        raise KDResearchError(f"resume={run_id}: the run's job folder {folder!r} is not on this machine")
    return Path(folder)


def check_same_job(checkpoint: dict, identity: dict) -> None:
    """Refuse to continue a run with other training settings (kdresearch.config.identity): its
    metrics would mix two experiments. Where or how it runs (tracking, device switches, paths) may change."""
    before = checkpoint.get("identity", {})
    differing = differences(before, identity)
    if differing:
        shown = ", ".join(f"{key}: {before.get(key)!r} -> {identity.get(key)!r}" for key in differing[:5])
        raise KDResearchError(f"resume: give the interrupted job's overrides again; these differ: {shown}")
