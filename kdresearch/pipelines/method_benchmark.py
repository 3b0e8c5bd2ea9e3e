"""The field's benchmark table: for teacher/student pairs (experiment presets), the student alone
and each distillation method, over seeds, as `python train.py` jobs.

Per pair and seed: `loss=ce` (the student alone), then every method (`loss=kd`, `loss=dkd`,
`kd loss.standardize=true`, ...). The first job of a seed trains the pair's teacher with the
preset's teacher recipe and every later job reuses it (automatic teacher, kdresearch.teacher),
so each teacher is trained once per seed. The table has the field's layout: rows are methods,
columns are pairs, cells are mean ± std over seeds of the last-epoch test accuracy and of the
test accuracy at the epoch chosen on validation (with `data.val_size=N`), and, from a small
cited file of published figures (kdresearch/pipelines/published_cifar100.csv), the published value and our
difference to it. Runs are tagged `sweep=<the benchmark's folder>` and the table is logged as an
artifact of a summary run (tag role=summary).
"""

from __future__ import annotations

import csv
import datetime
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR, train_command
from kdresearch.pipelines.reproduce import PlannedJob, override_value, run_job
from kdresearch.reports.compare import SUMMARY_ROLE, Stat
from kdresearch.tracking.run import TrackedRun
from kdresearch.tracking.store import Tracker, metric_history

PUBLISHED = Path(__file__).with_name("published_cifar100.csv")
STUDENT_ALONE = "ce"
TEACHER = "teacher"


def method_overrides(method: str) -> list[str]:
    """`"kd loss.standardize=true"` -> ["loss=kd", "loss.standardize=true"]."""
    name, *options = method.split()
    return [f"loss={name}", *options]


def plan(pairs: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
         group: str) -> list[PlannedJob]:
    """The train.py commands, in order: per pair and seed, the student alone, then each method."""
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
                command = [*train_command(), f"experiment={pair}",
                           *method_overrides(method), f"seed={seed}", "quiet=true", f"hydra.run.dir={folder}",
                           *overrides]
                jobs.append(PlannedJob(f"{pair}|{method}", seed, command))
    return jobs


@dataclass
class Cell:
    last: Stat
    at_best_val: Stat
    published: Optional[float] = None
    source: str = ""

    def format(self) -> str:
        text = self.last.format(2)
        if self.at_best_val.mean is not None:
            text += f" / {self.at_best_val.format(2)}"
        if self.published is not None:
            difference = "" if self.last.mean is None else f", {self.last.mean - self.published:+.2f}"
            text += f" (pub. {self.published:.2f}{difference})"
        return text


@dataclass
class Table:
    pairs: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| method | " + " | ".join(self.pairs) + " |", "|---|" + "---|" * len(self.pairs)]
        for method in self.methods:
            row = [self.cells[(method, pair)].format() if (method, pair) in self.cells else "—" for pair in self.pairs]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"


def read_published(path: Path = PUBLISHED) -> dict[tuple[str, str], tuple[float, str]]:
    """{(method, pair): (top-1 %, source)} from the cited CSV (lines starting with # are comments)."""
    if not path.is_file():
        return {}
    with path.open() as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {(row["method"], row["pair"]): (float(row["top1"]), row["source"]) for row in rows}


def _accuracies(client, run_id: str) -> tuple[Optional[float], Optional[float]]:
    """(last-epoch test/acc, test/acc at the best validation epoch or None)."""
    history = metric_history(client, run_id, ("test/acc", "best/test_acc"))
    last = history["test/acc"][-1][1] if history.get("test/acc") else None
    best = history["best/test_acc"][-1][1] if history.get("best/test_acc") else None
    return last, best


def build_table(client, jobs: Sequence[PlannedJob], pairs: Sequence[str], methods: Sequence[str],
                published: dict) -> Table:
    rows = [TEACHER, STUDENT_ALONE, *[m for m in methods if m != STUDENT_ALONE]]
    values: dict[tuple[str, str], list[tuple[Optional[float], Optional[float]]]] = {}
    teachers: dict[tuple[str, int], str] = {}
    for job in jobs:
        pair, method = job.label.split("|", 1)
        run = client.get_run(job.run_ids[-1])
        values.setdefault((method, pair), []).append(_accuracies(client, run.info.run_id))
        if "teacher_run_id" in run.data.tags:
            teachers[(pair, job.seed)] = run.data.tags["teacher_run_id"]
    for (pair, _), teacher_run_id in teachers.items():
        values.setdefault((TEACHER, pair), []).append(_accuracies(client, teacher_run_id))
    table = Table(list(pairs), rows)
    for (method, pair), accs in values.items():
        cited = published.get((method, pair))
        table.cells[(method, pair)] = Cell(Stat.of(a for a, _ in accs), Stat.of(b for _, b in accs),
                                           *(cited if cited else (None, "")))
    return table


@dataclass
class Benchmark:
    group: str
    jobs: list[PlannedJob]
    table: Optional[Table]
    markdown_path: Optional[Path] = None
    summary_run_id: Optional[str] = None


FOOTNOTE = ("Cells: last-epoch test accuracy (%), mean ± sample std over seeds; after ' / ': the test accuracy of "
            "the epoch chosen on validation (data.val_size > 0); pub.: the published figure (240-epoch CIFAR-100 "
            "recipe; sources in kdresearch/pipelines/published_cifar100.csv) and our difference to it. Teacher row: the teachers "
            "the students used, one per seed.")


def benchmark(pairs: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
              out: Optional[Path] = None, published_path: Optional[Path] = PUBLISHED,
              dry_run: bool = False) -> Benchmark:
    stamp = f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    group = str(out) if out is not None else f"outputs/benchmark/{stamp}"
    jobs = plan(pairs, methods, seeds, overrides, group)
    if dry_run:
        for job in jobs:
            print(shlex.join(["python", *job.command[1:]]))
        return Benchmark(group, jobs, None)
    tracker = Tracker(override_value(overrides, "tracking.uri"),
                      override_value(overrides, "tracking.experiment") or "kdresearch")
    for index, job in enumerate(jobs, start=1):
        for run_id in run_job(job, index, len(jobs)):
            TrackedRun(tracker, run_id).set_tags({"sweep": group})
    published = read_published(published_path) if published_path else {}
    table = build_table(tracker.client, jobs, pairs, methods, published)
    folder = Path(group)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / "benchmark.md"
    markdown.write_text(f"# Distillation benchmark ({group})\n\n{table.markdown()}\n{FOOTNOTE}\n")
    summary = tracker.start_run(f"benchmark-{stamp}", {"role": SUMMARY_ROLE, "sweep": group},
                                {"pairs": " ".join(pairs), "methods": ", ".join(methods),
                                 "seeds": " ".join(map(str, seeds)), "overrides": " ".join(overrides)})
    with summary:
        summary.log_file(markdown, "benchmark")
    return Benchmark(group, jobs, table, markdown, summary.run_id)
