"""The published CIFAR-100 figures the method benchmark compares with (published_cifar100.csv beside
this module): one row per pair, method and source, with the epochs the student was trained for and the
augmented views of each image per step, so that a figure from a longer or multi-view recipe (MLKD: 480
epochs, two views) is never read as one of the 240-epoch benchmark recipe. The file's header comment
cites each source. The first row of a pair and method is the figure the benchmark compares with; later
rows of the same pair and method are other sources' different figures, kept for the record.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kdresearch.errors import KDResearchError

PUBLISHED = Path(__file__).with_name("published_cifar100.csv")
PUBLISHED_COLUMNS = ("pair", "method", "top1", "source", "epochs", "views")
# The benchmark recipe of the presets (experiment/cifar100_recipe.yaml): a figure trained otherwise says so.
RECIPE_EPOCHS = 240
RECIPE_VIEWS = 1


@dataclass(frozen=True)
class PublishedFigure:
    """A published top-1 accuracy (%), where it was published and how its student was trained."""

    top1: float
    source: str
    epochs: int
    views: int = RECIPE_VIEWS

    def recipe_note(self) -> str:
        """How its training differs from the benchmark recipe, e.g. "480 epochs, 2 views"; "" when it does not."""
        parts = []
        if self.epochs != RECIPE_EPOCHS:
            parts.append(f"{self.epochs} epochs")
        if self.views != RECIPE_VIEWS:
            parts.append(f"{self.views} views")
        return ", ".join(parts)


@dataclass(frozen=True)
class PublishedRow:
    pair: str
    method: str
    figure: PublishedFigure


def read_published_rows(path: Path = PUBLISHED) -> list[PublishedRow]:
    """Every row of the cited CSV, in file order (lines starting with # are comments). A file that is
    missing, unreadable, lacks a column, or holds a row that does not fit (a field missing or empty,
    top1 not a number, epochs or views not a whole number >= 1, a pair, method and source given twice)
    is refused in one line naming the file and the line."""
    where = f"published figures {path}"
    if not path.is_file():
        raise KDResearchError(f"{where}: {'is not a file' if path.exists() else 'no such file'}")
    try:
        with path.open(newline="") as handle:
            lines = [(number, next(csv.reader([line]))) for number, line in enumerate(handle, start=1)
                     if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as error:
        raise KDResearchError(f"{where}: cannot be read as a text file ({error})") from None
    except csv.Error as error:
        raise KDResearchError(f"{where}: not a valid CSV file ({error})") from None
    if not lines:
        raise KDResearchError(f"{where}: no header line (it needs the columns {', '.join(PUBLISHED_COLUMNS)})")
    header = [name.strip() for name in lines[0][1]]
    missing = [column for column in PUBLISHED_COLUMNS if column not in header]
    if missing:
        raise KDResearchError(f"{where}: its header line has no column {', '.join(missing)} "
                              f"(it needs {', '.join(PUBLISHED_COLUMNS)})")
    rows, seen = [], {}
    for number, fields in lines[1:]:
        if len(fields) < len(header):
            raise KDResearchError(f"{where}: line {number} has {len(fields)} fields, the header {len(header)}")
        row = {name: value.strip() for name, value in zip(header, fields)}
        empty = [column for column in PUBLISHED_COLUMNS if not row[column]]
        if empty:
            raise KDResearchError(f"{where}: line {number}: no {', '.join(empty)} (every figure needs "
                                  f"{', '.join(PUBLISHED_COLUMNS)})")
        figure = PublishedFigure(_number(row["top1"], "top1", where, number), row["source"],
                                 _count(row["epochs"], "epochs", where, number),
                                 _count(row["views"], "views", where, number))
        key = (row["pair"], row["method"], row["source"])
        if key in seen:
            raise KDResearchError(f"{where}: line {number} repeats line {seen[key]} (pair {row['pair']}, method "
                                  f"{row['method']!r}, source {row['source']})")
        seen[key] = number
        rows.append(PublishedRow(row["pair"], row["method"], figure))
    return rows


def read_published(path: Path = PUBLISHED) -> dict[tuple[str, str], PublishedFigure]:
    """{(method, pair): the figure the benchmark compares with}: the first row of each pair and method."""
    figures: dict[tuple[str, str], PublishedFigure] = {}
    for row in read_published_rows(path):
        figures.setdefault((row.method, row.pair), row.figure)
    return figures


def _number(text: str, column: str, where: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise KDResearchError(f"{where}: line {line}: {column} {text!r} is not a number") from None


def _count(text: str, column: str, where: str, line: int) -> int:
    if not text.isdigit() or int(text) < 1:
        raise KDResearchError(f"{where}: line {line}: {column} {text!r} is not a whole number >= 1")
    return int(text)
