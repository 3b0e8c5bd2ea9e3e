"""Continuing an interrupted job: find its newest complete checkpoint and check it is the same job.

`resume=` takes the job's Hydra run folder (outputs/<date>/<time>) or its MLflow run id; the run
records its folder in the tag `output_dir`. Checkpoints are written atomically, so the newest
file is complete unless the disk itself failed; an unreadable one is skipped for the one before.
The run the checkpoint names must be in the tracking store and not deleted: continuing reopens it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kdresearch.config.identity import differences
from kdresearch.errors import KDResearchError
from kdresearch.layout import JobFolder
from kdresearch.training.weights import newest_epoch_checkpoint

log = logging.getLogger(__name__)

# Keys that may differ between the interrupted job and its continuation.
FREE_KEYS = ("resume", "quiet")


@dataclass
class ResumePoint:
    checkpoint: dict
    run_id: str
    output_dir: Path  # the original job folder: checkpoints keep going there


def locate(spec: str, tracker) -> ResumePoint:
    """The newest complete checkpoint of the job `spec` names; `tracker` (None on data-parallel
    ranks other than 0) checks the MLflow run it continues."""
    folder = Path(spec).expanduser()
    checked_run = None
    if not folder.is_dir():
        folder = _folder_of_run(spec, tracker)
        checked_run = spec
    found = newest_epoch_checkpoint(JobFolder(folder))
    if found is None:
        raise KDResearchError(
            f"resume={spec}: no complete checkpoint in {folder / 'checkpoints'} (the job ended before its "
            f"first epoch finished); start it again without resume"
        )
    path, checkpoint = found
    if tracker is not None and checkpoint["run_id"] != checked_run:
        if _stored_run(spec, checkpoint["run_id"], tracker) is None:
            raise KDResearchError(
                f"resume={spec}: the job's MLflow run {checkpoint['run_id']} is not in {tracker.uri}; "
                f"give the tracking.uri the job was tracked in"
            )
    log.info("resume: continuing MLflow run %s from %s (epoch %d done)",
             checkpoint["run_id"], path, checkpoint["epoch"])
    return ResumePoint(checkpoint, checkpoint["run_id"], folder)


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
    folder = run.data.tags.get("output_dir")
    if not folder or not Path(folder).is_dir():
        raise KDResearchError(f"resume={run_id}: the run's job folder {folder!r} is not on this machine")
    return Path(folder)


def check_same_job(checkpoint: dict, identity: dict) -> None:
    """Refuse to continue a run with other training settings (kdresearch.identity): its metrics
    would mix two experiments. Where or how it runs (tracking, device switches, paths) may change."""
    before = checkpoint.get("identity", {})
    differing = differences(before, identity)
    if differing:
        shown = ", ".join(f"{key}: {before.get(key)!r} -> {identity.get(key)!r}" for key in differing[:5])
        raise KDResearchError(f"resume: give the interrupted job's overrides again; these differ: {shown}")
