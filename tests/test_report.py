"""scripts/report.py and kdresearch.reports.html_report on a real sweep: its parent run (the Hydra
callback SweepParentRun, driven as Hydra drives it) and four tiny in-process jobs as its children,
two methods (ce, kd) x two seeds, with a validation split, distilled from one teacher trained
before the sweep. Also the parent's headline metrics and the budget note under a comparison of
runs trained for different numbers of epochs.
"""

from __future__ import annotations

import base64
import csv
import math
import statistics
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import UI_TIMEOUT_MS, browser_page, mlflow_ui, require_browser
from conftest import check_ok, compose_config, job_overrides, load_script, new_store, tracking_uri, train_in_process
from mlflow.tracking import MlflowClient

from kdresearch.reports import html_report
from kdresearch.reports.compare import HEADLINE_PREFIX, RunRecord, build_rows, columns, compare, headline
from kdresearch.reports.statistics import paired_difference
from kdresearch.sweeps.parent_runs import PARENT_FILE, SweepParentRun
from kdresearch.tracking.store import Tracker

SWEEP = ["debug=tiny", "epochs=2", "data.val_size=64", "device=cpu"]
SEEDS = (1, 5)  # seeds whose tiny runs end at different accuracies: intervals to compute
JOBS = {(loss, seed): [f"loss={loss}", f"seed={seed}"] for loss in ("ce", "kd") for seed in SEEDS}

pytestmark = pytest.mark.usefixtures("one_compute_thread")
LABELS = {"ce": "light-ce", "kd": "light-kd-T2"}


@dataclass
class Sweep:
    store: Path
    folder: Path  # the sweep's folder (hydra.sweep.dir), holding mlflow_parent_run.json
    uri: str
    client: MlflowClient
    parent_run_id: str
    run_ids: dict[tuple[str, int], str]

    def history(self, key: tuple[str, int], metric: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_ids[key], metric),
                                        key=lambda m: m.step)]

    def last(self, loss: str, metric: str = "test/acc") -> list[float]:
        """The metric's last value in each seed's run of `loss`, seeds in order."""
        return [self.history((loss, seed), metric)[-1] for seed in SEEDS]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    """The sweep `python train.py -m loss=ce,kd seed=1,5 teacher.run_id=... ...` would run, its jobs
    in this process. One teacher, trained first (an automatic teacher per seed costs seconds more)."""
    store = new_store(tmp_path_factory.mktemp("report"))
    teacher = check_ok(train_in_process(store, "debug=tiny", "model=deep", "device=cpu")).run_id
    overrides = [*SWEEP, f"teacher.run_id={teacher}"]
    folder = store / "multirun" / "sweep-1"
    config = compose_config(*job_overrides(store, *overrides, f"hydra.sweep.dir={folder}"), hydra=True)
    callback = SweepParentRun()
    callback.on_multirun_start(config)
    run_ids = {}
    for key, method in JOBS.items():
        run_ids[key] = check_ok(train_in_process(store, *overrides, *method, sweep=str(folder))).run_id
    callback.on_multirun_end(config)
    return Sweep(store, folder, tracking_uri(store), MlflowClient(tracking_uri(store)), callback.run_id, run_ids)


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory) -> html_report.Report:
    """The report of the sweep, given by its folder (the store comes from its parent record)."""
    return html_report.report(str(sweep.folder), out=tmp_path_factory.mktemp("report-out"))


class Tables(HTMLParser):
    """{table id: [[cell text, ...] per row, header first]} and the attributes of every <img>."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.current, self.cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.current = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self.current is not None:
            self.current.append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.current[-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def rows(self, table: str) -> dict[str, dict[str, str]]:
        """{first cell: {column title: cell}} of a table's body rows."""
        header, *body = self.tables[table]
        return {cells[0]: dict(zip(header, cells)) for cells in body}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_report_holds_the_tables_with_the_numbers_mlflow_holds(sweep, written):
    page = written.path.read_text()
    tables = Tables(page)
    assert {"overview", "headline", "comparison", "differences", "fidelity", "budgets", "lineage", "runs"} <= set(
        tables.tables)

    comparison = tables.rows("comparison")
    assert tables.tables["comparison"][0] == columns(written.comparison.rows)
    assert set(comparison) == {"light-ce", "light-kd-T2"}
    for loss, label in LABELS.items():
        assert comparison[label]["last-epoch test/acc %"] == _mean_std(sweep.last(loss))
        assert comparison[label]["test/acc % at best-val epoch"] == _mean_std(sweep.last(loss, "best/test_acc"))
        assert comparison[label]["n"] == "n=2, < 3 seeds" and comparison[label]["seeds"] == "1 5"
    # KD minus the student alone, paired by seed, from the numbers MLflow holds.
    difference = paired_difference(sweep.last("kd"), sweep.last("ce"))
    assert comparison["light-kd-T2"]["Δ vs student CE [95 % CI]"] == difference.format(2)
    assert comparison["light-kd-T2"]["p vs student CE"] == difference.format_p()
    assert comparison["light-ce"]["Δ vs student CE [95 % CI]"] == "baseline"
    (line,) = [cells for cells in tables.tables["differences"][1:] if cells[:2] == ["light-kd-T2", "light-ce"]]
    assert line[2] == f"{difference.mean:+.4f}" and line[6] == "paired t" and line[7] == "2"

    # Fidelity of the KD runs to their teachers, and budgets, per row.
    fidelity = tables.rows("fidelity")
    assert set(fidelity) == {"light-kd-T2"}  # the student alone has no teacher
    assert fidelity["light-kd-T2"]["test agreement with teacher %"] == _mean_std(sweep.last("kd", "test/agreement"))
    kl = sweep.last("kd", "test/kl_teacher")
    kl_cell = f"{statistics.fmean(kl):.4f} ± {statistics.stdev(kl):.4f}"
    assert fidelity["light-kd-T2"]["test KL(teacher ‖ student)"] == kl_cell
    assert "val agreement with teacher %" in fidelity["light-kd-T2"]
    budgets = tables.rows("budgets")
    steps = sweep.client.get_run(sweep.run_ids[("kd", 1)]).data.metrics["budget/steps"]
    assert budgets["light-kd-T2"]["epochs"] == "2 ± 0" and budgets["light-kd-T2"]["steps"] == f"{steps:.0f} ± 0"
    assert "Budgets differ" not in page  # the same recipe for every row

    # Lineage from the runs' tags; every run listed.
    run = sweep.client.get_run(sweep.run_ids[("ce", 1)])
    lineage = tables.rows("lineage")["light-ce"]
    assert lineage["version.torch"] == run.data.tags["version.torch"]
    if "mlflow.source.git.commit" in run.data.tags:
        assert lineage["git commit"] == run.data.tags["mlflow.source.git.commit"][:12]
    listed = {cells[3] for cells in tables.tables["runs"][1:]}
    assert listed == set(sweep.run_ids.values())

    # One file: inline CSS, the figure inside it, nothing fetched from elsewhere.
    (image,) = tables.images
    assert image["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["src"].split(",", 1)[1]) == written.comparison.figure.read_bytes()
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert 'src="http' not in page and "href=" not in page


def test_report_is_an_artifact_of_the_parent_run(sweep, written, tmp_path):
    assert written.parent_run_id == sweep.parent_run_id and written.artifact == "report/report.html"
    listed = [item.path for item in sweep.client.list_artifacts(sweep.parent_run_id, "report")]
    assert listed == ["report/report.html"]
    downloaded = Path(sweep.client.download_artifacts(sweep.parent_run_id, "report/report.html", str(tmp_path)))
    assert downloaded.read_text() == written.path.read_text()
    # The parent's record of the folder names the store the report was read from.
    assert (sweep.folder / PARENT_FILE).is_file()


def test_parent_carries_the_best_rows_headline_numbers(sweep, written):
    """Chosen on validation (every row has a validation split): the row with the highest mean
    best/val_acc; its mean last-epoch test/acc, 95 % t interval and seed count, as metrics."""
    parent = sweep.client.get_run(sweep.parent_run_id)
    metrics = {key: value for key, value in parent.data.metrics.items() if key.startswith(HEADLINE_PREFIX)}
    val = {loss: statistics.fmean(sweep.last(loss, "best/val_acc")) for loss in LABELS}
    best = max(val, key=val.get)
    accs = sweep.last(best)
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert std > 0  # else there is no interval to check: choose other SEEDS
    from scipy import stats

    half_width = stats.t.ppf(0.975, 1) * std / math.sqrt(2)  # two seeds: one degree of freedom
    assert parent.data.tags["headline.row"] == LABELS[best] and parent.data.tags["headline.chosen_by"] == "best/val_acc"
    assert metrics["headline/test_acc"] == pytest.approx(mean)
    assert metrics["headline/test_acc_std"] == pytest.approx(std)
    assert metrics["headline/seeds"] == 2
    assert metrics["headline/test_acc_ci_half_width"] == pytest.approx(half_width)
    assert metrics["headline/test_acc_ci_low"] == pytest.approx(mean - half_width)
    assert metrics["headline/test_acc_ci_high"] == pytest.approx(mean + half_width)
    assert metrics["headline/val_acc"] == pytest.approx(val[best])
    # The report's headline and its table's best row are the parent's numbers.
    assert written.headline.row.label == LABELS[best]
    assert written.headline.metrics() == pytest.approx(metrics)
    assert Tables(written.path.read_text()).rows("headline")["headline/test_acc"]["value"] == f"{mean:.4f}"


def test_headline_is_chosen_on_validation_when_every_row_has_it():
    def record(run_id, loss, seed, acc, val=None):
        metrics = {} if val is None else {"best/val_acc": val}
        return RunRecord(run_id=run_id, name=f"light-{loss}", start_time=seed, role="student", model="light",
                         loss=loss, seed=seed, hyperparameters={}, parameter_count=1, identity=(("loss", loss),),
                         context=("data", "1"), history={"test/acc": [(1, acc)]}, metrics=metrics)

    # KD is better on test, CE on validation: with validation everywhere, validation chooses.
    with_val = build_rows([record("a", "ce", 1, 50.0, 60.0), record("b", "kd", 1, 55.0, 58.0)])
    assert headline(with_val).row.label == "light-ce" and headline(with_val).chosen_by == "best/val_acc"
    without = build_rows([record("a", "ce", 1, 50.0, 60.0), record("b", "kd", 1, 55.0)])
    assert headline(without).row.label == "light-kd" and headline(without).chosen_by == "test/acc"
    # One seed: the mean and the count, no interval.
    assert set(headline(without).metrics()) == {"headline/test_acc", "headline/seeds",
                                                "headline/delta_vs_student_ce"}
    teacher = record("t", "ce", 1, 90.0)
    teacher.role = "teacher"
    assert headline(build_rows([teacher, record("a", "ce", 1, 50.0)])).row.label == "light-ce"  # students only


def test_rows_trained_for_different_epochs_get_the_budget_note(sweep, tmp_path):
    """A student alone trained for 1 epoch beside the sweep's 2-epoch runs: the note under the
    table (Markdown) names the budgets that differ and which rows have which; the CSV says which."""
    shorter = check_ok(train_in_process(sweep.store, *SWEEP, "epochs=1", "loss=ce", "seed=1"))
    tracker = Tracker(sweep.uri, "kdresearch")
    runs = [sweep.client.get_run(run_id) for run_id in (*sweep.run_ids.values(), shorter.run_id)]
    result = compare(tracker, runs, tmp_path, name="budgets", log_summary=False)
    labels = {row.label: row for row in result.rows}
    assert set(labels) == {"light-ce [epochs=1]", "light-ce [epochs=2]", "light-kd-T2"}
    markdown = result.markdown.read_text()
    table, _, below = markdown.partition("\n\n")[2].partition("\n\n")
    assert table.startswith("| run |")
    assert below.startswith("Budgets differ between the students' rows: epochs (1: light-ce [epochs=1]; "
                            "2: light-ce [epochs=2], light-kd-T2), steps (")
    for key in ("steps", "images"):
        assert f", {key} (" in below
    assert "views_per_image" not in below  # no augmentation: one view per image either way
    lines = _csv(result.csv)
    assert {line["budget_differs"] for line in lines} == {"epochs steps images"}
    assert {line["run"]: line["epochs_mean"] for line in lines}["light-ce [epochs=1]"] == "1.0"
    # The sweep alone (one recipe) gets no note.
    same = compare(tracker, runs[:-1], tmp_path / "same", name="same", log_summary=False)
    assert "Budgets differ" not in same.markdown.read_text()
    assert {line["budget_differs"] for line in _csv(same.csv)} == {""}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_script(sweep, tmp_path, capsys):
    script = load_script("report")
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "SWEEP_OR_BENCHMARK" in capsys.readouterr().out
    status = script.main([sweep.parent_run_id, "--tracking-uri", sweep.uri, "--out", str(tmp_path / "cli"),
                          "--no-log"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert f"wrote {tmp_path / 'cli' / 'report.html'}" in printed.out and "logged" not in printed.out
    # Unknown run ids, runs that lead no group, folders without a parent record: one line, exit 1.
    for target, message in ((("0" * 32), f"error: run {'0' * 32} is not in the MLflow store {sweep.uri}"),
                            (sweep.run_ids[("ce", 1)], f"error: run {sweep.run_ids[('ce', 1)]} (light-ce) has no "
                                                       f"child runs"),
                            (str(tmp_path), f"error: {tmp_path} holds no {PARENT_FILE}")):
        assert script.main([target, "--tracking-uri", sweep.uri]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert script.main(["0" * 32, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 1
    assert capsys.readouterr().err.startswith("error: no MLflow store at")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow  # a browser
def test_report_in_a_browser_shows_tables_and_figures(written, tmp_path):
    require_browser()
    with browser_page(tmp_path) as page:
        page.goto(written.path.resolve().as_uri(), wait_until="load")
        for table in ("headline", "comparison", "differences", "fidelity", "budgets", "lineage", "runs"):
            box = page.locator(f"table#{table}").bounding_box()
            assert box and box["width"] > 0 and box["height"] > 0, table
        assert page.locator("table#comparison tbody tr").count() == 2
        assert page.get_by_text("light-kd-T2", exact=True).first.is_visible()
        figures = page.locator("img, svg")
        assert figures.count() >= 1
        for index in range(figures.count()):
            figure = figures.nth(index)
            box = figure.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50
            if figure.evaluate("element => element.tagName") == "IMG":  # decoded, not a broken image
                assert figure.evaluate("image => image.complete && image.naturalWidth") > 0
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow  # a server and a browser
def test_mlflow_ui_shows_the_report_of_the_parent_run(sweep, written, tmp_path):
    require_browser()
    experiment = sweep.client.get_run(sweep.parent_run_id).info.experiment_id
    artifact = (f"/#/experiments/{experiment}/runs/{sweep.parent_run_id}/artifacts/{written.artifact}"
                f"?workflowType=machine_learning")
    with mlflow_ui(sweep.uri, tmp_path / "mlflow-ui.log") as url, browser_page(tmp_path) as page:
        page.goto(url + artifact, wait_until="domcontentloaded")
        page.get_by_text("report.html", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        shown = page.frame_locator("iframe").first  # MLflow's viewer shows an HTML artifact in a frame
        shown.locator("table#comparison").wait_for(timeout=UI_TIMEOUT_MS)
        assert shown.get_by_text("light-kd-T2", exact=True).first.is_visible()
        box = shown.locator("img.figure").bounding_box()
        assert box and box["width"] > 100 and box["height"] > 50
        page.screenshot(path=str(tmp_path / "mlflow-report.png"))
    assert (tmp_path / "mlflow-report.png").stat().st_size > 10_000
