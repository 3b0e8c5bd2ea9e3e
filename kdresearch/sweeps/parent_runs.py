"""A sweep (or a tutorial reproduction) as one MLflow parent run, its jobs as child runs.

MLflow's UI shows a run whose children carry the tag `mlflow.parentRunId` as one expandable row.
The parent is opened before the first job and closed after the last:

- for a Hydra multirun, by Hydra's callback mechanism (`SweepParentRun`, registered under
  `hydra.callbacks` in conf/config.yaml): Hydra calls it in the launching process around the
  sweeper, whatever the launcher (basic, joblib's parallel, submitit), so no launcher is special-cased;
- for `scripts/reproduce_tutorial.py` and `scripts/benchmark_methods.py`, by their pipelines
  (kdresearch.pipelines.reproduce, kdresearch.pipelines.method_benchmark).

Jobs find their parent without any launcher's help: the parent's id is written to
`<sweep folder>/mlflow_parent_run.json` (read by jobs of a Hydra sweep, on any machine that sees
the folder) and exported as KDRESEARCH_PARENT_RUN_ID (inherited by child processes, e.g. the jobs
of a reproduction and the teacher a job trains for itself). Running a sweep again in the same
folder (`hydra.sweep.dir=<old folder>`) reopens the same parent; another sweep is refused in
that folder (`check_one_sweep`).

The parent records the sweep's overrides (param `overrides` and one `sweep.<key>` param per
override, the search space `search.<key>` for an Optuna search), its group's summary (the
comparison table of its children as description and artifacts comparison/comparison.md, .csv,
.png, or the table a pipeline gives, e.g. the method benchmark's), the table's headline numbers as
its own metrics (`headline/*`: the best configuration's mean test accuracy, interval and seeds, so
that the runs table sorts groups; `log_headline`), an Optuna search's best value and parameters
(metric `best_value`, tags `best.<key>`), and its status: FINISHED only when the latest run of
every configuration in it FINISHED, else FAILED (KILLED when a job was stopped).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdresearch.errors import KDResearchError
from kdresearch.tracking import names
from kdresearch.tracking.store import Tracker, recordable_key

log = logging.getLogger(__name__)

PARENT_ENV = "KDRESEARCH_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run.json"
OPTUNA_RESULTS = "optimization_results.yaml"  # what hydra-optuna-sweeper writes at the end of a search


def parent_run_id(sweep_dir: Optional[str] = None) -> Optional[str]:
    """The parent run a job belongs to: the one recorded in its sweep folder, else the inherited one."""
    return (recorded_parent(Path(sweep_dir)) if sweep_dir else None) or os.environ.get(PARENT_ENV) or None


def parent_record(folder: Path) -> Optional[dict]:
    """What `folder`'s PARENT_FILE records: {"run_id": ..., "tracking_uri": ...} (None without the
    file); a file that is not such a record is refused in one line rather than replaced: it may be
    the only link from the folder's jobs to their parent."""
    path = folder / PARENT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KDResearchError(f"{path} is not a parent-run record ({error}); fix it, or delete it to open a "
                              f"new parent run for this sweep folder") from None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if not isinstance(run_id, str) or not run_id.strip():
        raise KDResearchError(f"{path} is not a parent-run record (no \"run_id\" text); fix it, or delete it to "
                              f"open a new parent run for this sweep folder")
    return record


def recorded_parent(folder: Path) -> Optional[str]:
    """The parent run id that `folder`'s PARENT_FILE records (None without the file; see `parent_record`)."""
    record = parent_record(folder)
    return record["run_id"] if record else None


def check_one_sweep(tracker: Tracker, folder: Path, overrides: Sequence[str]) -> None:
    """One sweep folder holds one sweep. Hydra numbers a multirun's jobs from 0 (job folders
    `<folder>/0`, `/1`, ...), so another sweep started in the folder of an earlier one would
    overwrite that one's job folders (checkpoints, .hydra, logs) and share its parent run: refused
    in one line before any job starts, as is a folder whose parent run is gone (deleted, or in
    another store) or unrecorded. The same sweep run again (its overrides, in any order) continues."""
    from mlflow.exceptions import MlflowException

    previous = recorded_parent(folder)
    if previous is None:
        jobs = sorted(path.name for path in folder.iterdir() if path.is_dir() and path.name.isdigit()) \
            if folder.is_dir() else []
        if jobs:
            raise KDResearchError(f"hydra.sweep.dir={folder} holds the job folders {', '.join(jobs[:3])}"
                                  f"{', ...' if len(jobs) > 3 else ''} of a sweep but no {PARENT_FILE}; give this "
                                  f"sweep another hydra.sweep.dir")
        return
    try:
        parent = tracker.client.get_run(previous)
    except MlflowException:
        raise KDResearchError(f"hydra.sweep.dir={folder}: its sweep's parent MLflow run {previous} is not in "
                              f"{tracker.uri}; give the tracking.uri that sweep was tracked in, or give this sweep "
                              f"another hydra.sweep.dir") from None
    if parent.info.lifecycle_stage == "deleted":
        raise KDResearchError(f"hydra.sweep.dir={folder}: its sweep's parent MLflow run {previous} was deleted from "
                              f"{tracker.uri}; restore it (MLFLOW_TRACKING_URI={tracker.uri} mlflow runs restore "
                              f"--run-id {previous}) to continue that sweep, or give this one another hydra.sweep.dir")
    earlier = parent.data.tags.get(names.OVERRIDES, "")
    if sorted(earlier.split()) != sorted(" ".join(overrides).split()):
        raise KDResearchError(f"hydra.sweep.dir={folder} holds another sweep (overrides '{earlier}'); run it again "
                              f"with those overrides to continue it, or give this sweep another hydra.sweep.dir")


def open_parent(tracker: Tracker, folder: Path, name: str, tags: Mapping[str, str],
                params: Mapping[str, object]) -> str:
    """The parent run of the jobs launched from `folder`: the one `folder` already records (a sweep
    run again) set RUNNING, else a new run. Its id is exported to the jobs; returns it."""
    record = folder / PARENT_FILE
    run_id = None
    previous = recorded_parent(folder)
    if previous is not None:
        found = tracker.find_runs(f"attributes.run_id = {names.quote(previous)}")
        if found:
            run_id = tracker.resume_run(previous).run_id
            log.info("continuing parent MLflow run %s of %s", run_id, folder)
    if run_id is None:
        valid = {key: value for key, value in params.items() if recordable_key(key)}
        run_id = tracker.start_run(name, dict(tags), valid).run_id
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracker.uri,
                                      "experiment": tracker.experiment_name}) + "\n")
        log.info("parent MLflow run %s (%s) holds the jobs of %s", run_id, name, folder)
    os.environ[PARENT_ENV] = run_id
    return run_id


def children(tracker: Tracker, run_id: str) -> list:
    """Child runs of `run_id`, newest first."""
    return tracker.find_runs(names.tag_equals(names.PARENT_RUN_ID, run_id), max_results=10000)


def latest_per_configuration(runs: Sequence) -> list:
    """One run per configuration (tag config_hash): the newest, so a job rerun after a failure
    stands for its configuration. `runs` newest first; the result keeps that order."""
    seen, latest = set(), []
    for run in runs:
        key = run.data.tags.get(names.CONFIG_HASH, run.info.run_id)
        if key not in seen:
            seen.add(key)
            latest.append(run)
    return latest


@dataclass(frozen=True)
class GroupSummary:
    """What a parent run shows of its group: `files`, logged as artifacts under `artifact_dir`,
    `note`, its description in the MLflow UI, and the comparison `rows` (kdresearch.reports.compare)
    its headline metrics come from (empty: the rows of the parent's finished children)."""

    files: tuple[Path, ...]
    artifact_dir: str
    note: str
    rows: tuple = ()

    @classmethod
    def of_comparison(cls, comparison) -> "GroupSummary":
        """A kdresearch.reports.compare.Comparison: its table, footnote, files and rows."""
        from kdresearch.reports.compare import ARTIFACT_DIR

        return cls((comparison.markdown, comparison.csv, comparison.figure), ARTIFACT_DIR,
                   f"{comparison.table}\n{comparison.footnote}", tuple(comparison.rows))


def log_headline(parent, rows: Sequence) -> None:
    """The table's headline numbers as the parent's own metrics (`headline/*`, at step 0) and tags
    (`headline.*`), so that MLflow's runs table sorts and compares sweeps and benchmarks by them:
    the best configuration's mean test accuracy, its 95 % interval and seed count, its validation
    accuracy (kdresearch.reports.compare.headline). A group run again logs them again; the
    latest values stand."""
    from kdresearch.reports.compare import headline

    best = headline(rows)
    if best is not None:
        parent.log_metrics(best.metrics(), step=0)
        parent.set_tags(best.tags())


def finished_runs(latest: Sequence) -> list:
    """The runs of `latest` (one per configuration) that FINISHED training a model: the rows of the
    group's table (a nested group's own parent or summary run is none)."""
    return [run for run in latest if run.info.status == "FINISHED"
            and run.data.tags.get(names.ROLE) not in names.UNTRAINED_ROLES]


def close_parent(tracker: Tracker, run_id: str, folder: Path, title: str,
                 extra_tags: Optional[Mapping[str, object]] = None,
                 extra_metrics: Optional[Mapping[str, float]] = None,
                 summary: Optional[GroupSummary] = None) -> str:
    """Log the group's `summary` (by default the comparison of the parent's finished children,
    titled `title`) and its headline metrics (`log_headline`), and end the parent with the status
    the children earn."""
    from kdresearch.reports.compare import compare, comparison_rows
    from kdresearch.tracking.run import TrackedRun

    parent = TrackedRun(tracker, run_id)
    latest = latest_per_configuration(children(tracker, run_id))
    statuses = [run.info.status for run in latest]
    status = "FINISHED" if latest and all(s == "FINISHED" for s in statuses) else (
        "KILLED" if "KILLED" in statuses and "FAILED" not in statuses else "FAILED")
    finished = finished_runs(latest)
    with parent.failing_on_error():
        if extra_tags:  # tags, not params: a search run again in its folder may find another best
            parent.set_tags(extra_tags)
        if extra_metrics:
            parent.log_metrics(extra_metrics, step=0)
        if summary is None and finished:
            summary = GroupSummary.of_comparison(
                compare(tracker, finished, folder / "comparison", name=title, log_summary=False))
        if summary is not None:
            for path in summary.files:
                parent.log_file(path, summary.artifact_dir)
            parent.set_tags({"mlflow.note.content": summary.note, "child_runs": str(len(latest))})
        rows = summary.rows if summary is not None and summary.rows else (
            comparison_rows(tracker.client, finished)[1] if finished else [])
        log_headline(parent, rows)
    parent.end(status)
    os.environ.pop(PARENT_ENV, None)
    log.info("parent MLflow run %s %s: %d of %d configurations finished", run_id, status, len(finished), len(latest))
    return status


def end_if_open(tracker: Tracker, run_id: str) -> None:
    """At exit of a launcher stopped by a failed job or a signal: the parent must not stay RUNNING."""
    if os.environ.get(PARENT_ENV) == run_id:  # jobs started later in this process belong to no group
        os.environ.pop(PARENT_ENV)
    try:
        run = tracker.client.get_run(run_id)
        if run.info.status != "RUNNING":
            return
        statuses = [child.info.status for child in latest_per_configuration(children(tracker, run_id))]
        tracker.client.set_terminated(run_id, status="KILLED" if "KILLED" in statuses and "FAILED" not in statuses
                                      else "FAILED")
    except Exception as error:  # at exit: report, never raise
        log.warning("could not end parent MLflow run %s: %s", run_id, error)


@contextlib.contextmanager
def ended_on_error(tracker: Tracker, run_id: Optional[str]) -> Iterator[None]:
    """The work of a group between `open_parent` and `close_parent`: when it raises (a failed
    job, Ctrl-C), the parent `run_id` (None: no parent) is ended, not left RUNNING."""
    try:
        yield
    except BaseException:
        if run_id:
            end_if_open(tracker, run_id)
        raise


def override_params(overrides: Sequence[str]) -> dict[str, str]:
    """`T=1,2,4` -> {'sweep.T': '1,2,4'}; the whole list as `overrides`."""
    params = {"overrides": " ".join(overrides)}
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep:
            params[f"sweep.{key}"] = value
    return params


class SweepParentRun(Callback):
    """Hydra callback: one MLflow parent run per multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.tracker: Optional[Tracker] = None
        self.run_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        params = override_params(overrides)
        search = OmegaConf.select(config, "hydra.sweeper.params")
        if search:
            params.update({f"search.{key}": str(value) for key, value in search.items()})
        tags = {names.ROLE: names.SWEEP_ROLE, names.SWEEP_DIR: str(folder), names.OVERRIDES: " ".join(overrides),
                "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).rsplit(".", 1)[-1],
                "launcher": str(OmegaConf.select(config, "hydra.launcher._target_", default="")).rsplit(".", 1)[-1]}
        name = "sweep-" + "_".join(folder.parts[-2:])
        try:  # an unusable store, a damaged parent record or another sweep's folder stops it here, before any job
            self.tracker = Tracker(config.tracking.uri, config.tracking.experiment)
            check_one_sweep(self.tracker, folder, overrides)
            self.run_id = open_parent(self.tracker, folder, name, tags, params)
        except KDResearchError as error:
            raise SystemExit(f"error: {error}") from None
        atexit.register(end_if_open, self.tracker, self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        folder = Path(str(config.hydra.sweep.dir))
        tags, metrics = {}, {}
        results = folder / OPTUNA_RESULTS
        if results.is_file():
            best = OmegaConf.load(results)
            metrics["best_value"] = float(best.best_value)
            tags = {f"best.{key}": str(value) for key, value in best.best_params.items()}
        close_parent(self.tracker, self.run_id, folder, f"sweep-{'_'.join(folder.parts[-2:])}", tags, metrics)
