"""One self-contained HTML page for a group of runs (a sweep's, a method benchmark's or a
reproduction's parent run), logged to that parent as the artifact report/report.html so that
MLflow's UI shows it beside the runs.

The page holds, for the parent's finished child runs (the latest run of each configuration, as
the parent's own table counts them):

- the headline: the best configuration's numbers, as the parent carries them as metrics
  (kdresearch.reports.compare.headline);
- the comparison table of kdresearch.reports.compare (rows, differences to the student alone and
  to KD with their 95 % intervals and p-values from kdresearch.reports.statistics), its footnote,
  and a note when the rows were trained for different budgets; for a benchmark also its own
  table in the field's layout (kdresearch.pipelines.method_benchmark), rebuilt from MLflow;
- the comparison's figure: accuracy and loss per epoch (mean over seeds, band ± std) and the
  differences with their intervals;
- the differences, fidelity to the teacher (agreement, KL), budgets (`budget/*`) and lineage
  (git commit, versions) per row, and the runs behind every row.

Nothing is recomputed differently from the tables: every number comes from the same rows. The
page has no external reference (inline CSS, the figure as a base64 PNG), so it opens anywhere,
inside MLflow's artifact viewer too.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from kdresearch.errors import KDResearchError, first_line
from kdresearch.reports.compare import Comparison, Headline, Row, budget_note, compare, headline, table_grid
from kdresearch.reports.statistics import Difference, format_p, seed_count
from kdresearch.sweeps.parent_runs import PARENT_FILE, children, finished_runs, latest_per_configuration, parent_record
from kdresearch.tracking import names
from kdresearch.tracking.store import Tracker, check_uri, default_tracking_uri, sqlite_path
from kdresearch.training.budget import PREFIX as BUDGET_PREFIX

log = logging.getLogger(__name__)

ARTIFACT_DIR = "report"
FILE_NAME = "report.html"
DEFAULT_EXPERIMENT = "kdresearch"
GROUP_ROLES = (names.SWEEP_ROLE, names.BENCHMARK_ROLE, names.REPRODUCTION_ROLE)
# (metric, column title, digits): the student's fidelity to its teacher (kdresearch.training.job).
FIDELITY = (("test/agreement", "test agreement with teacher %", 2),
            ("test/kl_teacher", "test KL(teacher ‖ student)", 4),
            ("val/agreement", "val agreement with teacher %", 2),
            ("val/kl_teacher", "val KL(teacher ‖ student)", 4))
GIT_COMMIT = "mlflow.source.git.commit"
LINEAGE = (GIT_COMMIT, "git.dirty", "host.gpu")  # then every version.* tag the runs carry

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 110em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
p.footnote { font-size: 0.8em; color: #555; max-width: 80em; }
p.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em; max-width: 80em; }
img.figure { max-width: 100%; height: auto; border: 1px solid #ddd; }
code { font-size: 0.9em; }
"""


@dataclass
class Report:
    parent_run_id: str
    name: str
    path: Path  # the HTML file written
    comparison: Comparison  # the table's rows and figure
    headline: Optional[Headline]
    artifact: Optional[str] = None  # its artifact path in the parent run, once logged


# --- the parent run ---------------------------------------------------------------------------------

def _target_run(target: str, tracking_uri: Optional[str]) -> tuple[str, str]:
    """(run id, tracking URI) of `target`: a parent run id, or a sweep or benchmark folder holding
    PARENT_FILE (whose store is then the default)."""
    folder = Path(target).expanduser()
    if folder.is_dir():
        record = parent_record(folder)
        if record is None:
            raise KDResearchError(f"{folder} holds no {PARENT_FILE}: give the folder of a sweep or benchmark, "
                                  f"or its parent run id")
        return record["run_id"], tracking_uri or record.get("tracking_uri") or default_tracking_uri()
    if "/" in target or folder.exists():
        raise KDResearchError(f"{target} is no folder: give the folder of a sweep or benchmark, or its parent run id")
    return target, tracking_uri or default_tracking_uri()


def open_parent_run(target: str, tracking_uri: Optional[str] = None):
    """(Tracker on the parent's experiment, the parent MLflow run) for `target` (see `_target_run`)."""
    from mlflow.exceptions import MlflowException

    run_id, uri = _target_run(target, tracking_uri)
    check_uri(uri)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise KDResearchError(f"no MLflow store at {database}: give --tracking-uri of the store "
                              f"the sweep or benchmark was tracked in")
    tracker = Tracker(uri, DEFAULT_EXPERIMENT)
    try:
        parent = tracker.client.get_run(run_id)
    except MlflowException:
        raise KDResearchError(f"run {run_id} is not in the MLflow store {uri}") from None
    experiment = tracker.client.get_experiment(parent.info.experiment_id).name
    if experiment != tracker.experiment_name:  # its children are searched in its own experiment
        tracker = Tracker(uri, experiment)
    return tracker, parent


def finished_children(tracker: Tracker, parent) -> list:
    """The latest run of each configuration of the parent's group that FINISHED, newest first; a
    run that is no group's parent, or one without a finished child, is refused in one line."""
    run_id, name = parent.info.run_id, parent.info.run_name
    role = parent.data.tags.get(names.ROLE)
    latest = latest_per_configuration(children(tracker, run_id))
    if not latest:
        kind = "the parent run of a sweep or benchmark" if role in GROUP_ROLES else f"a run with role={role}"
        raise KDResearchError(f"run {run_id} ({name}) has no child runs: it is {kind}; give the parent run id of "
                              f"a sweep or benchmark (tag role={names.SWEEP_ROLE} or {names.BENCHMARK_ROLE}), "
                              f"or its folder")
    finished = finished_runs(latest)
    if not finished:
        raise KDResearchError(f"parent run {run_id} ({name}) has no finished child run to report "
                              f"({len(latest)} configurations, none FINISHED)")
    return finished


# --- HTML pieces --------------------------------------------------------------------------------------

def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


# A number, a count with thousands separators, or a mean ± std: right-aligned in its column.
NUMBER = re.compile(r"[+-]?\d[\d,]*(\.\d+)?( ± \d+(\.\d+)?)?")


def _is_number(cell: str) -> bool:
    return NUMBER.fullmatch(cell) is not None


def html_table(titles: Sequence[str], rows: Iterable[Sequence[object]], table_id: str) -> str:
    """A table of text cells (escaped); cells that are numbers (or mean ± std) are right-aligned."""
    head = "".join(f"<th>{_escape(title)}</th>" for title in titles)
    body = []
    for cells in rows:
        texts = ["—" if cell is None else str(cell) for cell in cells]
        body.append("<tr>" + "".join(f"<td class=\"number\">{_escape(text)}</td>" if _is_number(text)
                                     else f"<td>{_escape(text)}</td>" for text in texts) + "</tr>")
    return f"<table id=\"{table_id}\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _paragraphs(text: str, css_class: str) -> str:
    return "".join(f"<p class=\"{css_class}\">{_escape(part)}</p>" for part in text.split("\n\n") if part.strip())


def _png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img class=\"figure\" alt=\"{_escape(alt)}\" src=\"data:image/png;base64,{data}\">"


def _number(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.{digits}f}"


# --- sections ---------------------------------------------------------------------------------------

def _overview(parent, tracker: Tracker, finished: Sequence, rows: Sequence[Row]) -> str:
    tags, params = parent.data.tags, parent.data.params
    started = datetime.datetime.fromtimestamp((parent.info.start_time or 0) / 1000)
    facts = [("parent run", f"{parent.info.run_name} ({parent.info.run_id})"),
             ("role", tags.get(names.ROLE, "—")), ("status", parent.info.status),
             ("experiment", tracker.experiment_name), ("tracking store", tracker.uri),
             ("folder", tags.get(names.SWEEP_DIR, "—")), ("overrides", tags.get(names.OVERRIDES) or "—"),
             ("started", f"{started:%Y-%m-%d %H:%M:%S}"),
             ("rows", f"{len(rows)} configurations from {len(finished)} finished child runs "
                      f"(the latest run of each configuration)"),
             *((f"param {key}", value) for key, value in sorted(params.items())
               if key in ("pairs", "methods", "seeds") or key.startswith("search."))]
    return html_table(["", "value"], facts, "overview")


def _headline(best: Optional[Headline]) -> str:
    if best is None:
        return "<p>No row has a test accuracy.</p>"
    facts = [("configuration", best.row.label), ("chosen by", f"highest mean {best.chosen_by} over seeds"),
             *((key, _number(value)) for key, value in best.metrics().items())]
    return (html_table(["", "value"], facts, "headline")
            + "<p class=\"footnote\">The parent run carries these as its own metrics (headline/*) and tags "
              "(headline.*): MLflow's runs table sorts sweeps and benchmarks by them. test_acc: last-epoch test "
              "accuracy in percent, mean over seeds, with its 95 % Student-t interval; val_acc: the best "
              "validation accuracy (data.val_size > 0).</p>")


def _difference_cells(label: str, reference: Optional[str], difference: Optional[Difference]) -> Optional[list]:
    if difference is None or reference is None:
        return None
    return [label, reference, f"{difference.mean:+.4f}", _number(difference.low), _number(difference.high),
            format_p(difference.p_value), difference.test, difference.n, difference.n_reference,
            "yes" if difference.few_seeds else ""]


def _differences(rows: Sequence[Row]) -> str:
    lines = [cells for row in rows for cells in (_difference_cells(row.label, row.baseline_label, row.vs_baseline),
                                                 _difference_cells(row.label, row.kd_label, row.vs_kd)) if cells]
    if not lines:
        return "<p>No row has a reference to differ from (no student trained with CE or KD on the same data).</p>"
    return html_table(["row", "minus", "Δ mean (points)", "95 % CI low", "95 % CI high", "p", "test", "n",
                       "n reference", "< 3 seeds"], lines, "differences")


def _stat_cells(row: Row, keys: Sequence[tuple[str, int]]) -> list[str]:
    return [row.metric_stat(key).format(digits) for key, digits in keys]


def _fidelity(rows: Sequence[Row]) -> str:
    present = [(key, title, digits) for key, title, digits in FIDELITY
               if any(row.metric_stat(key).n for row in rows)]
    if not present:
        return "<p>No run logs its fidelity to a teacher (no distillation run among the rows).</p>"
    lines = [[row.label, seed_count(len(row.runs)), *_stat_cells(row, [(key, digits) for key, _, digits in present])]
             for row in rows if any(row.metric_stat(key).n for key, _, _ in present)]
    return (html_table(["row", "n", *(title for _, title, _ in present)], lines, "fidelity")
            + "<p class=\"footnote\">At the last epoch, mean ± std over seeds: the percent of images whose top-1 "
              "class is the teacher's, and the mean KL(teacher ‖ student) at T = 1.</p>")


def _budgets(rows: Sequence[Row]) -> str:
    keys = sorted({key for row in rows for run in row.runs for key in run.metrics if key.startswith(BUDGET_PREFIX)})
    if not keys:
        return "<p>The runs log no budget (budget/* metrics; runs from before budgets were recorded).</p>"
    digits = [(key, 4 if key.endswith("hours") or key.endswith("seconds") else 0) for key in keys]
    lines = [[row.label, seed_count(len(row.runs)), *_stat_cells(row, digits)] for row in rows]
    note = budget_note(rows)
    return (html_table(["row", "n", *(key[len(BUDGET_PREFIX):] for key in keys)], lines, "budgets")
            + (f"<p class=\"warning\">{_escape(note)}</p>" if note else
               "<p class=\"footnote\">The compared methods' rows share their training budget (epochs, steps, "
               "images, views per image).</p>"))


def _lineage(rows: Sequence[Row], tags_of: dict[str, dict[str, str]]) -> str:
    versions = sorted({key for tags in tags_of.values() for key in tags if key.startswith("version.")})
    keys = [key for key in (*LINEAGE, *versions) if any(key in tags for tags in tags_of.values())]
    lines = []
    for row in rows:
        cells = []
        for key in keys:
            values = dict.fromkeys(tags_of[run.run_id].get(key, "—") for run in row.runs)
            cells.append(", ".join(value[:12] if key == GIT_COMMIT else value for value in values))
        lines.append([row.label, *cells])
    commits = {tags.get(GIT_COMMIT) for tags in tags_of.values()} - {None}
    dirty = [run_id for run_id, tags in tags_of.items() if tags.get("git.dirty") == "true"]
    notes = []
    if len(commits) > 1:
        notes.append(f"The runs come from {len(commits)} git commits: {', '.join(sorted(c[:12] for c in commits))}.")
    if dirty:
        notes.append(f"{len(dirty)} runs ran with uncommitted changes (their artifact lineage/git_diff.patch).")
    titles = ["row", *("git commit" if key == GIT_COMMIT else key for key in keys)]
    return html_table(titles, lines, "lineage") + "".join(f"<p class=\"warning\">{_escape(n)}</p>" for n in notes)


def _runs(rows: Sequence[Row]) -> str:
    """Every run of the table (all FINISHED: the report reads finished runs only)."""
    lines = [[row.label, "—" if run.seed is None else run.seed, run.name, run.run_id]
             for row in rows for run in row.runs]
    return html_table(["row", "seed", "run name", "run id"], lines, "runs")


def _benchmark(client, parent, finished: Sequence) -> str:
    """The benchmark's own table (methods × pairs, published figures), rebuilt from MLflow; "" for
    other groups."""
    from kdresearch.pipelines import method_benchmark

    if parent.data.tags.get(names.ROLE) != names.BENCHMARK_ROLE:
        return ""
    try:
        jobs = method_benchmark.jobs_of_parent(parent, finished)
        pairs, methods, _ = method_benchmark.planned(parent)
        table = method_benchmark.build_table(client, jobs, pairs, methods, method_benchmark.read_published())
    except KDResearchError as error:
        return f"<h2>Benchmark table</h2><p class=\"warning\">not rebuilt: {_escape(first_line(error))}</p>"
    tables = "".join(html_table(titles, lines, f"benchmark-{index}")
                     for index, (titles, lines) in enumerate(table.grids()))
    return f"<h2>Benchmark table</h2>{tables}<p class=\"footnote\">{_escape(method_benchmark.FOOTNOTE)}</p>"


def render(parent, tracker: Tracker, finished: Sequence, comparison: Comparison, best: Optional[Headline]) -> str:
    """The page's HTML."""
    rows = comparison.rows
    titles, lines = table_grid(rows)
    note = budget_note(rows)
    footnote = "".join(_paragraphs(part, "warning" if part == note else "footnote")
                       for part in comparison.footnote.split("\n\n"))
    title = f"Report: {parent.info.run_name}"
    generated = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    sections = [
        f"<h1>{_escape(title)}</h1>",
        f"<p class=\"footnote\">Written by kdresearch (scripts/report.py) on {generated}.</p>",
        _overview(parent, tracker, finished, rows),
        "<h2>Headline</h2>", _headline(best),
        "<h2>Comparison</h2>", html_table(titles, lines, "comparison"), footnote,
        _benchmark(tracker.client, parent, finished),
        "<h2>Accuracy per epoch and differences</h2>",
        _png(comparison.figure, "test accuracy and train loss per epoch (mean, band ± std over seeds); "
                                "differences with 95 % intervals"),
        "<p class=\"footnote\">Left: test accuracy per epoch, middle: train loss per epoch, one line per row (mean "
        "over its seeds, band ± std); right: each row's difference of last-epoch test accuracy to the student "
        "alone and to KD, with its 95 % confidence interval.</p>",
        "<h2>Differences with 95 % intervals</h2>", _differences(rows),
        "<h2>Fidelity to the teacher</h2>", _fidelity(rows),
        "<h2>Budgets</h2>", _budgets(rows),
        "<h2>Lineage</h2>", _lineage(rows, {run.info.run_id: dict(run.data.tags) for run in finished}),
        "<h2>Runs</h2>", _runs(rows),
    ]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


# --- the whole report -------------------------------------------------------------------------------

def build_report(tracker: Tracker, parent, out_dir: Path) -> Report:
    """Write `out_dir`/report.html (and the comparison's files under `out_dir`/comparison) for the
    group whose parent MLflow run is `parent`."""
    finished = finished_children(tracker, parent)
    out_dir = Path(out_dir)
    name = parent.info.run_name or parent.info.run_id
    comparison = compare(tracker, sorted(finished, key=lambda run: run.info.start_time or 0), out_dir / "comparison",
                         name=name, log_summary=False)
    best = headline(comparison.rows)
    path = out_dir / FILE_NAME
    path.write_text(render(parent, tracker, finished, comparison, best), encoding="utf-8")
    return Report(parent.info.run_id, name, path, comparison, best)


def log_report(tracker: Tracker, report: Report) -> str:
    """Log the page to its parent run (artifact report/report.html); returns the artifact path."""
    from kdresearch.tracking.run import TrackedRun

    TrackedRun(tracker, report.parent_run_id).log_file(report.path, ARTIFACT_DIR)
    report.artifact = f"{ARTIFACT_DIR}/{FILE_NAME}"
    log.info("logged %s to parent run %s", report.artifact, report.parent_run_id)
    return report.artifact


def report(target: str, tracking_uri: Optional[str] = None, out: Optional[Path] = None,
           log_to_parent: bool = True) -> Report:
    """The report of a sweep or benchmark: `target` is its parent run id or its folder; written to
    `out` (default outputs/reports/<parent run name>) and, with `log_to_parent`, logged to the parent."""
    tracker, parent = open_parent_run(target, tracking_uri)
    out = Path(out) if out is not None else Path("outputs") / "reports" / (parent.info.run_name or parent.info.run_id)
    out.mkdir(parents=True, exist_ok=True)
    result = build_report(tracker, parent, out)
    if log_to_parent:
        log_report(tracker, result)
    return result
