"""kdresearch.compare and scripts/compare.py on real runs in a temporary MLflow store, plus the MLflow
UI showing them in a headless browser.

The module's runs (trained once, in-process, synthetic data, 2 epochs): the teacher, student CE at
seeds 42 and 43, student KD at seed 42 (sweep "sweep-a"), and a multimargin student at seed 7
(sweep "sweep-b"), whose initial weights differ from the CE baseline's.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser import UI_TIMEOUT_MS, browser_page, mlflow_ui, require_browser
from conftest import FAST, REPO_ROOT, compose_job, load_script, run_command
from mlflow.tracking import MlflowClient

from kdresearch.errors import KDResearchError
from kdresearch.reports.compare import (
    ARTIFACT_DIR,
    HISTORY_KEYS,
    Comparison,
    RunRecord,
    build_rows,
    compare,
    markdown_table,
    read_run,
    select_runs,
    write_csv,
)
from kdresearch.tracking.store import Tracker
from kdresearch.training.job import run_job

SMALL = [*FAST, "epochs=2", "teacher.epochs=2", "device=cpu"]  # the deep run is the teacher
JOBS = {  # key: (overrides, sweep tag)
    "teacher": (["model=deep"], "sweep-a"),
    "ce42": (["loss=ce"], "sweep-a"),
    "kd42": (["loss=kd", "T=2"], "sweep-a"),
    "ce43": (["loss=ce", "seed=43"], "sweep-a"),
    "mm7": (["loss=multimargin", "seed=7"], "sweep-b"),
}


@dataclass
class Store:
    folder: Path
    uri: str
    ids: dict[str, str]
    tracker: Tracker
    client: MlflowClient
    comparison: Comparison

    def final_acc(self, key: str) -> float:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.ids[key], "test/acc"))[-1][1]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Store:
    folder = tmp_path_factory.mktemp("compare")
    ids = {}
    for key, (overrides, sweep) in JOBS.items():
        ids[key] = run_job(compose_job(folder, *SMALL, *overrides), folder / key, overrides=tuple(overrides),
                           sweep=sweep).run_id
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri, "kdresearch")
    comparison = compare(tracker, select_runs(tracker), folder / "out", name="comparison-test",
                         selection={"experiment": "kdresearch"})
    return Store(folder, uri, ids, tracker, MlflowClient(uri), comparison)


def _row(store: Store, key: str):
    return next(row for row in store.comparison.rows if store.ids[key] in [run.run_id for run in row.runs])


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {line["run"]: line for line in csv.DictReader(handle)}


def test_table_values_equal_what_mlflow_holds(compared):
    client = compared.client
    records = [read_run(client, run) for run in select_runs(compared.tracker)]
    rows = build_rows(records, per_run=True)
    assert len(rows) == len(JOBS)
    table = _csv(compared.comparison.csv)
    for row in rows:
        run_id = row.first.run_id
        run = client.get_run(run_id)
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                   for key in ("test/acc", "first_layer_norm", "epoch_seconds")}
        acc = [value for _, value in history["test/acc"]]
        assert [step for step, _ in history["test/acc"]] == [1, 2]
        assert row.first.name == run.info.run_name
        assert row.stat("final_acc").mean == acc[-1]
        assert row.stat("best_acc").mean == max(acc)
        assert row.stat("init_norm").mean == history["first_layer_norm"][0][1]
        assert history["first_layer_norm"][0][0] == 0
        assert row.stat("final_norm").mean == history["first_layer_norm"][-1][1]
        assert row.stat("train_seconds").mean == pytest.approx(sum(v for _, v in history["epoch_seconds"]))
        assert row.first.parameter_count == int(run.data.params["parameter_count"])
        assert row.first.loss == run.data.tags["loss"] and row.first.model == run.data.tags["model"]
        # The written table (one row per configuration) holds the same numbers for one-seed rows.
        if run_id in (compared.ids["teacher"], compared.ids["kd42"], compared.ids["mm7"]):
            line = table[run.info.run_name]
            assert line["run_ids"] == run_id
            assert float(line["final_acc_mean"]) == acc[-1]
            assert float(line["best_acc_mean"]) == max(acc)
            assert float(line["init_norm_mean"]) == history["first_layer_norm"][0][1]
            assert int(line["parameter_count"]) == int(run.data.params["parameter_count"])
            assert line["final_acc_std"] == ""
            assert f"| {acc[-1]:.2f} |" in compared.comparison.markdown.read_text()


def test_hyperparameter_columns(compared):
    kd = _row(compared, "kd42")
    assert {key: kd.first.hyperparameters[key] for key in ("T", "ce_weight", "distill_weight")} == {
        "T": "2", "ce_weight": "0.75", "distill_weight": "0.25"}
    # Columns: every loss.* key that differs between the rows (multimargin's p, margin, weight; kd's T, ...).
    rows = [kd, _row(compared, "mm7")]
    header, _, first = markdown_table(rows).splitlines()[:3]
    titles = [cell.strip() for cell in header.strip("| ").split(" | ")]
    assert {"loss.T", "loss.ce_weight", "loss.distill_weight", "loss.p", "loss.margin"} <= set(titles)
    cells = dict(zip(titles, (cell.strip() for cell in first.strip("| ").split(" | "))))
    assert cells["loss.T"] == "2" and cells["loss.distill_weight"] == "0.25" and cells["loss.p"] == "—"
    assert "loss.T" not in markdown_table([kd]).splitlines()[0]  # one row: nothing varies
    assert _row(compared, "teacher").first.parameter_count == 1_186_986
    assert kd.first.parameter_count == 267_738


def test_baseline_difference(compared):
    ce42, ce43 = compared.final_acc("ce42"), compared.final_acc("ce43")
    baseline = _row(compared, "ce42")
    assert baseline.is_baseline and baseline.note == "baseline" and baseline.delta == pytest.approx(0.0)
    # Same seeds as the baseline: paired with its seed-42 run.
    assert _row(compared, "kd42").delta == pytest.approx(compared.final_acc("kd42") - ce42)
    assert _row(compared, "teacher").delta == pytest.approx(compared.final_acc("teacher") - ce42)
    # A seed the baseline lacks: compared with the baseline's mean over all its seeds.
    assert _row(compared, "mm7").delta == pytest.approx(compared.final_acc("mm7") - (ce42 + ce43) / 2)
    table = _csv(compared.comparison.csv)
    assert float(table["light-kd-T2"]["delta_vs_baseline"]) == pytest.approx(compared.final_acc("kd42") - ce42)
    assert {line["baseline"] for line in table.values()} == {"light-ce"}


def test_seeds_give_mean_and_std(compared):
    ce = _row(compared, "ce42")
    accs = [compared.final_acc("ce42"), compared.final_acc("ce43")]
    assert ce.seeds == [42, 43]
    assert ce.stat("final_acc").mean == pytest.approx(statistics.fmean(accs))
    assert ce.stat("final_acc").std == pytest.approx(statistics.stdev(accs))
    line = _csv(compared.comparison.csv)["light-ce"]
    assert line["n"] == "2" and line["seeds"] == "42 43"
    assert float(line["final_acc_std"]) == pytest.approx(statistics.stdev(accs))
    assert f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}" in compared.comparison.markdown.read_text()


def test_unequal_init_is_flagged(compared):
    mm, kd, teacher, ce = (_row(compared, key) for key in ("mm7", "kd42", "teacher", "ce42"))
    assert mm.first.init_norm != pytest.approx(ce.runs[0].init_norm)  # seed 7 starts elsewhere
    assert mm.unfair and mm.note.startswith("UNFAIR")
    assert not kd.unfair and kd.first.init_norm == ce.runs[0].init_norm
    assert not teacher.unfair and not ce.unfair
    table = _csv(compared.comparison.csv)
    assert table["light-multimargin"]["unfair_init"] == "True"
    assert {table[name]["unfair_init"] for name in ("deep-ce", "light-ce", "light-kd-T2")} == {"False"}
    assert "UNFAIR" in compared.comparison.markdown.read_text()


def test_files_and_summary_run(compared, tmp_path):
    result = compared.comparison
    assert result.markdown.read_text().startswith("# comparison-test")
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_csv(result.csv)) == 4  # teacher, CE (2 seeds), KD, multimargin
    summary = compared.client.get_run(result.summary_run_id)
    assert summary.info.run_name == "comparison-test" and summary.info.status == "FINISHED"
    assert summary.data.tags["role"] == "summary"
    assert set(summary.data.tags["compared_runs"].split()) == set(compared.ids.values())
    assert "light-kd-T2" in summary.data.tags["mlflow.note.content"]
    listed = {Path(item.path).name for item in compared.client.list_artifacts(result.summary_run_id, ARTIFACT_DIR)}
    assert listed == {"comparison.md", "comparison.csv", "comparison.png"}
    downloaded = compared.tracker.download_artifact(result.summary_run_id, f"{ARTIFACT_DIR}/comparison.md", tmp_path)
    assert downloaded.read_text() == result.markdown.read_text()
    # Summary runs are never compared themselves.
    assert result.summary_run_id not in [run.info.run_id for run in select_runs(compared.tracker)]


def test_selection(compared):
    def ids(runs):
        return {run.info.run_id for run in runs}

    tracker, run_ids = compared.tracker, compared.ids
    assert ids(select_runs(tracker)) == set(run_ids.values())
    assert ids(select_runs(tracker, sweep="sweep-b")) == {run_ids["mm7"]}
    assert ids(select_runs(tracker, sweep="sweep-a")) == {run_ids[k] for k in ("teacher", "ce42", "kd42", "ce43")}
    assert ids(select_runs(tracker, tags={"loss": "kd"})) == {run_ids["kd42"]}
    assert ids(select_runs(tracker, tags={"role": "student"}, filter_string="params.seed = '43'")) == {run_ids["ce43"]}
    assert ids(select_runs(tracker, [run_ids["kd42"], run_ids["teacher"]])) == {run_ids["kd42"], run_ids["teacher"]}
    with pytest.raises(KDResearchError, match="no runs matching"):
        select_runs(tracker, sweep="no-such-sweep")
    with pytest.raises(KDResearchError, match="not both"):
        select_runs(tracker, [run_ids["kd42"]], sweep="sweep-a")
    with pytest.raises(KDResearchError, match="is not in the MLflow store"):
        select_runs(tracker, ["0" * 32])
    with pytest.raises(KDResearchError, match="bad run filter"):
        select_runs(tracker, filter_string="params.seed ~~ 4")


def _record(run_id, name, seed, start, acc, init=2.3274, loss="ce", role="student", identity=(("loss", "ce"),)):
    return RunRecord(run_id=run_id, name=name, start_time=start, role=role, model="light", loss=loss, seed=seed,
                     hyperparameters={}, parameter_count=1, identity=identity,
                     context=("data", "1"), history={"test/acc": [(1, acc)], "first_layer_norm": [(0, init)]})


def test_rows_newest_run_per_seed_and_readable_labels():
    lr_1e3 = (("loss", "ce"), ("optimizer.lr", "0.001"))
    records = [
        _record("a", "light-ce", 42, 1, 50.0, identity=lr_1e3),
        _record("b", "light-ce", 42, 2, 60.0, identity=lr_1e3),  # the same configuration and seed again
        _record("c", "light-ce", 42, 3, 40.0, identity=(("loss", "ce"), ("optimizer.lr", "0.01"))),
    ]
    rows = build_rows(records)
    assert [[run.run_id for run in row.runs] for row in rows] == [["b"], ["c"]]
    assert [row.label for row in rows] == ["light-ce [optimizer.lr=0.001]", "light-ce [optimizer.lr=0.01]"]
    assert rows[1].delta == pytest.approx(-20.0)
    assert build_rows(records, baseline="c")[0].delta == pytest.approx(20.0)
    with pytest.raises(KDResearchError, match="baseline 'x'"):
        build_rows(records, baseline="x")


def test_compare_script(compared, tmp_path, capsys):
    """scripts/compare.py: `--help` as a real process, the comparisons through its main()."""
    script = REPO_ROOT / "scripts" / "compare.py"
    done = run_command([sys.executable, str(script), "--help"], timeout=120)
    assert done.returncode == 0 and "--sweep" in done.stdout and "--run-ids" in done.stdout
    compare_script = load_script("compare")
    out = tmp_path / "cli"
    status = compare_script.main(["--tracking-uri", compared.uri, "--sweep", "sweep-a", "--out", str(out),
                                  "--name", "comparison-cli"])
    printed = capsys.readouterr()
    assert status == 0, printed.out + printed.err
    for name in ("deep-ce", "light-ce", "light-kd-T2", "baseline"):
        assert name in printed.out
    assert "multimargin" not in printed.out
    assert all((out / f"comparison.{ext}").is_file() for ext in ("md", "csv", "png"))
    summaries = compared.client.search_runs([compared.tracker.experiment_id], "tags.role = 'summary'")
    assert "comparison-cli" in {run.info.run_name for run in summaries}
    status = compare_script.main(["--tracking-uri", compared.uri, "--sweep", "nope"])
    assert status == 1 and capsys.readouterr().err.startswith("error: no runs matching")


# --- the MLflow UI in a real browser -------------------------------------------------------------------

@pytest.mark.slow  # a server and a browser
def test_mlflow_ui_lists_runs_and_comparison(compared, tmp_path):
    require_browser()
    experiment = compared.tracker.experiment_id
    summary = compared.comparison.summary_run_id
    # The README's command, on the temporary store and a free port.
    with mlflow_ui(compared.uri, tmp_path / "mlflow-ui.log") as url, browser_page(tmp_path) as page:
        # MLflow 3's UI opens on its GenAI view; workflowType picks the "Model training" runs table.
        page.goto(f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning",
                  wait_until="domcontentloaded")
        page.get_by_text("light-kd-T2", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "mlflow-runs.png"))
        for name in ("deep-ce", "light-ce", "light-kd-T2", "light-multimargin", "comparison-test"):
            assert page.get_by_text(name, exact=True).first.is_visible(), name

        page.goto(f"{url}/#/experiments/{experiment}/runs/{summary}/artifacts/{ARTIFACT_DIR}/comparison.md"
                  f"?workflowType=machine_learning", wait_until="domcontentloaded")
        page.get_by_text("comparison.png", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("light-kd-T2").first.wait_for(timeout=60_000)  # the Markdown file's content
        page.screenshot(path=str(tmp_path / "mlflow-comparison.png"))
        for name in ("comparison.md", "comparison.csv", "comparison.png"):
            assert page.get_by_text(name, exact=True).first.is_visible(), name
    assert (tmp_path / "mlflow-runs.png").stat().st_size > 10_000
    assert (tmp_path / "mlflow-comparison.png").stat().st_size > 10_000


def test_test_accuracy_at_the_best_validation_epoch_has_its_own_column():
    record = _record("a" * 32, "light-ce", 42, 1, 50.0)
    record.history["best/test_acc"] = [(1, 48.0), (2, 51.5)]  # as of each epoch: the last one counts
    (row,) = build_rows([record])
    assert row.stat("best_val_test_acc").mean == 51.5
    header, _, line = markdown_table([row]).splitlines()[:3]
    assert "test/acc % at best-val epoch" in header and "| 51.50 |" in line
    assert "max test/acc % (epoch chosen on test)" in header  # best-on-test only under a name that says so


def test_histories_are_read_only_for_the_runs_in_the_table(tmp_path):
    """A rerun of one configuration and seed supersedes the older run, whose histories are never read;
    best/test_acc is the run's latest value, read without its history."""
    histories = {
        "old": {"test/acc": [(1, 40.0)], "first_layer_norm": [(0, 2.0), (1, 2.4)]},
        "new": {"test/acc": [(1, 50.0), (2, 55.0), (3, 54.0)], "first_layer_norm": [(0, 2.0), (3, 2.6)],
                "epoch_seconds": [(1, 1.0), (2, 2.0), (3, 0.5)], "train/loss": [(1, 1.5), (2, 1.2), (3, 1.1)]},
    }
    read = []

    class Client:
        def get_metric_history(self, run_id, key):
            read.append((run_id, key))
            return [SimpleNamespace(step=step, value=value) for step, value in histories[run_id].get(key, [])]

    def run(run_id, start, best_val_test_acc):
        params = {"seed": "42", "epochs": "3", "loss.name": "ce", "model.name": "light", "parameter_count": "10"}
        tags = {"role": "student", "loss": "ce", "model": "light", "data_fingerprint": "data"}
        metrics = {"test/acc": histories[run_id]["test/acc"][-1][1], "best/test_acc": best_val_test_acc}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name="light-ce", start_time=start),
                               data=SimpleNamespace(params=params, tags=tags, metrics=metrics))

    result = compare(SimpleNamespace(client=Client()), [run("new", 2, 55.0), run("old", 1, 40.0)], tmp_path,
                     name="rerun", log_summary=False)
    assert {run_id for run_id, _ in read} == {"new"}
    assert sorted(key for _, key in read) == sorted(HISTORY_KEYS) and "best/test_acc" not in HISTORY_KEYS
    (row,) = result.rows
    assert [run.run_id for run in row.runs] == ["new"] and row.is_baseline
    assert row.stat("final_acc").mean == 54.0 and row.stat("best_acc").mean == 55.0
    assert row.stat("best_val_test_acc").mean == 55.0
    assert (row.first.init_norm, row.first.final_norm, row.first.train_seconds) == (2.0, 2.6, 3.5)
    line = _csv(result.csv)["light-ce"]
    assert line["run_ids"] == "new" and line["best_val_test_acc_mean"] == "55.0" and line["final_norm_std"] == ""


def test_csv_keeps_integers_and_empty_cells(tmp_path):
    records = [_record("a", "light-ce", 42, 1, 50.0),
               _record("b", "light-kd", 42, 2, 60.0, loss="kd", identity=(("loss", "kd"),))]
    records[1].parameter_count, records[1].hyperparameters = None, {"T": "2"}
    path = write_csv(build_rows(records), tmp_path / "comparison.csv")
    assert path.read_bytes().count(b"\r\n") == 3  # header and two lines, as the csv module ends them
    ce, kd = _csv(path)["light-ce"], _csv(path)["light-kd"]
    assert (ce["parameter_count"], kd["parameter_count"]) == ("1", "")
    assert (ce["loss.T"], kd["loss.T"], ce["n"], ce["unfair_init"]) == ("", "2", "1", "False")
    assert (ce["final_acc_mean"], ce["final_acc_std"], kd["delta_vs_baseline"]) == ("50.0", "", "10.0")
