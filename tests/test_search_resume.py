"""hydra/sweeper=kd_search started again in its sweep folder continues the search
(kdresearch/search.py): the trials that finished are read back from MLflow, only the missing ones
run, and the best value reported is the best of all.

The searches run `python train.py -m` from the repository root on tiny synthetic data, with the
MLflow store, sweep folder and caches in the test's temporary folder. Each trial's parameters are
checked against what an uninterrupted search proposes (TPE with the preset's seed), computed here
with optuna alone.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import (
    EXPERIMENT,
    FAST,
    TRAIN_PY,
    mlflow_client,
    new_store,
    run_command,
    tracking_uri,
)
from hydra.utils import instantiate
from processes import Process
from test_sweeps import check_parent, check_sweep_ok, hydra_node

from kdresearch.sweeps.search import (
    next_job_number,
    same_other_overrides,
    search_values,
)

SEARCH_KEYS = ("T", "loss.ce_weight", "loss.distill_weight")


# --- helpers ------------------------------------------------------------------------------------

def search_command(folder: Path, n_trials: int, *extra: str) -> list[str]:
    """The search, one trial at a time, in the fixed sweep folder `folder/search`, on the MLflow
    store in `folder` (a copy of the migrated empty store when there is none yet)."""
    new_store(folder)
    return [
        sys.executable, str(TRAIN_PY), "-m", "hydra/sweeper=kd_search",
        f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=1", "loss=kd", "data=synthetic", *FAST,
        f"tracking.uri={tracking_uri(folder)}", f"cache.dir={folder / 'cache'}",
        f"hydra.sweep.dir={folder / 'search'}", *extra,
    ]


def search(folder: Path, n_trials: int, *extra: str) -> subprocess.CompletedProcess:
    done = run_command(search_command(folder, n_trials, *extra), timeout=600, one_thread=True)
    check_sweep_ok(done)
    return done


def trial_runs(folder: Path, status: str | None = None) -> list:
    """The sweep's jobs (tag sweep = the sweep folder), oldest first."""
    client = mlflow_client(folder)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    query = f"tags.sweep = '{folder / 'search'}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


def params_of(run) -> tuple[float, ...]:
    return tuple(float(run.data.params[key]) for key in SEARCH_KEYS)


def uninterrupted_proposals(n: int) -> list[tuple[float, ...]]:
    """The first n trials the preset's sampler proposes, one at a time (the values told do not
    matter before TPE's startup trials are done)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    sweeper = hydra_node("hydra/sweeper=kd_search", "loss=kd").sweeper
    assert sweeper.sampler.n_startup_trials >= n
    distributions, _ = create_params_from_overrides([f"{key}={value}" for key, value in sweeper.params.items()])
    assert tuple(distributions) == SEARCH_KEYS
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=instantiate(sweeper.sampler), direction="maximize")
        proposals = []
        for _ in range(n):
            trial = study.ask()
            proposals.append(tuple(trial._suggest(key, dist) for key, dist in distributions.items()))
            study.tell(trial, 0.0)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return proposals


def final_value(folder: Path, run) -> float:
    return mlflow_client(folder).get_metric_history(run.info.run_id, "test/acc")[-1].value


def check_best(folder: Path, done: subprocess.CompletedProcess, finished: list) -> None:
    """The best value printed and saved is the best final test/acc of all the finished trials."""
    best_line = re.search(r"Best value: ([0-9.]+)", done.output)
    assert best_line, done.output[-3000:]
    results = yaml.safe_load((folder / "search" / "optimization_results.yaml").read_text())
    assert set(results) == {"name", "best_params", "best_value"}
    assert math.isclose(results["best_value"], float(best_line.group(1)))
    values = {run.info.run_id: final_value(folder, run) for run in finished}
    assert math.isclose(results["best_value"], max(values.values()), rel_tol=1e-9)
    best = [run for run in finished if math.isclose(values[run.info.run_id], results["best_value"], rel_tol=1e-9)]
    assert any(params_of(run) == tuple(results["best_params"][key] for key in SEARCH_KEYS) for run in best)


def job_folders(runs) -> list[str]:
    return [Path(run.data.tags["output_dir"]).name for run in runs]


# --- searches continued in their folder -----------------------------------------------------------

@pytest.mark.slow  # three searches, each a `python train.py -m` process
def test_search_started_again_runs_only_the_missing_trials(tmp_path):
    """2 trials, then the same search with n_trials=4 in the same folder: 2 more, numbered 2 and 3,
    proposing what an uninterrupted 4-trial search proposes (not the first two again)."""
    first = search(tmp_path, 2)
    old = trial_runs(tmp_path, "FINISHED")
    assert len(old) == 2
    assert "no jobs of" in first.output

    second = search(tmp_path, 4)
    print(f"2-trial search: {first.seconds:.1f} s, continued to 4 trials: {second.seconds:.1f} s")
    assert f"kd_search: 2 of 4 trials already finished in {tmp_path / 'search'} (from MLflow); running 2 more" \
        in second.output, second.output[-3000:]
    assert second.output.count("Launching 1 jobs locally") == 2

    finished = trial_runs(tmp_path, "FINISHED")
    assert len(trial_runs(tmp_path)) == len(finished) == 4
    assert [run.info.run_id for run in finished[:2]] == [run.info.run_id for run in old]
    assert job_folders(finished) == ["0", "1", "2", "3"]
    assert [params_of(run) for run in finished] == uninterrupted_proposals(4)
    check_best(tmp_path, second, finished)
    client = mlflow_client(tmp_path)
    check_parent(client, client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]))

    # A third start with the same n_trials has nothing left to run.
    third = search(tmp_path, 4)
    assert "kd_search: 4 of 4 trials already finished" in third.output and "running 0 more" in third.output
    assert "Launching" not in third.output
    assert len(trial_runs(tmp_path)) == 4
    check_best(tmp_path, third, finished)


def mid_training(folder: Path) -> bool:
    """The third trial's run is RUNNING with at least one epoch logged (and so checkpointed)."""
    running = trial_runs(folder, "RUNNING")
    return len(running) == 1 and "test/acc" in running[0].data.metrics


@pytest.mark.slow  # a search stopped by a signal while it trains
@pytest.mark.parametrize("stop", [
    signal.SIGINT,  # Ctrl-C: the third trial's run ends KILLED
    signal.SIGKILL,  # no clean-up: its run stays RUNNING
], ids=["sigint", "sigkill"])
def test_search_stopped_during_a_trial_continues(tmp_path, stop):
    """A 3-trial search stopped while its third trial trains (the first two FINISHED in MLflow),
    started again: one trial runs, the stopped one (its job continues its own MLflow run from its
    last checkpoint), and the first two stay as they were."""
    # 20 epochs: a trial lasts seconds, so the signal lands while the third one trains.
    process = Process(search_command(tmp_path, 3, "epochs=20"), tmp_path / "stopped.log", one_thread=True)
    process.wait_until(lambda: len(trial_runs(tmp_path, "FINISHED")) >= 2, "the second trial's end", poll=0.2)
    process.wait_until(lambda: mid_training(tmp_path), "the third trial's first epoch", poll=0.2)
    process.send_signal(stop)
    assert process.wait(timeout=60) != 0, "the search ended before the signal reached it"
    old = trial_runs(tmp_path, "FINISHED")
    assert len(old) == 2
    (stopped,) = [run for run in trial_runs(tmp_path) if run.info.status != "FINISHED"]
    assert stopped.info.status == ("KILLED" if stop == signal.SIGINT else "RUNNING")

    again = search(tmp_path, 3, "epochs=20")
    print(f"continued after {stop.name}: {again.seconds:.1f} s")
    assert f"kd_search: 2 of 3 trials already finished in {tmp_path / 'search'} (from MLflow); running 1 more " \
        "(1 of them the interrupted trial(s) 2 again)" in again.output, again.output[-3000:]
    assert again.output.count("Launching 1 jobs locally") == 1
    finished = trial_runs(tmp_path, "FINISHED")
    assert len(trial_runs(tmp_path)) == len(finished) == 3
    assert [run.info.run_id for run in finished] == [run.info.run_id for run in (*old, stopped)]
    assert params_of(finished[2]) == params_of(stopped)
    assert [params_of(run) for run in finished] == uninterrupted_proposals(3)
    # The new job is numbered 3; the stopped one trained on in its own folder, 2.
    assert job_folders(finished) == ["0", "1", "2"] and (tmp_path / "search" / "3").is_dir()
    check_best(tmp_path, again, finished)
    client = mlflow_client(tmp_path)
    check_parent(client, client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]))


# --- reading trials back ----------------------------------------------------------------------------

def fake_run(params: dict, overrides: str) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params, tags={"overrides": overrides}))


def test_trial_values_and_overrides_read_back():
    from optuna.distributions import (
        CategoricalDistribution,
        LogUniformDistribution,
        UniformDistribution,
    )

    space = {"T": LogUniformDistribution(1, 8), "loss.ce_weight": UniformDistribution(0.25, 1.0),
             "model": CategoricalDistribution(["light", "resnet8"])}
    run = fake_run({"T": "2.178930765977573", "loss.ce_weight": "0.5", "model.name": "light"},
                   "T=2.178930765977573 loss.ce_weight=0.5 model=light loss=kd epochs=3")
    # A config group's choice is read from the overrides; the rest from the flattened params.
    assert search_values(run, space) == {"T": 2.178930765977573, "loss.ce_weight": 0.5, "model": "light"}
    with pytest.raises(ValueError, match="outside"):
        search_values(fake_run({"T": "9.5", "loss.ce_weight": "0.5"}, "model=light"), space)

    fixed = {"loss": "kd", "epochs": "3"}
    assert same_other_overrides("T=2.1 loss.ce_weight=0.5 model=light loss=kd epochs=3", space, fixed)
    assert same_other_overrides("epochs=3 loss=kd T=2.1 loss.ce_weight=0.5 model=light", space, fixed)
    assert not same_other_overrides("T=2.1 loss.ce_weight=0.5 model=light loss=kd epochs=4", space, fixed)
    assert not same_other_overrides("T=2.1 loss.ce_weight=0.5 model=light loss=kd epochs=3 seed=1", space, fixed)


def test_new_jobs_are_numbered_after_the_existing_folders(tmp_path):
    for name in ("0", "1", "4", "comparison"):
        (tmp_path / name).mkdir()
    assert next_job_number(str(tmp_path), []) == 5
    assert next_job_number(str(tmp_path / "new"), []) == 0
    recorded = [SimpleNamespace(number=7), SimpleNamespace(number=None)]
    assert next_job_number(str(tmp_path), recorded) == 8
