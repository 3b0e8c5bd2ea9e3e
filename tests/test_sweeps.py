"""Scaling out on one machine and to SLURM: Hydra multiruns through the launcher and sweeper presets
in conf/hydra/ (hydra-joblib-launcher, hydra-submitit-launcher, hydra-optuna-sweeper), read back
from MLflow.

Every sweep runs `python train.py -m ...` from the repository root on tiny synthetic data, with its
MLflow store, sweep folder and caches in the test's temporary folder, so nothing touches the
project's `mlflow.db` or `outputs/`.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml
from conftest import (
    EXPERIMENT,
    FAST,
    TRAIN_PY,
    compose_config,
    new_store,
    run_command,
    tracking_uri,
)

TINY = ("data=synthetic", *FAST)

# What MLflow says when several processes create one fresh SQLite store at the same moment
# (each one that finds no tables logs "Creating initial MLflow database tables").
STORE_RACE = re.compile(r"duplicate column name|table \w+ already exists|Online migration expected|"
                        r"Circular dependency detected")


# --- helpers ------------------------------------------------------------------------------------

def multirun(folder: Path, *overrides: str, timeout: float = 600, fresh_store: bool = False
             ) -> subprocess.CompletedProcess:
    """`python train.py -m <overrides>` on the MLflow store and sweep folder inside `folder` (a copy
    of the migrated empty store, unless `fresh_store`: the sweep's jobs create it).

    The sweep folder keeps Hydra's `${now:...}` pattern so that every job of the sweep resolves it
    (in its own process for the parallel launchers) and must agree on it.
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not fresh_store:
        new_store(folder)
    command = [
        sys.executable, str(TRAIN_PY), "-m",
        f"tracking.uri={tracking_uri(folder)}",
        f"hydra.sweep.dir={folder}/multirun/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}",
        f"cache.dir={folder / 'cache'}", *TINY, *overrides,
    ]
    return run_command(command, timeout)


def check_sweep_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{' '.join(done.args)}\nexit {done.returncode}\n{done.output[-6000:]}"
    # Parallel jobs on a fresh store: the schema is created once, under the store lock.
    assert done.output.count("Creating initial MLflow database tables") <= 1
    assert not STORE_RACE.search(done.output)


def sweep_folders(folder: Path) -> list[Path]:
    """The multirun folders Hydra made under `folder` (multirun/<date>/<time>)."""
    return sorted(path for path in (folder / "multirun").glob("*/*") if path.is_dir())


def all_runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(folder))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "no MLflow experiment was created"
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def by_role(runs, role: str):
    return [run for run in runs if run.data.tags.get("role") == role]


def check_one_sweep(folder: Path, students: list, expected_jobs: int) -> str:
    """The students form one sweep: one tag, shared by all, naming the one multirun folder."""
    assert len(students) == expected_jobs, [run.info.run_name for run in students]
    tags = {run.data.tags.get("sweep") for run in students}
    assert len(tags) == 1 and None not in tags and "" not in tags, f"sweep tags: {tags}"
    folders = sweep_folders(folder)
    assert len(folders) == 1, folders
    # The tag is the multirun folder (relative to the launch folder when the sweep dir is relative).
    assert Path(tags.pop()).name == folders[0].name
    return students[0].data.tags["sweep"]


def check_parent(client, runs, status: str = "FINISHED"):
    """The sweep is one MLflow parent run (role=sweep) and every job's run is its child; returns it."""
    (parent,) = by_role(runs, "sweep")
    assert parent.info.status == status
    children = [run for run in runs if run is not parent]
    assert children and {run.data.tags.get("mlflow.parentRunId") for run in children} == {parent.info.run_id}
    assert "sweep" not in parent.data.tags  # compare.py --sweep selects the jobs, not their parent
    if status == "FINISHED":
        listed = {Path(item.path).name for item in client.list_artifacts(parent.info.run_id, "comparison")}
        assert listed == {"comparison.md", "comparison.csv", "comparison.png"}
        assert all(f"| {run.info.run_name} |" in parent.data.tags["mlflow.note.content"]
                   for run in children if run.info.status == "FINISHED")
    return parent


# --- the presets compose ---------------------------------------------------------------------------

def hydra_node(*overrides: str):
    return compose_config(*overrides, hydra=True).hydra


def test_launcher_and_sweeper_presets_compose():
    parallel = hydra_node("hydra/launcher=parallel").launcher
    assert parallel._target_.endswith("JoblibLauncher")
    assert (parallel.backend, parallel.n_jobs) == ("loky", 2)

    slurm = hydra_node("hydra/launcher=slurm").launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition is None
    assert slurm.timeout_min > 0 and slurm.gpus_per_node >= 0 and slurm.cpus_per_task >= 1 and slurm.mem_gb > 0
    assert (slurm.nodes, slurm.tasks_per_node) == (1, 1)

    local = hydra_node("hydra/launcher=slurm_local").launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")

    node = hydra_node("hydra/sweeper=kd_search", "loss=kd")
    search = node.sweeper
    assert search._target_.endswith("OptunaSweeper")
    assert search.direction == "maximize"
    assert set(search.params) == {"T", "loss.ce_weight", "loss.distill_weight"}
    # The search composes with a launcher: trials can run in parallel.
    assert hydra_node("hydra/sweeper=kd_search", "hydra/launcher=parallel").launcher.backend == "loky"


# --- sweeps ------------------------------------------------------------------------------------------

def run_grid_sweep(tmp_path: Path, temperatures: tuple, weights: tuple) -> None:
    """A KD grid through the parallel (joblib) launcher on a fresh store: one run per job, all in
    one sweep, one teacher trained once and used by all, nothing left RUNNING."""
    done = multirun(
        tmp_path, "hydra/launcher=parallel", "loss=kd",
        f"T={','.join(map(str, temperatures))}", f"loss.distill_weight={','.join(map(str, weights))}",
        fresh_store=True,
    )
    check_sweep_ok(done)
    print(f"{len(temperatures) * len(weights)}-job sweep: {done.seconds:.1f} s")
    assert "JoblibLauncher" in done.output or "Joblib.Parallel" in done.output

    client, runs = all_runs(tmp_path)
    assert [run.info.run_name for run in runs if run.info.status != "FINISHED"] == []
    students = by_role(runs, "student")
    sweep = check_one_sweep(tmp_path, students, len(temperatures) * len(weights))
    grid = {(float(run.data.params["loss.T"]), float(run.data.params["loss.distill_weight"])) for run in students}
    assert grid == {(float(t), float(w)) for t, w in product(temperatures, weights)}

    teachers = by_role(runs, "teacher")
    assert len(teachers) == 1, f"{len(teachers)} teacher runs: the teacher must be trained once"
    assert {run.data.tags.get("teacher_run_id") for run in students} == {teachers[0].info.run_id}

    # What compare.py and the MLflow UI filter by.
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(client.search_runs([experiment_id], filter_string=f"tags.sweep = '{sweep}'")) == len(students)
    parent = check_parent(client, runs)
    assert parent.data.params["sweep.T"] == ",".join(map(str, temperatures))
    assert parent.data.tags["launcher"] == "JoblibLauncher"


@pytest.mark.slow  # 8 jobs in 2 worker processes
def test_parallel_sweep_8_jobs_one_teacher(tmp_path):
    """A sweep of 8 jobs: T=1,2,4,8 x loss.distill_weight=0.25,0.5 (~45-60 s on 2 busy cores)."""
    run_grid_sweep(tmp_path, (1, 2, 4, 8), (0.25, 0.5))


@pytest.mark.slow  # a process per job besides the launcher's
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    """The SLURM launcher's code path (hydra-submitit-launcher) through submitit's local executor."""
    done = multirun(tmp_path, "hydra/launcher=slurm_local", "seed=1,2", fresh_store=True)
    check_sweep_ok(done)
    print(f"submitit local 2-job sweep: {done.seconds:.1f} s")
    client, runs = all_runs(tmp_path)
    check_parent(client, runs)
    runs = by_role(runs, "student")
    assert sorted((run.info.status, run.data.params["seed"]) for run in runs) == [
        ("FINISHED", "1"), ("FINISHED", "2")]
    check_one_sweep(tmp_path, runs, 2)
    # submitit's own records: one folder per job with its logs and result.
    submitit = sweep_folders(tmp_path)[0] / ".submitit"
    assert len(list(submitit.glob("*/*_result.pkl"))) == 2


@pytest.mark.slow  # a search: 3 trials and their teacher in one process
def test_optuna_search_reports_best_value(tmp_path):
    """hydra/sweeper=kd_search: 3 Optuna trials maximising the test accuracy train.py returns."""
    done = multirun(tmp_path, "hydra/sweeper=kd_search", "hydra.sweeper.n_trials=3", "loss=kd")
    check_sweep_ok(done)
    print(f"3-trial search: {done.seconds:.1f} s")
    assert "setup plugin" not in done.output  # alembic's import chatter is silenced by the preset

    best_line = re.search(r"Best value: ([0-9.]+)", done.output)
    assert best_line, done.output[-3000:]
    results = yaml.safe_load((sweep_folders(tmp_path)[0] / "optimization_results.yaml").read_text())
    assert math.isclose(results["best_value"], float(best_line.group(1)))
    assert set(results["best_params"]) == {"T", "loss.ce_weight", "loss.distill_weight"}
    assert 1 <= results["best_params"]["T"] <= 8

    client, runs = all_runs(tmp_path)
    students = by_role(runs, "student")
    check_one_sweep(tmp_path, students, 3)
    assert len(by_role(runs, "teacher")) == 1
    # The best value is the best trial's final test accuracy, as MLflow recorded it.
    final_acc = [client.get_metric_history(run.info.run_id, "test/acc")[-1].value for run in students]
    assert math.isclose(results["best_value"], max(final_acc), rel_tol=1e-6)
    # The search's parent run holds the best value and parameters and the search space.
    parent = check_parent(client, runs)
    assert math.isclose(parent.data.metrics["best_value"], results["best_value"], rel_tol=1e-6)
    assert float(parent.data.tags["best.T"]) == results["best_params"]["T"]
    assert parent.data.params["search.T"] == "tag(log, interval(1, 8))"


def test_basic_sweep_is_one_parent_run(tmp_path):
    """The basic launcher (jobs in the launching process): the same parent/child record."""
    done = multirun(tmp_path, "seed=1,2")
    check_sweep_ok(done)
    client, runs = all_runs(tmp_path)
    parent = check_parent(client, runs)
    assert parent.data.params["overrides"].endswith("seed=1,2") and parent.data.params["sweep.seed"] == "1,2"
    assert parent.data.tags["launcher"] == "BasicLauncher"
    assert (sweep_folders(tmp_path)[0] / "mlflow_parent_run.json").is_file()
    # The parent carries its table's headline (one configuration, two seeds): the mean final test/acc.
    final_acc = [client.get_metric_history(run.info.run_id, "test/acc")[-1].value for run in by_role(runs, "student")]
    assert len(final_acc) == 2 and parent.data.metrics["headline/seeds"] == 2
    assert math.isclose(parent.data.metrics["headline/test_acc"], sum(final_acc) / 2, rel_tol=1e-9)


@pytest.mark.slow  # a second `python train.py -m` process; test_basic_sweep_is_one_parent_run is the default run's
def test_sweep_with_a_failing_job_ends_its_parent_failed(tmp_path):
    """A job that fails stops the basic launcher; the parent must not stay RUNNING nor read FINISHED."""
    done = multirun(tmp_path, "optimizer.lr=0.001,1e12", "optimizer=sgd")
    assert done.returncode != 0
    client, runs = all_runs(tmp_path)
    check_parent(client, runs, status="FAILED")
    assert sorted(run.info.status for run in by_role(runs, "student")) == ["FAILED", "FINISHED"]
