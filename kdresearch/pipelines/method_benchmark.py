"""The field's benchmark table: for teacher/student pairs (experiment presets), the student alone
and each distillation method, over seeds, as training jobs (kdresearch.pipelines.jobs).

Per pair and seed: `loss=ce` (the student alone), then every method (`loss=kd`, `loss=dkd`,
`kd loss.standardize=true`, ...). The first job of a seed trains the pair's teacher with the
preset's teacher recipe and every later job reuses it (automatic teacher, kdresearch.teacher),
so each teacher is trained once per seed. The table has the field's layout: rows are methods,
columns are pairs, cells are mean ± std over seeds of the last-epoch test accuracy and of the
test accuracy at the epoch chosen on validation (with `data.val_size=N`), the number of seeds,
and, from a small cited file of published figures (kdresearch/pipelines/published_cifar100.csv, read
by kdresearch.pipelines.published_figures), the published value and our difference to it. A second
table holds each method's difference to the student alone and to KD, with its 95 % interval and
p-value, paired by seed (kdresearch.reports.statistics). The file of published figures is read and
checked before the first job. The jobs' runs are tagged `sweep=<the benchmark's folder>` and are
the child runs of one parent run (kdresearch.sweeps.parent_runs, tag role=benchmark) that holds the
tables (artifact benchmark/benchmark.md, and its description in the MLflow UI).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.pipelines.jobs import PlannedJob, run_jobs, tracker_for
from kdresearch.pipelines.published_figures import PUBLISHED, PublishedFigure, read_published
from kdresearch.reports.compare import Stat, markdown_grid
from kdresearch.reports.statistics import FOOTNOTE as STATISTICS_FOOTNOTE
from kdresearch.reports.statistics import Difference, seed_count, seed_difference
from kdresearch.sweeps.parent_runs import (
    GroupSummary,
    close_parent,
    ended_on_error,
    open_parent,
    override_params,
)
from kdresearch.tracking import names
from kdresearch.tracking.store import metric_history

STUDENT_ALONE = "ce"
KD = "kd"  # the method every other one is also compared with
TEACHER = "teacher"


def method_overrides(method: str) -> list[str]:
    """`"kd loss.standardize=true"` -> ["loss=kd", "loss.standardize=true"]."""
    name, *options = method.split()
    return [f"loss={name}", *options]


def plan(pairs: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
         group: str) -> list[PlannedJob]:
    """The jobs, in order: per pair and seed, the student alone, then each method."""
    if not pairs:
        raise KDResearchError("give at least one pair (an experiment preset such as cifar100_res56_res20)")
    for pair in pairs:
        if not (CONF_DIR / "experiment" / f"{pair}.yaml").is_file():
            raise KDResearchError(f"pair {pair!r} is not an experiment preset in conf/experiment/")
    jobs = []
    for pair in pairs:
        for seed in seeds:
            for method in [STUDENT_ALONE, *[m for m in methods if m != STUDENT_ALONE]]:
                folder = f"{group}/{pair}/{method.replace(' ', '_').replace('=', '-')}-seed{seed}"
                job_overrides = [f"experiment={pair}", *method_overrides(method), f"seed={seed}", "quiet=true",
                                 f"hydra.run.dir={folder}", *overrides]
                jobs.append(PlannedJob(f"{pair}|{method}", seed, folder, job_overrides))
    return jobs


@dataclass
class Cell:
    last: Stat
    at_best_val: Stat
    published: Optional[PublishedFigure] = None  # the figure compared with (kdresearch.pipelines.published_figures)
    vs_student: Optional[Difference] = None  # last-epoch test/acc minus the student alone's
    vs_kd: Optional[Difference] = None  # last-epoch test/acc minus KD's

    def format(self) -> str:
        text = self.last.format(2)
        if self.at_best_val.mean is not None:
            text += f" / {self.at_best_val.format(2)}"
        if self.published is not None:
            recipe = self.published.recipe_note()
            recipe = f" [{recipe}]" if recipe else ""
            difference = "" if self.last.mean is None else f", {self.last.mean - self.published.top1:+.2f}"
            text += f" (pub. {self.published.top1:.2f}{recipe}{difference})"
        return f"{text} ({seed_count(self.last.n)})"


@dataclass
class Table:
    pairs: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def grids(self) -> list[tuple[list[str], list[list[str]]]]:
        """The tables as text, each as (column titles, one list of cells per row): the accuracy
        table, then the table of differences (when some method has one)."""
        accuracy = [[method, *(self.cells[(method, pair)].format() if (method, pair) in self.cells else "—"
                               for pair in self.pairs)] for method in self.methods]
        grids = [(["method", *self.pairs], accuracy)]
        differences = [[label, *cells] for label, cells in self._differences()]
        if differences:
            grids.append((["Δ last-epoch test/acc, 95 % CI, p", *self.pairs], differences))
        return grids

    def markdown(self) -> str:
        """The accuracy table, then the table of differences (when some method has one)."""
        return "\n".join(markdown_grid(titles, rows) for titles, rows in self.grids())

    def _differences(self) -> list[tuple[str, list[str]]]:
        """(`method − reference`, a cell per pair) for each method and reference it has a difference to."""
        lines = []
        for reference, attribute in ((STUDENT_ALONE, "vs_student"), (KD, "vs_kd")):
            for method in self.methods:
                found = [getattr(self.cells.get((method, pair)), attribute, None) for pair in self.pairs]
                if any(found):
                    lines.append((f"{method} − {reference}", [
                        "—" if difference is None else f"{difference.format(2)}, p {difference.format_p()}"
                        for difference in found]))
        return lines


def _accuracies(client, run_id: str) -> tuple[Optional[float], Optional[float]]:
    """(last-epoch test/acc, test/acc at the best validation epoch or None)."""
    history = metric_history(client, run_id, ("test/acc", "best/test_acc"))
    last = history["test/acc"][-1][1] if history.get("test/acc") else None
    best = history["best/test_acc"][-1][1] if history.get("best/test_acc") else None
    return last, best


def _lasts(accs: Sequence[tuple[int, Optional[float], Optional[float]]]) -> list[tuple[int, Optional[float]]]:
    """(seed, last-epoch test/acc) of each run."""
    return [(seed, last) for seed, last, _ in accs]


def build_table(client, jobs: Sequence[PlannedJob], pairs: Sequence[str], methods: Sequence[str],
                published: dict[tuple[str, str], PublishedFigure]) -> Table:
    """The table of the jobs' runs as MLflow holds them; each method's differences to the student
    alone and to KD of the same pair, paired by seed."""
    rows = [TEACHER, STUDENT_ALONE, *[m for m in methods if m != STUDENT_ALONE]]
    values: dict[tuple[str, str], list[tuple[int, Optional[float], Optional[float]]]] = {}  # (seed, last, best)
    # Each distinct teacher once, under the first seed that used it: students sharing one teacher
    # (teacher.run_id=...) must not make it look like several teachers with no spread.
    teachers: dict[tuple[str, str], int] = {}  # (pair, teacher run id) -> seed
    for job in jobs:
        pair, method = job.label.split("|", 1)
        run = client.get_run(job.run_ids[-1])
        values.setdefault((method, pair), []).append((job.seed, *_accuracies(client, run.info.run_id)))
        if names.TEACHER_RUN_ID in run.data.tags:
            teachers.setdefault((pair, run.data.tags[names.TEACHER_RUN_ID]), job.seed)
    for (pair, teacher_run_id), seed in teachers.items():
        values.setdefault((TEACHER, pair), []).append((seed, *_accuracies(client, teacher_run_id)))
    table = Table(list(pairs), rows)
    for (method, pair), accs in values.items():
        cell = Cell(Stat.of(last for _, last, _ in accs), Stat.of(best for _, _, best in accs),
                    published.get((method, pair)))
        if method not in (TEACHER, STUDENT_ALONE):
            cell.vs_student = seed_difference(_lasts(accs), _lasts(values.get((STUDENT_ALONE, pair), [])))
            if method != KD:
                cell.vs_kd = seed_difference(_lasts(accs), _lasts(values.get((KD, pair), [])))
        table.cells[(method, pair)] = cell
    return table


def planned(parent) -> tuple[list[str], list[str], list[int]]:
    """(pairs, methods, seeds) of a benchmark, read back from the params its parent run was opened
    with in `benchmark` (methods joined by ", ": a method may hold spaces, e.g. "kd loss.T=2")."""
    params = parent.data.params
    methods = [method.strip() for method in params.get("methods", "").split(", ") if method.strip()]
    return params.get("pairs", "").split(), methods, [int(seed) for seed in params.get("seeds", "").split()]


def jobs_of_parent(parent, runs: Sequence) -> list[PlannedJob]:
    """The jobs a finished benchmark planned, rebuilt from its parent run (params pairs, methods,
    seeds; tag sweep_dir), each with the newest of `runs` (its child runs, newest first) that ran in
    its job folder; jobs without such a run are left out. Folders are matched by their last two
    parts (<pair>/<method>-seed<seed>): the benchmark may have run from another folder."""
    pairs, methods, seeds = planned(parent)
    jobs = plan(pairs, methods, seeds, [], parent.data.tags.get(names.SWEEP_DIR, "benchmark"))
    newest: dict[tuple[str, ...], str] = {}
    for run in runs:
        folder = run.data.tags.get(names.OUTPUT_DIR)
        if folder:
            newest.setdefault(Path(folder).parts[-2:], run.info.run_id)
    for job in jobs:
        run_id = newest.get(Path(job.folder).parts[-2:])
        job.run_ids = [run_id] if run_id else []
    return [job for job in jobs if job.run_ids]


@dataclass
class Benchmark:
    group: str
    jobs: list[PlannedJob]
    table: Optional[Table]
    markdown_path: Optional[Path] = None
    parent_run_id: Optional[str] = None  # its jobs' runs are the children of this run, which holds the table


FOOTNOTE = ("Cells: last-epoch test accuracy (%), mean ± sample std over seeds; after ' / ': the test accuracy of "
            "the epoch chosen on validation (data.val_size > 0); pub.: the published figure (CIFAR-100, 240 epochs "
            "unless [N epochs] says otherwise, [2 views]: two augmented views of each image per step; sources in "
            "kdresearch/pipelines/published_cifar100.csv) and our difference to it; n: seeds "
            "(marked below 3). Teacher row: the distinct teachers the students used (one per seed unless they share one). Second table: each "
            "method's last-epoch test accuracy minus the student alone's (− ce) and KD's (− kd). "
            f"{STATISTICS_FOOTNOTE}.")
ARTIFACT_DIR = "benchmark"  # the parent run's artifact folder of benchmark.md


def benchmark(pairs: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
              out: Optional[Path] = None, published_path: Optional[Path] = PUBLISHED,
              dry_run: bool = False) -> Benchmark:
    """Run the jobs of `plan` as children of one parent run, then build the table from what
    MLflow holds, write it to <group>/benchmark.md and log it to the parent. `published_path`
    None: no published figures."""
    stamp = f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    group = str(out) if out is not None else f"outputs/benchmark/{stamp}"
    jobs = plan(pairs, methods, seeds, overrides, group)
    published = read_published(published_path) if published_path else {}
    if dry_run:
        for job in jobs:
            print(job.shell_line)
        return Benchmark(group, jobs, None)
    tracker = tracker_for(overrides)
    folder = Path(group)
    parent = open_parent(tracker, folder, f"benchmark-{stamp}",
                         {names.ROLE: names.BENCHMARK_ROLE, names.SWEEP_DIR: group,
                          names.OVERRIDES: " ".join(overrides)},
                         {**override_params(overrides), "pairs": " ".join(pairs), "methods": ", ".join(methods),
                          "seeds": " ".join(map(str, seeds))})
    with ended_on_error(tracker, parent):
        run_jobs(jobs, tracker, group)
        table = build_table(tracker.client, jobs, pairs, methods, published)
        markdown = folder / "benchmark.md"
        markdown.write_text(f"# Distillation benchmark ({group})\n\n{table.markdown()}\n{FOOTNOTE}\n")
    close_parent(tracker, parent, folder, f"benchmark-{stamp}",
                 summary=GroupSummary((markdown,), ARTIFACT_DIR, f"{table.markdown()}\n{FOOTNOTE}"))
    return Benchmark(group, jobs, table, markdown, parent)
