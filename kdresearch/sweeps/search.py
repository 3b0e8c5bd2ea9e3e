"""An Optuna search that continues where it stopped (hydra/sweeper=kd_search).

hydra-optuna-sweeper keeps its study in memory: optuna 2.10, the newest version the plugin allows,
cannot open an `sqlite://` study storage with SQLAlchemy 2. Every trial is an ordinary job with its
own MLflow run, though, tagged `sweep=<sweep folder>` and holding the trial's parameters (the
flattened resolved config) and its per-epoch metrics. So a search started again in its old folder

    python train.py -m hydra/sweeper=kd_search loss=kd ... hydra.sweep.dir=<the old sweep folder>

rebuilds its study from MLflow before it proposes anything (`ResumableOptunaSweeper`):

- every FINISHED run of the folder whose other overrides are the ones given now and whose values lie
  in the search space is a complete trial, its value what the job returned (the last `val/acc`
  with a validation split, else the last `test/acc`); it counts towards `n_trials`, so only the
  remaining `n_trials - k` trials run and the best value reported is the best of all;
- a KILLED run, or one left RUNNING by a killed process, is an interrupted trial: its parameters
  are proposed again first (unless a FINISHED run already has them), and its job then continues
  that run from its last checkpoint if it left one (kdresearch.trainer, a sweep run again);
- a FAILED run is a failed trial: recorded as such, not counted, not proposed again;
- the sampler is brought to the state it had after proposing the recorded trials (they are
  proposed again, one batch of `n_jobs` at a time, on a scratch study and told their recorded
  results), so a seeded search continued after k trials proposes what it would have proposed
  without the interruption instead of its first proposals again;
- new jobs are numbered after the folder's existing ones (`hydra.job.num`, the job folders
  `<sweep folder>/<num>`), so no trial's folder is overwritten.

Hydra instantiates sweepers only from the `hydra_plugins` package, so the sweeper class is
registered there under `hydra_plugins.kdresearch_search` by the Hydra callback `SearchSetup`,
which kd_search.yaml lists (callbacks are built before the sweeper). The same callback refuses, in
one line and before any run exists, a search that cannot run or has nothing to search
(`check_search`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import optuna
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_optuna_distribution_from_config,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState, create_trial

from kdresearch.config.validators import integer, number
from kdresearch.errors import KDResearchError, first_line
from kdresearch.tracking import names
from kdresearch.training.result import objective

log = logging.getLogger(__name__)

PLUGIN_MODULE = "hydra_plugins.kdresearch_search"  # the name Hydra instantiates the sweeper by
FINISHED, FAILED, INTERRUPTED = "FINISHED", "FAILED", ("KILLED", "RUNNING")


# --- the trials of a sweep folder, as MLflow recorded them ---------------------------------------

@dataclass
class RecordedTrial:
    """One job of the sweep folder: its MLflow run and what the study needs from it."""

    run_id: str
    status: str                      # the MLflow run status
    number: Optional[int]            # hydra.job.num, from the job folder's name
    start_time: int
    params: Optional[dict] = None    # the search-space values; None when unreadable or outside the space
    value: Optional[float] = None    # what the job returned (FINISHED runs)
    other_overrides: bool = True     # its overrides outside the search space are the ones given now
    problem: str = ""                # why it cannot count, for the log

    @property
    def complete(self) -> bool:
        return self.status == FINISHED and not self.problem and self.value is not None

    @property
    def usable(self) -> bool:
        return not self.problem


def sweep_runs(tracker, sweep_dir: str) -> list:
    """The runs tagged with this sweep folder, however the folder was spelled when they ran
    (as given now, absolute, relative to the working folder)."""
    spellings = {sweep_dir, os.path.abspath(sweep_dir)}
    try:
        spellings.add(os.path.relpath(os.path.abspath(sweep_dir)))
    except ValueError:  # another drive (Windows)
        pass
    folder = Path(sweep_dir).resolve()
    runs = {}
    for spelling in spellings:
        for run in tracker.find_runs(names.tag_equals(names.SWEEP, spelling), max_results=10000):
            output_dir = run.data.tags.get("output_dir")
            if output_dir and not Path(output_dir).resolve().is_relative_to(folder):
                continue  # a relative spelling that meant another folder for another working folder
            runs[run.info.run_id] = run
    return list(runs.values())


def job_number(run, folder: Path) -> Optional[int]:
    """The job's hydra.job.num: the name of its folder `<sweep folder>/<num>` (the default subdir)."""
    output_dir = run.data.tags.get("output_dir")
    if not output_dir:
        return None
    path = Path(output_dir).resolve()
    return int(path.name) if path.parent == folder and path.name.isdigit() else None


def _parse(text: str, distribution: BaseDistribution) -> Any:
    """An MLflow param (or override) string as a value of `distribution`; ValueError if it is none."""
    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:
            if str(choice) == text or (choice is None and text in ("None", "null")):
                return choice
        raise ValueError(f"{text!r} is not one of {list(distribution.choices)}")
    value = float(text)
    if type(distribution).__name__.startswith("Int"):
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer")
        value = int(value)
    if not distribution._contains(distribution.to_internal_repr(value)):
        raise ValueError(f"{text} lies outside {distribution}")
    return value


def _override_values(overrides: str) -> dict:
    """`key=value` pairs of a run's `overrides` tag (space-separated; a value holding a space is cut)."""
    pairs = {}
    for token in overrides.split():
        key, sep, value = token.partition("=")
        if sep:
            pairs[key.lstrip("+~")] = value
    return pairs


def search_values(run, distributions: dict) -> dict:
    """The run's value of each search-space key: the flattened config param of that name (`T`,
    `loss.ce_weight`), else the override that set it (a config group's choice, e.g. `model=...`)."""
    overrides = _override_values(run.data.tags.get("overrides", ""))
    values = {}
    for key, distribution in distributions.items():
        text = run.data.params.get(key, overrides.get(key))
        if text is None:
            raise ValueError(f"no param or override {key}")
        values[key] = _parse(text, distribution)
    return values


def same_other_overrides(overrides: str, search_keys: Iterable[str], fixed: dict) -> bool:
    """Whether a run's `overrides` tag holds exactly the fixed overrides given now (in any order)
    besides its search-space values: a trial trained with other epochs, data or loss is no trial
    of this search."""
    rest = f" {overrides} "
    for key, value in fixed.items():
        item = f" {key}={value} "
        if item not in rest:
            return False
        rest = rest.replace(item, " ", 1)
    for key in search_keys:
        rest = re.sub(rf" [+~]?{re.escape(key)}=\S* ", " ", rest, count=1)
    return not rest.strip()


def read_trials(tracker, sweep_dir: str, distributions: dict, fixed: dict) -> list[RecordedTrial]:
    """The sweep folder's jobs in the order they ran (job number, then start time)."""
    folder = Path(sweep_dir).resolve()
    trials = []
    for run in sweep_runs(tracker, sweep_dir):
        trial = RecordedTrial(run.info.run_id, run.info.status, job_number(run, folder), run.info.start_time or 0)
        trial.other_overrides = same_other_overrides(run.data.tags.get("overrides", ""), distributions, fixed)
        if not trial.other_overrides:
            trial.problem = "other overrides"
        else:
            try:
                trial.params = search_values(run, distributions)
            except ValueError as error:
                trial.problem = str(error)
        if run.info.status == FINISHED:
            trial.value = objective(run.data.metrics)  # what the job returned to the sweeper
            if trial.value is None and not trial.problem:
                trial.problem = "no val/acc or test/acc"
        trials.append(trial)
    return sorted(trials, key=lambda t: (t.number if t.number is not None else sys.maxsize, t.start_time))


def next_job_number(sweep_dir: str, trials: Sequence[RecordedTrial]) -> int:
    """The first hydra.job.num after every job of the folder (in MLflow or on disk)."""
    numbers = [t.number for t in trials if t.number is not None]
    folder = Path(sweep_dir)
    if folder.is_dir():
        numbers += [int(path.name) for path in folder.iterdir() if path.is_dir() and path.name.isdigit()]
    return max(max(numbers, default=-1) + 1, len(trials))


# --- the search space, and the searches that cannot run ------------------------------------------

def search_space(params: Optional[Mapping], legacy_space: Optional[Mapping],
                 arguments: Sequence[str]) -> tuple[dict, dict]:
    """(search space, fixed overrides) as the plugin's sweep() works them out: the distributions of
    `hydra.sweeper.params` and of the command line's sweep overrides (the deprecated
    `hydra.sweeper.search_space` below them, used only without params), less every key that an
    override fixes. A distribution Optuna refuses, such as a reversed interval, is one line naming
    its override."""
    space = {} if params is not None or legacy_space is None else {
        str(key): create_optuna_distribution_from_config(value) for key, value in legacy_space.items()}
    fixed = {}
    for override in [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments):
        try:
            distributions, values = create_params_from_overrides([override])
        except (ValueError, HydraException) as error:
            raise KDResearchError(f"search {override}: {first_line(error)}") from None
        space.update(distributions)
        fixed.update(values)
    for key in fixed:
        space.pop(key, None)
    return space, fixed


def check_search(settings: DictConfig, arguments: Sequence[str]) -> None:
    """Refuse, in one line, a search that cannot run or has nothing to search: n_trials or n_jobs
    below 1 (Optuna would end with "No trials are completed yet"), a distribution Optuna refuses,
    or a space of single values (n trials of one configuration)."""
    integer("hydra.sweeper.n_trials", settings.n_trials, at_least=1)
    integer("hydra.sweeper.n_jobs", settings.n_jobs, at_least=1)
    number("hydra.sweeper.max_failure_rate", settings.max_failure_rate, at_least=0, at_most=1)
    space, fixed = search_space(settings.params, settings.search_space, arguments)
    if settings.custom_search_space is None and all(distribution.single() for distribution in space.values()):
        pinned = [f"{key}={value}" for key, value in fixed.items() if key in (settings.params or {})]
        raise KDResearchError(
            "hydra/sweeper=kd_search has nothing to search: give an interval, range or choice of several "
            "values in hydra.sweeper.params or on the command line, e.g. 'T=tag(log, interval(1, 8))'"
            + (f" ({' '.join(pinned)} fixes what hydra.sweeper.params would search)" if pinned else ""))


# --- the sweeper ---------------------------------------------------------------------------------

class RebuiltStorage(InMemoryStorage):
    """The in-memory study storage, holding the trials rebuilt from MLflow (named so in the log)."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def __str__(self) -> str:
        return self.description


@contextlib.contextmanager
def _quiet_optuna():
    """Without optuna's INFO lines about the studies made here (the plugin's own study logs as
    usual) and its warning that create_trial, add_trial and enqueue_trial are experimental in 2.10."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's sweep, started from the study its trials in MLflow make (module docstring)."""

    def sweep(self, arguments: list[str]) -> None:
        sweep_dir = str(self.config.hydra.sweep.dir)
        name = self.study_name or "search"
        distributions, fixed = self._search_space(arguments)
        directions = self._get_directions()
        grid = not isinstance(self.sampler, optuna.samplers.BaseSampler)  # GridSampler, built in sweep()
        why_not = ("a study storage is configured" if self.storage is not None else
                   "the search has several objectives" if len(directions) != 1 else
                   "GridSampler cannot be told the grid points already done" if grid else
                   "custom_search_space adds parameters MLflow cannot map back" if self.custom_search_space_extender
                   else "")
        trials = self._recorded_trials(sweep_dir, distributions, fixed)
        self.job_idx = next_job_number(sweep_dir, trials)
        if not trials:
            log.info("%s: no jobs of %s in MLflow yet; running %d trials", name, sweep_dir, self.n_trials)
            return super().sweep(arguments)
        if why_not:
            log.warning("%s: not continued from the %d recorded jobs of %s (%s); running %d new trials "
                        "numbered from %d", name, len(trials), sweep_dir, why_not, self.n_trials, self.job_idx)
            return super().sweep(arguments)

        complete = [t for t in trials if t.complete]
        finished_params = [t.params for t in complete]
        interrupted = []
        for t in trials:
            if t.status in INTERRUPTED and t.usable and t.params not in finished_params and \
                    t.params not in [i.params for i in interrupted]:
                interrupted.append(t)
        to_run = max(self.n_trials - len(complete), 0)
        again = interrupted[:to_run]

        storage = RebuiltStorage(f"in memory, rebuilt from MLflow ({len(complete)} finished trials of {sweep_dir})")
        with _quiet_optuna():
            study = optuna.create_study(storage=storage, study_name=self.study_name, sampler=self.sampler,
                                        directions=directions)
            for t in trials:
                if t.complete:
                    state = TrialState.COMPLETE
                elif t.status == FAILED and t.usable:
                    state = TrialState.FAIL
                else:
                    continue
                study.add_trial(create_trial(
                    state=state, value=t.value if state == TrialState.COMPLETE else None, params=t.params,
                    distributions=dict(distributions), user_attrs={**fixed, "mlflow_run_id": t.run_id}))
            for t in again:
                study.enqueue_trial(t.params)
            self._replay(trials, distributions, fixed, directions)

        skipped = [t for t in trials if t.status == FINISHED and not t.complete]
        if skipped:
            log.warning("%s: %d finished jobs of %s are not counted: %s", name, len(skipped), sweep_dir,
                        "; ".join(sorted({f"{t.problem}" for t in skipped})))
        line = (f"{name}: {len(complete)} of {self.n_trials} trials already finished in {sweep_dir} (from MLflow); "
                f"running {to_run} more")
        if again:
            line += f" ({len(again)} of them the interrupted trial(s) {', '.join(_label(t) for t in again)} again)"
        log.info(line)

        self.storage, self.study_name, self.n_trials = storage, study.study_name, to_run
        super().sweep(arguments)

    def _search_space(self, arguments: list[str]) -> tuple[dict, dict]:
        return search_space(self.params, self.search_space, arguments)

    def _recorded_trials(self, sweep_dir: str, distributions: dict, fixed: dict) -> list[RecordedTrial]:
        from kdresearch.tracking.store import Tracker

        tracker = Tracker(OmegaConf.select(self.config, "tracking.uri"),
                          OmegaConf.select(self.config, "tracking.experiment"))
        return read_trials(tracker, sweep_dir, distributions, fixed)

    def _replay(self, trials: Sequence[RecordedTrial], distributions: dict, fixed: dict,
                directions: list[str]) -> None:
        """Advance the sampler past its proposals for the recorded jobs: propose them again on a
        scratch study, a batch of n_jobs at a time as the plugin does, telling each batch the
        recorded results (a job that did not finish: failed)."""
        scratch = optuna.create_study(sampler=self.sampler, directions=directions)
        for start in range(0, len(trials), max(self.n_jobs, 1)):
            batch = trials[start:start + max(self.n_jobs, 1)]
            asked = [scratch.ask() for _ in batch]
            self._configure_trials(asked, distributions, fixed)
            for recorded, trial in zip(batch, asked):
                if recorded.value is not None and recorded.status == FINISHED:
                    scratch.tell(trial, values=[recorded.value])
                else:
                    scratch.tell(trial, state=TrialState.FAIL)


def _label(trial: RecordedTrial) -> str:
    return str(trial.number) if trial.number is not None else trial.run_id


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's OptunaSweeper (every option of its config), continuing the search
    that its sweep folder already holds in MLflow (module docstring)."""

    __module__ = PLUGIN_MODULE

    def __init__(self, **settings: Any) -> None:  # the plugin's settings (sampler, direction, params, ...)
        self.sweeper = ResumableOptunaSweeperImpl(**settings)


# A module of that name, so that the class is found (and pickled) under the name Hydra uses.
sys.modules.setdefault(PLUGIN_MODULE, types.ModuleType(PLUGIN_MODULE, "kdresearch.search's Hydra sweeper"))
sys.modules[PLUGIN_MODULE].ResumableOptunaSweeper = ResumableOptunaSweeper


class SearchSetup(Callback):
    """Hydra callback listed by kd_search.yaml: makes `ResumableOptunaSweeper` known to Hydra's
    plugin registry before Hydra instantiates the sweeper, and refuses a search that cannot run
    (`check_search`) at the start of the multirun. Callbacks of hydra/sweeper configs come before
    conf/config.yaml's, so this runs before the sweep's parent run opens: a refused search leaves
    no run behind."""

    def __init__(self) -> None:
        Plugins.instance().register(ResumableOptunaSweeper)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_search(config.hydra.sweeper, list(config.hydra.overrides.task))
        except KDResearchError as error:
            raise SystemExit(f"error: {error}") from None
