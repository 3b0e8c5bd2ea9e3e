"""The training jobs of a pipeline: planned as command lines, each run as its own
`python -m kdresearch.train` process, its MLflow runs found afterwards by the job folder.

A job's runs are read back from the store, not from its output: every training run carries the
tag `output_dir` (its job folder, absolute), so the runs of a job are those tagged with its folder
(its own) or with the folder's `teacher/` (an automatic teacher it trained), that ended after the
job started (a run of an earlier job in the same folder ended before).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from kdresearch.errors import KDResearchError
from kdresearch.layout import JobFolder, train_command
from kdresearch.runtime.processes import run_to_end
from kdresearch.tracking import names
from kdresearch.tracking.run import TrackedRun
from kdresearch.tracking.store import Tracker


@dataclass
class PlannedJob:
    label: str
    seed: Optional[int]
    folder: str  # its job folder (hydra.run.dir), relative to the folder the pipeline runs in
    overrides: list[str]  # its Hydra overrides, hydra.run.dir=<folder> among them
    run_ids: list[str] = field(default_factory=list)  # filled when it ran; the job's own run is last

    @property
    def title(self) -> str:
        return self.label + ("" if self.seed is None else f" (seed {self.seed})")

    @property
    def command(self) -> list[str]:
        return [*train_command(), *self.overrides]

    @property
    def shell_line(self) -> str:
        """The command as a user would type it."""
        return shlex.join(["python", *self.command[1:]])


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last `key=value` override gives (Hydra's rule), None for none or null."""
    value = None
    for item in overrides:
        name, sep, text = item.lstrip("+").partition("=")
        if sep and name == key:
            value = text.strip().strip("'\"")
    return None if value in (None, "", "null", "None") else value


def tracker_for(overrides: Sequence[str]) -> Tracker:
    """The MLflow store and experiment the jobs given `overrides` record to."""
    return Tracker(override_value(overrides, "tracking.uri"),
                   override_value(overrides, "tracking.experiment") or "kdresearch")


def runs_of_job_folder(tracker: Tracker, folder: Path, ended_since_ms: int) -> list[str]:
    """Run ids of the runs a job in `folder` ran that ended at or after `ended_since_ms` (or are
    still running): its automatic teacher's first, then its own, each oldest first."""
    found = []
    for path in (JobFolder(folder).teacher.path, Path(folder)):
        runs = tracker.find_runs(names.tag_equals(names.OUTPUT_DIR, str(path.resolve())), max_results=1000)
        found += [run.info.run_id for run in sorted(runs, key=lambda run: run.info.start_time)
                  if run.info.end_time is None or run.info.end_time >= ended_since_ms]
    return found


def run_job_process(job: PlannedJob, index: int, total: int, tracker: Tracker) -> list[str]:
    """Run one planned job as its own process (its output goes to ours); returns the ids of the
    MLflow runs it ran, its own last, and records them in `job.run_ids`."""
    print(f"\n=== [{index}/{total}] {job.title}: {job.shell_line}", flush=True)
    started_ms = int(time.time() * 1000)
    code = run_to_end(job.command)
    if code != 0:
        raise KDResearchError(f"job {job.title} failed (exit code {code}); command: {shlex.join(job.command)}")
    job.run_ids = runs_of_job_folder(tracker, Path(job.folder), started_ms)
    if not job.run_ids:
        raise KDResearchError(f"job {job.title} left no MLflow run tagged output_dir={Path(job.folder).resolve()} "
                              f"in {tracker.uri}, experiment {tracker.experiment_name}")
    return job.run_ids


def run_jobs(jobs: Sequence[PlannedJob], tracker: Tracker, group: str) -> list[str]:
    """Run `jobs` in order and tag every run they ran `sweep=<group>`, so that
    `scripts/compare.py --sweep <group>` selects them; returns those run ids in order."""
    ran: list[str] = []
    for index, job in enumerate(jobs, start=1):
        for run_id in run_job_process(job, index, len(jobs), tracker):
            TrackedRun(tracker, run_id).set_tags({names.SWEEP: group})
            ran.append(run_id)
    return ran
