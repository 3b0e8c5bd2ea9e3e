"""Reproduce the PyTorch knowledge-distillation tutorial: its five runs as training jobs, then their
comparison table (kdresearch.reports.compare).

Per seed: the teacher first (`model=deep`), then the students `loss=ce`, `loss=kd T=2`,
`loss=cosine`, `loss=regressor`. The tutorial's other hyperparameters are conf/config.yaml's
defaults (Adam lr 1e-3, 10 epochs, batch 128, weights 0.75/0.25, seed 42). The students find the
teacher through the automatic teacher reuse (same training config hash), so it is trained once
per seed. Extra Hydra overrides go to every job, after the job's own, so they win.

Each job runs as its own process (kdresearch.pipelines.jobs); its runs are read back from MLflow
by its job folder, compared by id, and tagged afterwards with `sweep=<the reproduction's folder>`
so that `scripts/compare.py --sweep <folder>` selects exactly this reproduction again. They are
the child runs of one parent run (kdresearch.sweeps.parent_runs, role=reproduction) that holds
the comparison.
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from kdresearch.errors import KDResearchError
from kdresearch.pipelines.jobs import PlannedJob, override_value, run_jobs, tracker_for
from kdresearch.reports.compare import Comparison, compare
from kdresearch.sweeps.parent_runs import (
    GroupSummary,
    close_parent,
    ended_on_error,
    open_parent,
    override_params,
)
from kdresearch.tracking import names


@dataclass(frozen=True)
class TutorialJob:
    label: str
    overrides: tuple[str, ...]


TUTORIAL_JOBS = (
    TutorialJob("teacher", ("model=deep",)),
    TutorialJob("student-ce", ("loss=ce",)),
    TutorialJob("student-kd", ("loss=kd", "T=2")),
    TutorialJob("student-cosine", ("loss=cosine",)),
    TutorialJob("student-regressor", ("loss=regressor",)),
)
# The tutorial trains its teacher with the students' own settings: the automatic teacher's recipe
# (teacher.*, fixed values by default so that student sweeps share one teacher) follows every
# override given to the reproduction, so the students find the reproduction's teacher run.
TUTORIAL_TEACHER_RECIPE = ("teacher.epochs=${epochs}", "teacher.batch_size=${batch_size}",
                           "teacher.optimizer=${optimizer}", "teacher.scheduler=${scheduler}",
                           "teacher.augment=${data.augment}")


def plan(overrides: Sequence[str], seeds: Sequence[int] = (), group: str = "outputs/reproduce",
         reuse_teacher: bool = False) -> list[PlannedJob]:
    """The jobs of one reproduction, in order. `seeds` empty: the config's seed."""
    if seeds and override_value(overrides, "seed") is not None:
        raise KDResearchError("give the seeds either as seeds/--seeds or as seed=..., not both")
    extra = list(overrides)
    if not any(item.partition("=")[0] == "quiet" for item in overrides):
        extra.insert(0, "quiet=true")  # no progress bars in the captured job output
    jobs = []
    for seed in seeds or [None]:
        for job in TUTORIAL_JOBS:
            if reuse_teacher and job.label == "teacher":
                continue
            folder = f"{group}/{job.label}" + ("" if seed is None else f"-seed{seed}")
            job_overrides = [*job.overrides, *([] if seed is None else [f"seed={seed}"]), f"hydra.run.dir={folder}",
                             *TUTORIAL_TEACHER_RECIPE, *extra]
            jobs.append(PlannedJob(job.label, seed, folder, job_overrides))
    return jobs


@dataclass
class Reproduction:
    group: str
    jobs: list[PlannedJob]
    run_ids: list[str]
    comparison: Optional[Comparison]
    warnings: list[str]
    compare_command: str = ""  # selects this reproduction's runs again


def reproduce(overrides: Sequence[str], seeds: Sequence[int] = (), out: Optional[Path] = None,
              reuse_teacher: bool = False, log_summary: bool = True, dry_run: bool = False) -> Reproduction:
    """Run the tutorial's jobs as children of one parent run (none with `log_summary=False`), tag
    their runs `sweep=<group>` and compare them; the parent holds the comparison."""
    stamp = f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    group = str(out) if out is not None else f"outputs/reproduce/{stamp}"
    jobs = plan(overrides, seeds, group, reuse_teacher)
    if dry_run:
        for job in jobs:
            print(job.shell_line)
        return Reproduction(group, jobs, [], None, [])

    tracker = tracker_for(overrides)
    parent = None
    if log_summary:
        parent = open_parent(tracker, Path(group), f"reproduce-{stamp}",
                             {names.ROLE: names.REPRODUCTION_ROLE, names.SWEEP_DIR: group,
                              names.OVERRIDES: " ".join(overrides)},
                             {**override_params(overrides), "seeds": " ".join(map(str, seeds))})
    with ended_on_error(tracker, parent):
        compared = run_jobs(jobs, tracker, group)
        warnings = []
        by_seed: dict[Optional[int], str] = {job.seed: job.run_ids[-1] for job in jobs if job.label == "teacher"}
        for job in jobs:
            if job.label == "teacher" or job.label == "student-ce":
                continue
            used = tracker.client.get_run(job.run_ids[-1]).data.tags.get(names.TEACHER_RUN_ID)
            expected = by_seed.get(job.seed)
            if expected is None and used:
                by_seed[job.seed] = expected = used  # --reuse-teacher: the teacher the students found
                if used not in compared:
                    compared.insert(0, used)
            if used != expected:
                warnings.append(f"{job.title} used teacher run {used}, not this reproduction's {expected}")

        comparison = compare(tracker, [tracker.client.get_run(run_id) for run_id in compared],
                             Path(group) / "comparison", name=f"comparison-reproduce-{stamp}", log_summary=False)
    if parent:
        close_parent(tracker, parent, Path(group), comparison.name, summary=GroupSummary.of_comparison(comparison))
        comparison.summary_run_id = parent
    again = ["python", "scripts/compare.py", "--sweep", group]
    if override_value(overrides, "tracking.uri"):
        again += ["--tracking-uri", tracker.uri]
    if override_value(overrides, "tracking.experiment"):
        again += ["--experiment", override_value(overrides, "tracking.experiment")]
    return Reproduction(group, jobs, compared, comparison, warnings, shlex.join(again))
