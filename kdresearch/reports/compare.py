"""Compare finished runs: select them in MLflow, build one table row per configuration, write the
table (Markdown, CSV) and a figure (PNG), and log all three as artifacts of a summary run.

- Selection: an experiment, narrowed by the `sweep` tag, tag filters or an MLflow filter string;
  or an explicit list of run ids. Runs that train nothing (summaries, the parents of sweeps and
  reproductions, evaluations: `names.UNTRAINED_ROLES`) are never compared.
- Rows: runs with the same configuration (every param except the seed and settings that do not
  change what is trained, plus the data fingerprint) form one row; their seeds give mean ± std
  (sample std). When a configuration was run twice with the same seed, the newest run counts.
  `per_run=True` gives one row per run instead.
- Baseline: the student trained with cross-entropy (role=student, loss=ce) on the same data for
  the same number of epochs; "Δ vs student CE" is the row's mean final test/acc minus the
  baseline's, with its 95 % interval and p-value (kdresearch.reports.statistics): paired by seed
  when the baseline has a run of every seed of the row, else Welch's unpaired test over all of the
  baseline's seeds. "Δ vs KD" is the same against the first student trained with loss=kd there.
- Fairness: the tutorial starts every student from the same weights and checks it with the norm of
  the first conv's weight. A student whose step-0 `first_layer_norm` differs from the baseline
  run's of the same seed (or from the baseline's at all, when it has no run of that seed) is
  flagged as an unfair comparison.
- Budgets: when the compared methods' rows (the students'; a teacher follows its own recipe) were
  trained for different budgets (kdresearch.training.budget.TRAINING_BUDGET: epochs, optimizer
  steps, images seen, views per image), a note under the table names the keys and which rows
  have which value (`budget_note`); the CSV lists the keys in column `budget_differs`.
- Headline: the table's best configuration (`headline`), whose numbers a group's parent run
  carries as its own metrics (kdresearch.sweeps.parent_runs.log_headline).

Params, tags and each metric's latest value come with the MLflow runs (`select_runs`); per-epoch
histories (`metric_history`) are read only for the runs the table shows. Nothing here trains.
"""

from __future__ import annotations

import datetime
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from kdresearch.config.identity import training_identity
from kdresearch.errors import KDResearchError
from kdresearch.reports.statistics import FOOTNOTE as STATISTICS_FOOTNOTE
from kdresearch.reports.statistics import Difference, mean_interval, seed_count, seed_difference
from kdresearch.tracking import names
from kdresearch.tracking.run import TrackedRun
from kdresearch.tracking.store import Tracker, metric_history
from kdresearch.training.budget import PREFIX as BUDGET_PREFIX
from kdresearch.training.budget import TRAINING_BUDGET

log = logging.getLogger(__name__)

ARTIFACT_DIR = "comparison"  # where the summary run keeps comparison.md / .csv / .png
# Metrics read per epoch (max test/acc, curves, norm at step 0, summed times); others: latest value.
HISTORY_KEYS = ("test/acc", "train/loss", "first_layer_norm", "epoch_seconds")
NOT_HYPERPARAMETERS = ("name", "_target_")  # loss.* params that name the loss rather than tune it
MAX_RUNS = 50_000  # MLflow's cap on one search

INIT_NORM_TOLERANCE = 1e-6


# --- reading runs -------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One finished MLflow run, as the comparison needs it."""

    run_id: str
    name: str
    start_time: int
    role: str
    model: str
    loss: str
    seed: Optional[int]
    hyperparameters: dict[str, str]  # the loss's params (`loss.T` -> "T": "2"), as MLflow holds them
    parameter_count: Optional[int]
    identity: tuple  # equal for runs of one configuration (any seed)
    context: tuple  # (data fingerprint, epochs): runs comparable with one baseline
    history: dict[str, list[tuple[int, float]]]  # {key: [(step, value), ...]} of HISTORY_KEYS, once read
    params: dict[str, str] = field(repr=False, default_factory=dict)
    metrics: dict[str, float] = field(repr=False, default_factory=dict)  # each metric's latest value

    def _values(self, key: str) -> list[tuple[int, float]]:
        return self.history.get(key) or []

    def value(self, key: str) -> Optional[float]:
        """Metric `key` at the run's last step (None when the run does not log it): from the history
        when it was read, else MLflow's latest value."""
        values = self._values(key)
        return values[-1][1] if values else self.metrics.get(key)

    @property
    def init_norm(self) -> Optional[float]:
        return next((value for step, value in self._values("first_layer_norm") if step == 0), None)

    @property
    def final_norm(self) -> Optional[float]:
        return self.value("first_layer_norm")

    @property
    def final_acc(self) -> Optional[float]:
        return self.value("test/acc")

    @property
    def best_acc(self) -> Optional[float]:
        """The maximum test/acc over epochs: an epoch selected on the test set (optimistic)."""
        values = self._values("test/acc")
        return max(value for _, value in values) if values else None

    @property
    def best_val_acc(self) -> Optional[float]:
        """The best val/acc over epochs (data.val_size > 0), as of the last epoch."""
        return self.value("best/val_acc")

    @property
    def best_val_test_acc(self) -> Optional[float]:
        """test/acc of the epoch chosen on validation (data.val_size > 0), as of the last epoch."""
        return self.value("best/test_acc")

    @property
    def train_seconds(self) -> Optional[float]:
        values = self._values("epoch_seconds")
        return sum(value for _, value in values) if values else None

    @property
    def agreement(self) -> Optional[float]:
        """Top-1 agreement with the teacher on the test split at the last epoch (distillation runs)."""
        return self.value("test/agreement")

    @property
    def kl_teacher(self) -> Optional[float]:
        return self.value("test/kl_teacher")


def _number(text: Optional[str], kind=float):
    if text in (None, "", "None", "null"):
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        return None


def _identity(params: Mapping[str, str], tags: Mapping[str, str]) -> tuple:
    """The run's training identity (kdresearch.identity) without the seed: equal for the seeds of one setup."""
    identity = training_identity(params, tags.get(names.DATA_FINGERPRINT, ""), with_teacher=names.TEACHER_RUN_ID in tags)
    identity.pop("seed", None)
    return tuple(sorted(identity.items()))


def read_run(client, run, history: bool = True) -> RunRecord:
    """A `RunRecord` from an MLflow `Run`: its params, tags and latest metric values and, with
    `history`, the per-epoch values of HISTORY_KEYS (one MLflow call per key)."""
    params, tags = dict(run.data.params), dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id[:8]),
        start_time=run.info.start_time or 0,
        role=tags.get(names.ROLE, ""),
        model=tags.get(names.MODEL, params.get("model.name", "")),
        loss=tags.get(names.LOSS, params.get("loss.name", "")),
        seed=_number(params.get("seed"), int),
        hyperparameters={key[len("loss."):]: value for key, value in params.items()
                         if key.startswith("loss.") and key[len("loss."):] not in NOT_HYPERPARAMETERS},
        parameter_count=_number(params.get("parameter_count"), int),
        identity=_identity(params, tags),
        context=(tags.get(names.DATA_FINGERPRINT, ""), params.get("epochs", "")),
        history=metric_history(client, run.info.run_id, HISTORY_KEYS) if history else {},
        params=params,
        metrics=dict(run.data.metrics),
    )


def select_runs(tracker: Tracker, run_ids: Sequence[str] = (), sweep: Optional[str] = None,
                tags: Mapping[str, str] | None = None, filter_string: Optional[str] = None,
                include_unfinished: bool = False) -> list:
    """MLflow runs to compare, oldest first: the given `run_ids`, or the tracker's experiment's
    finished runs narrowed by `sweep` (tag), `tags` ({key: value}) and an MLflow `filter_string`."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        if sweep or tags or filter_string:
            raise KDResearchError("select runs either by run ids or by sweep/tags/filter, not both")
        runs = []
        for run_id in dict.fromkeys(run_ids):
            try:
                runs.append(tracker.client.get_run(run_id))
            except MlflowException:
                raise KDResearchError(f"run {run_id} is not in the MLflow store {tracker.uri}") from None
        described = f"{len(runs)} given run ids"
    else:
        clauses = [] if include_unfinished else ["attributes.status = 'FINISHED'"]
        if sweep:
            clauses.append(names.tag_equals(names.SWEEP, sweep))
        for key, value in (tags or {}).items():
            clauses.append(names.tag_equals(key, value))
        if filter_string:
            clauses.append(filter_string)
        query = " and ".join(clauses)
        try:
            runs = tracker.find_runs(query, max_results=MAX_RUNS)
        except MlflowException as error:
            first_line = str(error).strip().splitlines()[0]
            raise KDResearchError(f"bad run filter {query!r}: {first_line}") from None
        described = f"runs matching {query!r}" if query else "runs"
    runs = [run for run in runs if run.data.tags.get(names.ROLE) not in names.UNTRAINED_ROLES]
    if not runs:
        experiment = tracker.client.get_experiment(tracker.experiment_id).name
        raise KDResearchError(f"no {described} to compare in experiment {experiment!r} of {tracker.uri}")
    return sorted(runs, key=lambda run: run.info.start_time or 0)


# --- rows -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """Mean and sample std of a value over a row's runs (std is None for one run)."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Stat":
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))

    def format(self, digits: int, sign: bool = False) -> str:
        if self.mean is None:
            return "—"
        text = f"{self.mean:+.{digits}f}" if sign else f"{self.mean:.{digits}f}"
        return text if self.std is None else f"{text} ± {self.std:.{digits}f}"


@dataclass
class Row:
    """One line of the table: one configuration (several seeds) or, with per_run, one run."""

    label: str
    runs: list[RunRecord]
    baseline_label: Optional[str] = None
    vs_baseline: Optional[Difference] = None  # final test/acc minus the baseline's (None for the baseline)
    is_baseline: bool = False
    kd_label: Optional[str] = None
    vs_kd: Optional[Difference] = None  # final test/acc minus the KD reference's (None for that reference)
    is_kd_reference: bool = False
    unfair: list[str] = field(default_factory=list)  # one reason per unfairly initialised run

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    @property
    def delta(self) -> Optional[float]:
        """Mean final test/acc minus the baseline's: 0 for the baseline itself, None without one."""
        if self.is_baseline:
            return 0.0
        return None if self.vs_baseline is None else self.vs_baseline.mean

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs if run.seed is not None]

    def stat(self, attribute: str) -> Stat:
        return Stat.of(getattr(run, attribute) for run in self.runs)

    def metric_stat(self, key: str) -> Stat:
        """Mean and std over the row's runs of metric `key` at each run's last step."""
        return Stat.of(run.value(key) for run in self.runs)

    @property
    def note(self) -> str:
        if self.unfair:
            return "UNFAIR: " + "; ".join(self.unfair)
        if self.is_baseline:
            return "baseline"
        if self.is_kd_reference:
            return "KD reference"
        if self.baseline_label is None and self.first.role == names.STUDENT_ROLE:
            return "no student-CE baseline on this data"
        return ""


def _table_runs(records: Sequence[RunRecord], per_run: bool = False) -> list[RunRecord]:
    """The runs the table shows, oldest first: all with `per_run`, else the newest of each
    (configuration, seed)."""
    records = sorted(records, key=lambda record: record.start_time)
    if per_run:
        return records
    newest = {(record.identity, record.seed): record for record in records}
    return [record for record in records if newest[(record.identity, record.seed)] is record]


def _labels(groups: list[list[RunRecord]], per_run: bool) -> list[str]:
    """Run names, disambiguated by the params that differ when several configurations share one."""
    labels = []
    for group in groups:
        run = group[0]
        label = run.name + (f" (seed {run.seed})" if per_run and run.seed is not None else "")
        labels.append(label)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    for label, indices in by_label.items():
        if len(indices) < 2:
            continue
        identities = [dict(groups[i][0].identity) for i in indices]
        keys = sorted({key for identity in identities for key in identity
                       if len({ident.get(key) for ident in identities}) > 1})
        for i, identity in zip(indices, identities):
            shown = [f"{key}={identity.get(key)}" for key in keys[:3]]
            labels[i] = f"{label} [{', '.join(shown)}]" if shown else f"{label} [{groups[i][0].run_id[:8]}]"
    return labels


def _is_student_with(loss: str):
    return lambda record: record.role == names.STUDENT_ROLE and record.loss == loss


def _references(configurations: dict[tuple, list[RunRecord]], labels: dict[tuple, str], wanted: Optional[str],
                what: str, qualifies) -> dict[tuple, tuple]:
    """{(data, epochs) context: identity of the configuration its rows are compared with}: the one
    `wanted` names (label, run name or run id) for every context, else per context the first
    configuration whose runs `qualifies`."""
    if wanted:
        chosen = _chosen(configurations, labels, wanted, what)
        return {group[0].context: chosen for group in configurations.values()}
    references: dict[tuple, tuple] = {}
    for identity, group in configurations.items():
        if qualifies(group[0]):
            references.setdefault(group[0].context, identity)
    return references


def _final_accs(runs: Sequence[RunRecord]) -> list[tuple[Optional[int], Optional[float]]]:
    return [(run.seed, run.final_acc) for run in runs]


def build_rows(records: list[RunRecord], per_run: bool = False, baseline: Optional[str] = None,
               kd_reference: Optional[str] = None) -> list[Row]:
    """Table rows from run records (oldest first), with differences to the baseline and to the KD
    reference and fairness flags.

    `baseline` picks the baseline configuration by label, run name or run id; by default it is,
    per (data, epochs) context, the first configuration of a student trained with cross-entropy.
    `kd_reference` likewise, by default the first student trained with loss=kd.
    """
    records = _table_runs(records, per_run)
    configurations: dict[tuple, list[RunRecord]] = {}
    for record in records:
        configurations.setdefault(record.identity, []).append(record)

    groups = [[record] for record in records] if per_run else list(configurations.values())
    rows = [Row(label, group) for label, group in zip(_labels(groups, per_run), groups)]
    config_labels = dict(zip(configurations, _labels(list(configurations.values()), False)))

    baselines = _references(configurations, config_labels, baseline, "baseline", _is_student_with("ce"))
    kd_references = _references(configurations, config_labels, kd_reference, "KD reference", _is_student_with("kd"))
    for row in rows:
        identity = row.first.identity
        kd_identity = kd_references.get(row.first.context)
        if kd_identity is not None:
            row.kd_label = config_labels[kd_identity]
            row.is_kd_reference = identity == kd_identity
            if not row.is_kd_reference:
                row.vs_kd = seed_difference(_final_accs(row.runs), _final_accs(configurations[kd_identity]))
        base_identity = baselines.get(row.first.context)
        if base_identity is None:
            continue
        base_runs = configurations[base_identity]
        row.baseline_label = config_labels[base_identity]
        row.is_baseline = identity == base_identity
        if not row.is_baseline:
            row.vs_baseline = seed_difference(_final_accs(row.runs), _final_accs(base_runs))
        by_seed = {run.seed: run for run in base_runs}
        if row.first.role != names.STUDENT_ROLE or row.is_baseline:
            continue
        for run in row.runs:
            reference = by_seed.get(run.seed, base_runs[0])
            if run.init_norm is None or reference.init_norm is None:
                continue
            if abs(run.init_norm - reference.init_norm) > INIT_NORM_TOLERANCE * max(1.0, abs(reference.init_norm)):
                row.unfair.append(
                    f"first_layer_norm at init {run.init_norm:.4f} (seed {run.seed}) != baseline's "
                    f"{reference.init_norm:.4f} (seed {reference.seed})"
                )
    return rows


def _chosen(configurations: dict[tuple, list[RunRecord]], labels: dict[tuple, str], wanted: str, what: str) -> tuple:
    for identity, group in configurations.items():
        if wanted == labels[identity] or any(wanted in (run.run_id, run.name) for run in group):
            return identity
    raise KDResearchError(f"{what} {wanted!r} is none of the compared runs ({', '.join(labels.values())})")


# --- outputs ---------------------------------------------------------------------------------------

STAT_COLUMNS = (("init norm", "init_norm", 4), ("final norm", "final_norm", 4),
                ("last-epoch test/acc %", "final_acc", 2), ("test/acc % at best-val epoch", "best_val_test_acc", 2),
                ("max test/acc % (epoch chosen on test)", "best_acc", 2))


def varying_hyperparameters(rows: Sequence["Row"]) -> list[str]:
    """The loss hyperparameters whose values differ between rows (absent counts as a value)."""
    keys = sorted({key for row in rows for key in row.first.hyperparameters})
    return [key for key in keys if len({row.first.hyperparameters.get(key) for row in rows}) > 1]


def _with_kd(rows: Sequence["Row"]) -> bool:
    """Whether the table has "Δ vs KD" columns: some row has a KD reference."""
    return any(row.kd_label for row in rows)


def columns(rows: Sequence["Row"]) -> list[str]:
    kd = ["Δ vs KD [95 % CI]", "p vs KD"] if _with_kd(rows) else []
    return ["run", "model", "loss", *(f"loss.{key}" for key in varying_hyperparameters(rows)), "params", "seeds",
            "n", *(title for title, _, _ in STAT_COLUMNS), "Δ vs student CE [95 % CI]", "p vs student CE", *kd,
            "train time s", "note"]


def _difference_cells(difference: Optional[Difference], is_reference: bool, reference: str) -> list[str]:
    if is_reference:
        return [reference, "—"]
    return ["—", "—"] if difference is None else [difference.format(2), difference.format_p()]


def table_cells(row: Row, hyperparameters: Sequence[str], with_kd: bool) -> list[str]:
    run = row.first
    kd = _difference_cells(row.vs_kd, row.is_kd_reference, "KD reference") if with_kd else []
    return [
        row.label, run.model, run.loss, *(run.hyperparameters.get(key, "—") for key in hyperparameters),
        "—" if run.parameter_count is None else f"{run.parameter_count:,}",
        " ".join(str(seed) for seed in row.seeds) or "—", seed_count(len(row.runs)),
        *(row.stat(attribute).format(digits) for _, attribute, digits in STAT_COLUMNS),
        *_difference_cells(row.vs_baseline, row.is_baseline, "baseline"), *kd,
        row.stat("train_seconds").format(1), row.note,
    ]


def table_grid(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The table as text: its column titles and one list of cells per row (Markdown, HTML report)."""
    hyperparameters, with_kd = varying_hyperparameters(rows), _with_kd(rows)
    return columns(rows), [table_cells(row, hyperparameters, with_kd) for row in rows]


def markdown_grid(titles: Sequence[str], lines_of_cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table of column titles and one list of cells per row (a `|` in a cell escaped)."""
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for cells in lines_of_cells:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[Row]) -> str:
    return markdown_grid(*table_grid(rows))


def _method_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows of the compared methods, whose budgets should match: the students' (a teacher is
    trained to its own recipe), or every row of a table without students."""
    students = [row for row in rows if row.first.role == names.STUDENT_ROLE]
    return students or list(rows)


def differing_budgets(rows: Sequence[Row]) -> dict[str, dict[float, list[str]]]:
    """{budget key: {value: labels of the rows with runs of that value}} for each key of
    kdresearch.training.budget.TRAINING_BUDGET whose value differs between the runs of the compared
    methods' rows (`_method_rows`). Runs that do not log a key (older runs) are left out."""
    differing = {}
    for key in TRAINING_BUDGET:
        by_value: dict[float, list[str]] = {}
        for row in _method_rows(rows):
            for value in dict.fromkeys(run.value(BUDGET_PREFIX + key) for run in row.runs):
                if value is not None:
                    by_value.setdefault(value, []).append(row.label)
        if len(by_value) > 1:
            differing[key] = dict(sorted(by_value.items()))
    return differing


def budget_note(rows: Sequence[Row]) -> str:
    """One line under a table whose rows were trained for different budgets, naming the keys and
    which rows have which value; "" when they match."""
    differing = differing_budgets(rows)
    if not differing:
        return ""
    whose = "the students' rows" if any(row.first.role == names.STUDENT_ROLE for row in rows) else "rows"
    parts = [f"{key} ({'; '.join(f'{value:g}: ' + ', '.join(labels) for value, labels in by_value.items())})"
             for key, by_value in differing.items()]
    return (f"Budgets differ between {whose}: {', '.join(parts)}; their accuracies compare methods trained for "
            f"different budgets (budget/* metrics).")


def _footnote(rows: Sequence[Row]) -> str:
    multi = any(len(row.runs) > 1 for row in rows)
    baselines = sorted({row.baseline_label for row in rows if row.baseline_label})
    kd_references = sorted({row.kd_label for row in rows if row.kd_label})
    parts = [
        "test/acc in percent at the last epoch, at the epoch chosen on validation (data.val_size > 0; "
        "— without a validation split), and its maximum over epochs (an epoch chosen on the test set: optimistic)",
        "loss.* columns: the loss hyperparameters that differ between rows",
        "init/final norm: first_layer_norm at step 0 and at the last epoch",
        "train time: sum of epoch_seconds",
        f"baseline: {', '.join(baselines) if baselines else 'none (no student trained with CE)'}",
        *([f"KD reference: {', '.join(kd_references)}"] if kd_references else []),
        f"Δ vs student CE{' and vs KD' if kd_references else ''}: of the last-epoch test/acc",
        STATISTICS_FOOTNOTE,
    ]
    if multi:
        parts.insert(0, "mean ± sample std over seeds")
    note = budget_note(rows)
    return (f"{note}\n\n" if note else "") + "; ".join(parts) + "."


def write_markdown(rows: Sequence[Row], path: Path, title: str) -> Path:
    path.write_text(f"# {title}\n\n{markdown_table(rows)}\n{_footnote(rows)}\n")
    return path


CSV_STATS = ("init_norm", "final_norm", "final_acc", "best_val_test_acc", "best_acc", "train_seconds",
             "agreement", "kl_teacher")
CSV_BUDGET = (*TRAINING_BUDGET, "device_hours")  # budget/<key> metrics (kdresearch.training.budget)


def _difference_columns(prefix: str, difference: Optional[Difference]) -> dict[str, object]:
    """The interval, p-value, test and counts of a difference (empty without one)."""
    parts = ("low", "high", "p_value", "test", "n", "n_reference")
    return {f"{prefix}_{part}": None if difference is None else getattr(difference, part) for part in parts}


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """Machine-readable: full-precision numbers, means and stds in their own columns (None: empty)."""
    import pandas as pd

    hyperparameters = sorted({key for row in rows for key in row.first.hyperparameters})
    differing = " ".join(differing_budgets(rows))  # the same on every line: the table's budgets differ in these
    lines = [{
        "run": row.label, "run_ids": " ".join(run.run_id for run in row.runs), "model": row.first.model,
        "loss": row.first.loss, "role": row.first.role,
        **{f"loss.{key}": row.first.hyperparameters.get(key) for key in hyperparameters},
        "parameter_count": row.first.parameter_count, "seeds": " ".join(map(str, row.seeds)), "n": len(row.runs),
        **{f"{name}_{part}": getattr(row.stat(name), part) for name in CSV_STATS for part in ("mean", "std")},
        **{f"{key}_{part}": getattr(row.metric_stat(BUDGET_PREFIX + key), part)
           for key in CSV_BUDGET for part in ("mean", "std")},
        "delta_vs_baseline": row.delta, **_difference_columns("delta_vs_baseline", row.vs_baseline),
        "baseline": row.baseline_label,
        "delta_vs_kd": None if row.vs_kd is None else row.vs_kd.mean, **_difference_columns("delta_vs_kd", row.vs_kd),
        "kd_reference": row.kd_label, "unfair_init": bool(row.unfair), "budget_differs": differing,
        "note": row.note,
    } for row in rows]
    # dtype=object writes each value as Python does: a count stays 267738, not 267738.0 beside a missing
    # one; lines end in CRLF, as RFC 4180 and the csv module have them.
    pd.DataFrame(lines, dtype=object).to_csv(path, index=False, lineterminator="\r\n")
    return path


def _curve(row: Row, key: str) -> tuple[list[int], list[float], Optional[list[float]]]:
    """Epochs, mean and (with several runs) std of a per-epoch metric over the row's runs: the epochs
    every run has (step 0, before training, left out)."""
    import pandas as pd

    frame = pd.DataFrame([dict(run.history.get(key) or []) for run in row.runs]).dropna(axis=1)  # run x step
    frame = frame[sorted(step for step in frame.columns if step > 0)]
    return list(frame.columns), list(frame.mean()), list(frame.std()) if len(frame) > 1 else None


def plot_differences(ax, rows: Sequence[Row]) -> None:
    """Each row's Δ of last-epoch test/acc vs student CE (and vs KD), with its interval as a bar."""
    shown = [row for row in rows if row.vs_baseline is not None or row.vs_kd is not None]
    for offset, attribute, marker, label in ((-0.15, "vs_baseline", "o", "vs student CE"),
                                            (0.15, "vs_kd", "s", "vs KD")):
        points = [(index + offset, getattr(row, attribute)) for index, row in enumerate(shown)
                  if getattr(row, attribute) is not None]
        if not points:
            continue
        ys, differences = [y for y, _ in points], [difference for _, difference in points]
        errors = [[0.0 if d.low is None else d.mean - d.low for d in differences],
                  [0.0 if d.high is None else d.high - d.mean for d in differences]]
        ax.errorbar([d.mean for d in differences], ys, xerr=errors, fmt=marker, capsize=3, label=label)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(shown)), [f"{row.label} ({seed_count(len(row.runs))})" for row in shown],
                  fontsize="small")
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("Δ last-epoch test/acc (points), 95 % CI; no bar: no interval")
    ax.grid(alpha=0.3, axis="x")
    if shown:
        ax.legend(fontsize="small")


def write_figure(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Test accuracy and train loss per epoch, one line per row (band: ± std over seeds), and each
    row's differences to the baseline and the KD reference with their intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(17, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    epochs: set[int] = set()
    for ax, key, ylabel in ((axes[0], "test/acc", "test accuracy (%)"),
                            (axes[1], "train/loss", "train loss (each run's own objective)")):
        for row in rows:
            steps, means, stds = _curve(row, key)
            if not steps:
                continue
            epochs.update(steps)
            (line,) = ax.plot(steps, means, marker="o", markersize=3, label=row.label)
            if stds is not None:
                ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 20:
            ax.set_xticks(sorted(epochs))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize="small")
    plot_differences(axes[2], rows)
    figure.suptitle(title)
    figure.savefig(path)
    return path


# --- the whole comparison ---------------------------------------------------------------------------

@dataclass
class Comparison:
    name: str
    rows: list[Row]
    markdown: Path
    csv: Path
    figure: Path
    summary_run_id: Optional[str] = None

    @property
    def table(self) -> str:
        return markdown_table(self.rows)

    @property
    def footnote(self) -> str:
        return _footnote(self.rows)

    def row(self, label: str) -> Row:
        return next(row for row in self.rows if row.label == label)


def default_name(prefix: str = "comparison") -> str:
    return f"{prefix}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"


def comparison_rows(client, runs: Sequence, per_run: bool = False, baseline: Optional[str] = None,
                    kd_reference: Optional[str] = None) -> tuple[list[RunRecord], list[Row]]:
    """The records of `runs` (MLflow runs) and the table's rows built from them; per-epoch
    histories are read only for the runs the table shows, not for superseded reruns."""
    records = [read_run(client, run, history=False) for run in runs]
    shown = _table_runs(records, per_run)
    for record in shown:
        record.history = metric_history(client, record.run_id, HISTORY_KEYS)
    return records, build_rows(shown, per_run=per_run, baseline=baseline, kd_reference=kd_reference)


def compare(tracker: Tracker, runs: Sequence, out_dir: Path, name: Optional[str] = None, per_run: bool = False,
            baseline: Optional[str] = None, kd_reference: Optional[str] = None, log_summary: bool = True,
            selection: Optional[Mapping[str, object]] = None) -> Comparison:
    """Build the table of `runs` (MLflow runs, e.g. from `select_runs`), write comparison.md/.csv/.png
    into `out_dir` and, with `log_summary`, log them as artifacts of a summary run named `name`."""
    name = name or default_name()
    records, rows = comparison_rows(tracker.client, runs, per_run, baseline, kd_reference)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Comparison(
        name, rows,
        write_markdown(rows, out_dir / "comparison.md", name),
        write_csv(rows, out_dir / "comparison.csv"),
        write_figure(rows, out_dir / "comparison.png", name),
    )
    if log_summary:
        result.summary_run_id = log_summary_run(tracker, result, name, records, selection or {})
    return result


def log_summary_run(tracker: Tracker, result: Comparison, name: str, records: Sequence[RunRecord],
                    selection: Mapping[str, object]) -> str:
    """A run (tag role=summary) holding the comparison files; its description is the table."""
    run_ids = [record.run_id for record in records]
    tags = {
        names.ROLE: names.SUMMARY_ROLE,
        "compared_runs": " ".join(run_ids)[:5000],
        "mlflow.note.content": f"{markdown_table(result.rows)}\n{_footnote(result.rows)}",
    }
    params = {f"selection.{key}": value for key, value in selection.items() if value not in (None, "", [], ())}
    params["compared_run_count"] = len(run_ids)
    tracked: TrackedRun
    with tracker.start_run(name, tags, params) as tracked:
        for path in (result.markdown, result.csv, result.figure):
            tracked.log_file(path, ARTIFACT_DIR)
    log.info("summary run %s (%s) holds %s/comparison.md, .csv, .png", tracked.run_id, name, ARTIFACT_DIR)
    return tracked.run_id


# --- the table's headline numbers ------------------------------------------------------------------

HEADLINE_PREFIX = "headline/"  # metrics of a group's parent run: its table's best configuration


@dataclass(frozen=True)
class Headline:
    """The best configuration of a table, as a group's parent run carries it so that MLflow's runs
    table can sort sweeps and benchmarks: chosen on validation (the highest mean best/val_acc) when
    every candidate row has a validation split, else on the mean last-epoch test/acc. Candidates:
    the students' rows (a teacher is not one of the compared methods), or every row of a table
    without students."""

    row: Row
    chosen_by: str  # the metric the row was chosen on: "best/val_acc" or "test/acc"

    def metrics(self) -> dict[str, float]:
        """`headline/test_acc` (mean last-epoch test/acc over seeds), `_std`, its 95 % Student-t
        interval `_ci_low`, `_ci_high`, `_ci_half_width` (none with one seed or no spread),
        `headline/seeds`, and where they exist `headline/val_acc` (mean best/val_acc),
        `headline/test_acc_at_best_val` and the difference to the student alone
        `headline/delta_vs_student_ce` with its interval and p-value."""
        accs = [value for value in (run.final_acc for run in self.row.runs) if value is not None]
        last = Stat.of(accs)
        metrics = {"test_acc": last.mean, "test_acc_std": last.std, "seeds": float(len(accs)),
                   "val_acc": self.row.stat("best_val_acc").mean,
                   "test_acc_at_best_val": self.row.stat("best_val_test_acc").mean}
        interval = mean_interval(accs)
        if interval is not None:
            low, high = interval
            metrics.update(test_acc_ci_low=low, test_acc_ci_high=high, test_acc_ci_half_width=(high - low) / 2)
        difference = self.row.vs_baseline
        if difference is not None:
            metrics.update(delta_vs_student_ce=difference.mean, delta_vs_student_ce_ci_low=difference.low,
                           delta_vs_student_ce_ci_high=difference.high, delta_vs_student_ce_p=difference.p_value)
        return {HEADLINE_PREFIX + key: float(value) for key, value in metrics.items() if value is not None}

    def tags(self) -> dict[str, str]:
        return {"headline.row": self.row.label, "headline.chosen_by": self.chosen_by,
                "headline.run_ids": " ".join(run.run_id for run in self.row.runs)[:5000]}


def headline(rows: Sequence[Row]) -> Optional[Headline]:
    """The table's best configuration (see Headline); None when no row has a test accuracy."""
    candidates = [row for row in _method_rows(rows) if row.stat("final_acc").mean is not None]
    if not candidates:
        return None
    if all(row.stat("best_val_acc").mean is not None for row in candidates):
        return Headline(max(candidates, key=lambda row: row.stat("best_val_acc").mean), "best/val_acc")
    return Headline(max(candidates, key=lambda row: row.stat("final_acc").mean), "test/acc")
