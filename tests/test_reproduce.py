"""scripts/reproduce_tutorial.py: the job plan, the orchestration (jobs trained in-process, fast), and
the real command end to end (slow: five `python train.py` subprocesses)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from conftest import new_store, run_command, tracking_uri, train_command_in_process
from mlflow.tracking import MlflowClient

from kdresearch.errors import KDResearchError
from kdresearch.layout import train_command
from kdresearch.pipelines import jobs as jobs_module
from kdresearch.pipelines.jobs import override_value
from kdresearch.pipelines.reproduce import TUTORIAL_JOBS, plan, reproduce
from kdresearch.reports.compare import select_runs
from kdresearch.tracking.store import Tracker

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "reproduce_tutorial.py"
SMALL = ["data=synthetic", "epochs=1", "data.limit_train=128", "data.limit_test=100", "device=cpu",
         "tracking.log_model=false"]  # the MLflow model export costs seconds per job and is not what this tests
NAMES = ["deep-ce", "light-ce", "light-kd-T2", "light-cosine", "light-regressor"]

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import reproduce_tutorial  # noqa: E402  (the script's argument parsing)


def test_plan_runs_teacher_first_then_four_students_per_seed():
    jobs = plan(["epochs=1", "data=synthetic"], seeds=[42, 43], group="out/repro")
    assert [(job.label, job.seed) for job in jobs] == [
        (job.label, seed) for seed in (42, 43) for job in TUTORIAL_JOBS
    ]
    teacher, kd = jobs[0], jobs[2]
    assert teacher.command[:3] == train_command() and teacher.command[3:] == teacher.overrides
    assert "model=deep" in teacher.overrides and "seed=42" in teacher.overrides
    assert kd.overrides[:2] == ["loss=kd", "T=2"]
    # User overrides come last (Hydra: the last value wins), progress bars off unless asked for.
    assert kd.overrides[-3:] == ["quiet=true", "epochs=1", "data=synthetic"]
    assert "hydra.run.dir=out/repro/student-kd-seed42" in kd.overrides and kd.folder == "out/repro/student-kd-seed42"
    assert "quiet=true" not in plan(["quiet=false"])[0].command
    assert [job.label for job in plan([], reuse_teacher=True)] == [job.label for job in TUTORIAL_JOBS[1:]]
    with pytest.raises(KDResearchError, match="not both"):
        plan(["seed=3"], seeds=[1, 2])
    assert override_value(["tracking.uri=a", "x=1", "tracking.uri='b'"], "tracking.uri") == "b"
    assert override_value(["tracking.uri=null"], "tracking.uri") is None


@pytest.mark.parametrize("argv", [
    ["--seeds", "42", "43", "epochs=1"],
    ["epochs=1", "--seeds", "42", "43"],
    ["seeds=[42,43]", "epochs=1"],
    ["--dry-run", "epochs=1", "seeds=42,43"],
])
def test_seed_syntaxes(argv):
    args = reproduce_tutorial.parse_args(argv)
    assert args.seeds == [42, 43] and args.overrides == ["epochs=1"]


def test_dry_run_prints_the_commands(capsys):
    assert reproduce_tutorial.main(["--dry-run", "--seeds", "1", "2", "data=synthetic"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("python ") and "model=deep seed=1" in lines[0]
    assert all(line.endswith("quiet=true data=synthetic") for line in lines)


def test_reproduce_tags_and_compares_its_runs(tmp_path, monkeypatch):
    """The orchestration with the jobs trained in-process instead of as subprocesses."""
    uri = tracking_uri(new_store(tmp_path))
    overrides = SMALL + [f"tracking.uri={uri}", f"cache.dir={tmp_path / 'cache'}"]

    monkeypatch.setattr(jobs_module, "run_to_end", train_command_in_process)
    out = tmp_path / "repro"
    result = reproduce(overrides, out=out)
    assert result.warnings == []
    client = MlflowClient(uri)
    runs = [client.get_run(run_id) for run_id in result.run_ids]
    assert [run.info.run_name for run in runs] == NAMES
    assert {run.data.tags["sweep"] for run in runs} == {str(out)}
    teacher_id = result.run_ids[0]
    assert all(run.data.tags["teacher_run_id"] == teacher_id for run in runs[2:])
    rows = result.comparison.rows
    assert [row.label for row in rows] == NAMES
    assert rows[1].is_baseline and not any(row.unfair for row in rows)
    assert (out / "comparison" / "comparison.png").is_file()
    assert "--sweep" in result.compare_command and uri in result.compare_command
    # One parent run holds the reproduction: its jobs are its children, it holds the comparison.
    parent = client.get_run(result.comparison.summary_run_id)
    assert parent.data.tags["role"] == "reproduction" and parent.info.run_name.startswith("reproduce-")
    assert parent.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {parent.info.run_id}
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        "comparison.md", "comparison.csv", "comparison.png"}
    assert "| light-kd-T2 |" in parent.data.tags["mlflow.note.content"]
    # scripts/compare.py --sweep <folder> selects exactly this reproduction again.
    again = select_runs(Tracker(uri, "kdresearch"), sweep=str(out))
    assert {run.info.run_id for run in again} == set(result.run_ids)


@pytest.mark.slow
def test_reproduce_command_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "repro"
    command = [sys.executable, str(SCRIPT), *SMALL, f"tracking.uri={uri}", f"cache.dir={tmp_path / 'cache'}",
               "--out", str(out)]
    done = run_command(command, timeout=1200, cwd=tmp_path)
    output = done.output
    assert done.returncode == 0, output[-6000:]
    table = output[output.index("=== The tutorial's runs"):]
    for name in NAMES:
        assert f"| {name} |" in table
    assert "teacher - student CE:" in table and "baseline" in table

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("kdresearch").experiment_id
    runs = sorted(client.search_runs([experiment]), key=lambda run: run.info.start_time)
    trained = [run for run in runs if run.data.tags.get("role") != "reproduction"]
    assert [run.info.run_name for run in trained] == NAMES
    assert all(run.info.status == "FINISHED" and run.data.tags["sweep"] == str(out) for run in trained)
    assert all(run.data.tags["teacher_run_id"] == trained[0].info.run_id for run in trained[2:])
    (summary,) = [run for run in runs if run.data.tags.get("role") == "reproduction"]
    assert {run.data.tags["mlflow.parentRunId"] for run in trained} == {summary.info.run_id}
    assert summary.info.status == "FINISHED"
    with (out / "comparison" / "comparison.csv").open() as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert list(rows) == NAMES
    for run in trained:  # the table holds what MLflow holds
        final = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/acc"))[-1][1]
        assert float(rows[run.info.run_name]["final_acc_mean"]) == final
    assert {Path(a.path).name for a in client.list_artifacts(summary.info.run_id, "comparison")} == {
        "comparison.md", "comparison.csv", "comparison.png"}
