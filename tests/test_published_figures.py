"""The published CIFAR-100 figures the method benchmark compares with: every row of the shipped file
cites a source of its header and the epochs its student trained for, names a method a user can run
(or one marked as not yet available) on a pair the benchmark knows, a figure from another recipe
says so in its table cell, and a file that does not fit is refused in one line naming the file and
the line."""

from __future__ import annotations

import re

import pytest
import yaml

from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.pipelines.method_benchmark import TEACHER, Cell
from kdresearch.pipelines.published_figures import (
    PUBLISHED,
    PublishedFigure,
    read_published,
    read_published_rows,
)
from kdresearch.reports.compare import Stat

PAIR = "cifar100_res56_res20"
HEADER = "pair,method,top1,source,epochs,views\n"

# Loss names with published figures but no loss= config yet (none today: every published method runs);
# the test below fails once such a config exists, so the set cannot go stale.
NOT_YET_AVAILABLE: set[str] = set()
# Pairs of the suites' tables that have no experiment preset yet.
PAIRS_WITHOUT_PRESET = {"cifar100_res110_res32", "cifar100_wrn40_2_wrn40_1"}
# The file's source key of each method's own authors, for the methods that more than one source reports.
AUTHORS = {"dkd": "mdistiller", "dist": "dist", "ctkd": "ctkd"}


def test_every_row_cites_a_source_of_the_header_and_its_training():
    rows = read_published_rows()
    cited = set(re.findall(r"^# (\w+): github\.com/", PUBLISHED.read_text(), flags=re.MULTILINE))
    assert len(rows) > 150 and cited == {"repdistiller", "mdistiller", "dist", "ctkd", "ls", "wttm", "nd"}
    assert {row.figure.source for row in rows} == cited
    # Figures from another recipe than 240 epochs of one view are MLKD's (480 or more epochs, two views).
    other_recipe = [row for row in rows if row.figure.recipe_note()]
    assert {row.method.split()[0] for row in other_recipe} == {"mlkd"}
    assert all(row.figure.views == 2 and row.figure.epochs >= 480 for row in other_recipe)
    assert all(row.figure.epochs == 240 and row.figure.views == 1 for row in rows if row not in other_recipe)


def test_every_method_is_a_loss_config_or_marked_not_yet_available():
    for method in {row.method for row in read_published_rows()}:
        name, *options = method.split()
        if name == TEACHER:
            assert not options
            continue
        loss = CONF_DIR / "loss" / f"{name}.yaml"
        assert loss.is_file() or name in NOT_YET_AVAILABLE, f"{method!r}: no loss={name} config"
        for option in options:
            key, value = option.split("=", 1)
            if key.startswith("loss."):  # a key of the method's own config
                assert name in NOT_YET_AVAILABLE or key.removeprefix("loss.") in yaml.safe_load(loss.read_text()), \
                    f"{method!r}: loss={name} has no key {key}"
            else:  # another config group's choice, e.g. optimizer=dot
                assert (CONF_DIR / key / f"{value}.yaml").is_file(), f"{method!r}: no {key}={value} config"
    for name in NOT_YET_AVAILABLE:
        assert not (CONF_DIR / "loss" / f"{name}.yaml").is_file(), f"loss={name} exists: drop it from NOT_YET_AVAILABLE"


def test_pairs_are_presets_or_the_suites_pairs_without_one():
    for pair in {row.pair for row in read_published_rows()}:
        assert (CONF_DIR / "experiment" / f"{pair}.yaml").is_file() or pair in PAIRS_WITHOUT_PRESET, pair


def test_a_figure_reported_differently_by_two_sources_compares_with_its_authors():
    sources: dict[tuple[str, str], list[PublishedFigure]] = {}
    for row in read_published_rows():
        sources.setdefault((row.method, row.pair), []).append(row.figure)
    several = {key: figures for key, figures in sources.items() if len(figures) > 1}
    assert several  # e.g. DKD on wrn_40_2 -> wrn_16_2: 76.23 (mdistiller), 76.24 (ls)
    compared = read_published()
    for (method, pair), figures in several.items():
        assert len({figure.top1 for figure in figures}) == len(figures), f"{method} {pair}: the same figure twice"
        assert figures[0].source == AUTHORS[method] and compared[(method, pair)] == figures[0]
    assert compared[("dkd", "cifar100_wrn40_2_wrn16_2")] == PublishedFigure(76.23, "mdistiller", 240, 1)


def test_a_cell_says_when_its_published_figure_was_trained_otherwise():
    mlkd = Cell(Stat.of([76.5]), Stat.of([]), PublishedFigure(77.08, "ls", epochs=480, views=2))
    assert mlkd.format() == "76.50 (pub. 77.08 [480 epochs, 2 views], -0.58) (n=1, < 3 seeds)"
    kd = Cell(Stat.of([71.0]), Stat.of([]), PublishedFigure(70.66, "repdistiller", epochs=240, views=1))
    assert kd.format() == "71.00 (pub. 70.66, +0.34) (n=1, < 3 seeds)"


@pytest.mark.parametrize("content, problem", [
    ("a,b\n1,2\n", "its header line has no column pair, method, top1, source, epochs, views"),
    ("pair,method,top1,source\nx,kd,70,y\n", "its header line has no column epochs, views"),
    (f"# a comment\n{HEADER}{PAIR},kd,abc,somewhere,240,1\n", "line 3: top1 'abc' is not a number"),
    (f"{HEADER}\n{PAIR},kd,70.1,somewhere\n", "line 3 has 4 fields, the header 6"),
    (f"{HEADER}{PAIR},kd,70.1,,240,1\n", "line 2: no source"),
    (f"{HEADER}{PAIR},kd,70.1,somewhere,,1\n", "line 2: no epochs"),
    (f"{HEADER}{PAIR},kd,70.1,somewhere,0,1\n", "line 2: epochs '0' is not a whole number >= 1"),
    (f"{HEADER}{PAIR},kd,70.1,somewhere,240,two\n", "line 2: views 'two' is not a whole number >= 1"),
    (f"{HEADER}{PAIR},kd,70.1,x,240,1\n{PAIR},kd,70.2,x,240,1\n",
     f"line 3 repeats line 2 (pair {PAIR}, method 'kd', source x)"),
    ("# only a comment\n", "no header line"),
    (b"\xff\xfe\x00pair", "cannot be read as a text file"),
])
def test_published_file_problems_are_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KDResearchError) as raised:
        read_published(path)
    message = str(raised.value)
    assert message.startswith(f"published figures {path}: ") and problem in message and "\n" not in message


def test_published_file_missing_a_folder_or_read(tmp_path):
    with pytest.raises(KDResearchError, match=f"published figures {tmp_path / 'nope.csv'}: no such file"):
        read_published(tmp_path / "nope.csv")
    with pytest.raises(KDResearchError, match="is not a file"):
        read_published(tmp_path)
    good = tmp_path / "good.csv"
    good.write_text(f"# cited\n{HEADER}{PAIR},kd,70.66,repdistiller,240,1\n{PAIR},kd,70.70,other,240,1\n"
                    f"{PAIR},kd loss.standardize=true,71.43,ls,240,1\n")
    assert read_published(good) == {("kd", PAIR): PublishedFigure(70.66, "repdistiller", 240, 1),
                                    ("kd loss.standardize=true", PAIR): PublishedFigure(71.43, "ls", 240, 1)}
    assert [row.figure.source for row in read_published_rows(good)] == ["repdistiller", "other", "ls"]
