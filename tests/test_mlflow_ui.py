"""Two tiny training jobs seen through the MLflow UI (`mlflow ui`, the README's command) in headless
Chromium: the runs table, the test/acc chart, and a run's checkpoint and resolved config.

MLflow 3.17's UI picks an experiment's landing view from the workflow last chosen in the browser
(the "GenAI" / "Model training" switch at the top left, kept in the browser's local storage; GenAI
in a new browser), not from the experiment tag `mlflow.experimentKind`: the test makes that choice
once, as the README tells users to, and then opens the experiment's plain URL. The GenAI overview
opens a "Detect Issues" tip a moment after it loads, which blocks clicks until "Got it" is pressed:
`browser_page` presses it whenever it appears (CI lost that race once on a busy machine).
"""

from __future__ import annotations

import pytest
from browser import UI_TIMEOUT_MS, browser_page, mlflow_ui, require_browser
from conftest import check_ok, experiment_runs, tracking_uri, train_in_process

JOBS = {"light-ce": ("loss=ce",), "deep-ce": ("model=deep", "loss=ce")}
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CHART_CARD = "experiment-view-compare-runs-card"  # data-testid of one metric chart
CHART_SEARCH = "Search metric charts"  # placeholder of the chart view's search box
PLOTTED_POINTS = ".js-plotly-plot .scatterlayer path.point"  # the markers of the chart's lines


@pytest.fixture
def trained(store, client):
    """The store after two 2-epoch tiny jobs: {run name: run}."""
    require_browser()  # skip before the training when there is nothing to look with
    for overrides in JOBS.values():
        check_ok(train_in_process(store, "debug=tiny", "epochs=2", *overrides))
    runs = {run.info.run_name: run for run in experiment_runs(client)}
    assert set(runs) == set(JOBS)
    return runs


@pytest.mark.slow  # a server and a browser
def test_mlflow_ui_shows_runs_metric_chart_and_artifacts(store, client, trained, tmp_path):
    expect = require_browser().expect
    experiment_id = trained["light-ce"].info.experiment_id
    light_ce = trained["light-ce"].info.run_id
    key, kind = EXPERIMENT_KIND
    assert client.get_experiment(experiment_id).tags[key] == kind
    for run in trained.values():  # two points per run in the chart
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test/acc")) == [1, 2]

    plain = f"/#/experiments/{experiment_id}"
    with mlflow_ui(tracking_uri(store), tmp_path / "mlflow-ui.log") as url, browser_page(tmp_path) as page:
        # A new browser opens the experiment on the GenAI overview, tag or not: choose "Model training"
        # once, as the README says (a no-op where the UI already shows the runs).
        page.goto(url + plain, wait_until="domcontentloaded")
        page.get_by_text("Model training", exact=True).first.click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("light-ce", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)

        # The experiment's plain URL, loaded afresh, now opens on the runs table.
        page.goto("about:blank")
        page.goto(url + plain, wait_until="domcontentloaded")
        for name in JOBS:
            page.get_by_text(name, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        assert f"{plain}/runs" in page.url
        page.screenshot(path=str(tmp_path / "mlflow-runs.png"))

        # The chart view: a test/acc card with a line of two points (epochs) per run.
        page.locator("label").filter(has=page.locator("input[name='runs-view-mode'][value='CHART']")).click()
        # Runs log more metrics than one screen of cards (budget/*, fidelity, ...), and cards off screen
        # are not drawn: find the chart as a user does, by the chart search box.
        page.get_by_placeholder(CHART_SEARCH).fill("test/acc")
        card = page.get_by_test_id(CHART_CARD).filter(has=page.get_by_text("test/acc", exact=True))
        for name in JOBS:
            card.get_by_text(f"{name} (test/acc)", exact=True).wait_for(timeout=UI_TIMEOUT_MS)
        # The legend comes first; the plot is drawn once the metric histories have arrived.
        expect(card.locator(PLOTTED_POINTS)).to_have_count(2 * len(JOBS), timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "mlflow-charts.png"))

        # A run's artifacts (plain URL): the final checkpoint and the resolved config, shown.
        page.goto(f"{url}{plain}/runs/{light_ce}/artifacts", wait_until="domcontentloaded")
        page.get_by_text("checkpoints", exact=True).first.click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("final.pt", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        page.get_by_text("config", exact=True).first.click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("config.yaml", exact=True).first.click(timeout=UI_TIMEOUT_MS)
        page.get_by_text("config/config.yaml", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        page.get_by_text("kdresearch.losses.ce.CrossEntropy").first.wait_for(timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "mlflow-artifacts.png"))

        # The run's own "Model metrics" tab (plain URL) charts test/acc too.
        page.goto(f"{url}{plain}/runs/{light_ce}/model-metrics", wait_until="domcontentloaded")
        page.get_by_placeholder(CHART_SEARCH).fill("test/acc")
        card = page.get_by_test_id(CHART_CARD).filter(has=page.get_by_text("light-ce (test/acc)", exact=True))
        expect(card.locator(PLOTTED_POINTS)).to_have_count(2, timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "mlflow-run-metrics.png"))
    for shot in ("runs", "charts", "artifacts", "run-metrics"):
        assert (tmp_path / f"mlflow-{shot}.png").stat().st_size > 10_000, shot
