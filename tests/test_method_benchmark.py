"""The method benchmark: per pair and seed the student alone and each method, one teacher per seed,
a table in the field's layout (rows methods, columns pairs) with numbers read back from MLflow."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import mlflow_client, tracking_uri, train_command_in_process

import kdresearch.pipelines.method_benchmark as method_benchmark
from kdresearch.errors import KDResearchError
from kdresearch.pipelines import jobs as jobs_module
from kdresearch.pipelines.published_figures import PublishedFigure
from kdresearch.reports import html_report
from kdresearch.tracking.store import metric_history

PAIR = "cifar100_res56_res20"
# The pair's models on tiny synthetic data; one epoch for student and teacher.
TINY = ["data=synthetic", "debug=tiny", "data.limit_train=128", "data.limit_test=64", "device=cpu"]


def test_plan_orders_student_alone_then_methods_per_seed():
    jobs = method_benchmark.plan([PAIR], ["kd", "kd loss.standardize=true"], [1, 2], ["epochs=3"], "out/b")
    assert [(job.label, job.seed) for job in jobs] == [
        (f"{PAIR}|{method}", seed) for seed in (1, 2) for method in ("ce", "kd", "kd loss.standardize=true")]
    overrides = jobs[2].overrides
    assert overrides[:3] == [f"experiment={PAIR}", "loss=kd", "loss.standardize=true"]
    assert overrides[-1] == "epochs=3"  # user overrides last: they win over the preset
    with pytest.raises(KDResearchError, match="not an experiment preset"):
        method_benchmark.plan(["nope"], ["kd"], [1], [], "out")


class _Runs:
    """Just enough of an MlflowClient for build_table: runs with tags and a test/acc history."""

    def __init__(self, runs: dict[str, tuple[dict, list[float]]]):
        self.runs = runs

    def get_run(self, run_id):
        tags, _ = self.runs[run_id]
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags))

    def get_metric_history(self, run_id, key):
        _, accs = self.runs[run_id]
        return [SimpleNamespace(step=step, value=acc) for step, acc in enumerate(accs, 1)] if key == "test/acc" else []


def test_students_sharing_a_teacher_count_it_once():
    shared = {"teacher_run_id": "t"}
    client = _Runs({"t": ({}, [70.0]), "ce1": ({}, [60.0]), "ce2": ({}, [61.0]),
                    "kd1": (shared, [63.0]), "kd2": (shared, [64.5])})
    jobs = [jobs_module.PlannedJob(f"{PAIR}|{method}", seed, f"{method}{seed}", [], [f"{method}{seed}"])
            for seed in (1, 2) for method in ("ce", "kd")]
    table = method_benchmark.build_table(client, jobs, [PAIR], ["kd"], {})
    teacher = table.cells[("teacher", PAIR)]
    assert teacher.last.n == 1 and teacher.last.mean == 70.0 and "(n=1, < 3 seeds)" in teacher.format()
    assert table.cells[("kd", PAIR)].vs_student.n == 2


@pytest.mark.slow  # six resnet56/resnet20 jobs: about a minute on an idle 2-core machine
def test_benchmark_table_holds_mlflow_numbers(tmp_path, monkeypatch):
    overrides = [*TINY, f"tracking.uri={tracking_uri(tmp_path)}", f"cache.dir={tmp_path / 'cache'}"]

    monkeypatch.setattr(jobs_module, "run_to_end", train_command_in_process)
    result = method_benchmark.benchmark([PAIR], ["kd", "dkd"], [1, 2], overrides, out=tmp_path / "bench")
    client = mlflow_client(tmp_path)
    table = result.table
    assert table.methods == ["teacher", "ce", "kd", "dkd"] and table.pairs == [PAIR]

    def last_acc(run_id):
        return metric_history(client, run_id, ["test/acc"])["test/acc"][-1][1]

    for job in result.jobs:
        assert client.get_run(job.run_ids[-1]).data.tags["sweep"] == str(tmp_path / "bench")
    for method in ("ce", "kd", "dkd"):
        accs = [last_acc(job.run_ids[-1]) for job in result.jobs if job.label == f"{PAIR}|{method}"]
        cell = table.cells[(method, PAIR)]
        assert cell.last.n == 2 and cell.last.mean == pytest.approx(statistics.fmean(accs))
        assert cell.last.std == pytest.approx(statistics.stdev(accs))
    # One teacher per seed, shared by that seed's methods.
    teachers = {job.seed: {client.get_run(job.run_ids[-1]).data.tags["teacher_run_id"]}
                for job in result.jobs if not job.label.endswith("|ce")}
    assert len({next(iter(t)) for t in teachers.values()}) == 2
    assert table.cells[("teacher", PAIR)].last.n == 2
    # Published figures from the cited file, with our difference.
    kd = table.cells[("kd", PAIR)]
    assert kd.published == PublishedFigure(70.66, "repdistiller", epochs=240, views=1)
    assert f"pub. 70.66, {kd.last.mean - 70.66:+.2f}" in table.markdown()
    assert Path(result.markdown_path).read_text().count(f"| method | {PAIR} |") == 1
    # Two seeds per method: counted and marked; each method's difference to the student alone, paired by seed.
    assert "(n=2, < 3 seeds)" in table.cells[("ce", PAIR)].format()
    assert kd.vs_student.test == "paired t" and kd.vs_student.n == 2
    assert f"| kd − ce | {kd.vs_student.format(2)}, p {kd.vs_student.format_p()} |" in table.markdown()
    # One parent run holds the benchmark: every run of its jobs (automatic teachers included) is
    # its child, and it holds the table.
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["role"] == "benchmark" and parent.info.status == "FINISHED"
    children = {run.info.run_id for run in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert children == {run_id for job in result.jobs for run_id in job.run_ids}
    assert [Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "benchmark")] == ["benchmark.md"]
    assert f"| {PAIR} |" in parent.data.tags["mlflow.note.content"]
    # Its headline metrics: the best method's cell (no validation split: chosen on test/acc; the
    # teachers are no candidates), and the report of the benchmark, given by its folder.
    best = max(("ce", "kd", "dkd"), key=lambda method: table.cells[(method, PAIR)].last.mean)
    assert parent.data.metrics["headline/test_acc"] == pytest.approx(table.cells[(best, PAIR)].last.mean)
    assert parent.data.metrics["headline/seeds"] == 2 and parent.data.tags["headline.chosen_by"] == "test/acc"
    written = html_report.report(str(tmp_path / "bench"), out=tmp_path / "report")
    page = written.path.read_text()
    assert html_report.html_table(*table.grids()[0], "benchmark-0") in page
    assert html_report.html_table(*table.grids()[1], "benchmark-1") in page
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "report")] == ["report/report.html"]
