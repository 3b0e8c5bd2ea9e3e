"""Differences over seeds (kdresearch.reports.statistics) against SciPy and a hand computation, and
the comparison and benchmark tables built from fabricated runs with 1, 2 and 5 seeds."""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from types import SimpleNamespace

import pytest
from conftest import load_script
from matplotlib.figure import Figure
from scipy import stats

from kdresearch.errors import KDResearchError
from kdresearch.pipelines import method_benchmark
from kdresearch.pipelines.jobs import PlannedJob
from kdresearch.reports import statistics as seed_statistics
from kdresearch.reports.compare import (
    RunRecord,
    build_rows,
    compare,
    markdown_table,
    plot_differences,
    write_csv,
    write_markdown,
)
from kdresearch.reports.statistics import PAIRED, WELCH, paired_difference, seed_difference, welch_difference
from kdresearch.sweeps.parent_runs import GroupSummary

# Last-epoch test accuracies (%) per seed.
CE = {1: 70.1, 2: 70.5, 3: 70.9, 4: 71.0, 5: 70.2}
KD = {1: 71.2, 2: 70.8, 3: 72.1, 4: 71.5, 5: 70.9}
DKD = {1: 71.9, 2: 71.0}  # two of the baseline's seeds: paired, too few to trust
AT = {1: 70.6}  # one seed: no interval
FITNET = {6: 70.0, 7: 71.0, 8: 72.0}  # seeds the baseline lacks: Welch
T_975_4 = 2.7764451051977934  # Student's t, 97.5 % quantile, 4 degrees of freedom (from a table)


def test_paired_difference_against_scipy_and_by_hand():
    values, reference = [KD[seed] for seed in CE], list(CE.values())
    difference = paired_difference(values, reference)
    # By hand: the per-seed differences 1.1, 0.3, 1.2, 0.5, 0.7; their mean 0.76, sample variance
    # 0.592 / 4 = 0.148, standard error sqrt(0.148 / 5); the interval mean ± t(0.975, 4) × standard error.
    standard_error = math.sqrt(0.148 / 5)
    assert difference.mean == pytest.approx(0.76)
    assert (difference.low, difference.high) == pytest.approx((0.76 - T_975_4 * standard_error,
                                                               0.76 + T_975_4 * standard_error))
    assert difference.p_value == pytest.approx(2 * stats.t.sf(0.76 / standard_error, 4))
    assert (difference.test, difference.n, difference.n_reference, difference.few_seeds) == (PAIRED, 5, 5, False)
    # SciPy's own paired test and interval.
    scipy_result = stats.ttest_rel(values, reference)
    assert difference.p_value == pytest.approx(scipy_result.pvalue)
    interval = scipy_result.confidence_interval(0.95)
    assert (difference.low, difference.high) == pytest.approx((interval.low, interval.high))
    assert difference.format() == f"+0.76 [{difference.low:+.2f}, {difference.high:+.2f}] (n=5)"
    assert difference.format_p() == f"{scipy_result.pvalue:.3f}"


def test_welch_difference_against_scipy_and_by_hand():
    values, reference = [70.0, 71.0, 72.0], [68.0, 69.5, 71.0, 72.5, 74.0]
    difference = welch_difference(values, reference)
    # By hand: both means 71, sample variances 1 and 5.625; the standard error from the variances
    # over the counts, the degrees of freedom Welch–Satterthwaite's.
    share, share_reference = 1.0 / 3, 5.625 / 5
    degrees_of_freedom = (share + share_reference) ** 2 / (share ** 2 / 2 + share_reference ** 2 / 4)
    half_width = stats.t.ppf(0.975, degrees_of_freedom) * math.sqrt(share + share_reference)
    assert difference.mean == pytest.approx(0.0, abs=1e-12)
    assert (difference.low, difference.high) == pytest.approx((-half_width, half_width))
    assert (difference.test, difference.n, difference.n_reference, difference.few_seeds) == (WELCH, 3, 5, False)
    scipy_result = stats.ttest_ind(values, reference, equal_var=False)
    assert scipy_result.df == pytest.approx(degrees_of_freedom)
    interval = scipy_result.confidence_interval(0.95)
    assert (difference.low, difference.high) == pytest.approx((interval.low, interval.high))
    assert difference.p_value == pytest.approx(scipy_result.pvalue) and difference.p_value == pytest.approx(1.0)
    # A shifted sample: the mean moves, the interval's width stays.
    shifted = welch_difference([value + 1.5 for value in values], reference)
    assert shifted.mean == pytest.approx(1.5)
    assert (shifted.low, shifted.high) == pytest.approx((1.5 - half_width, 1.5 + half_width))
    assert shifted.p_value == pytest.approx(stats.ttest_ind([v + 1.5 for v in values], reference,
                                                            equal_var=False).pvalue)
    assert shifted.format().endswith("(n=3 vs 5, Welch)")


def test_seed_difference_pairs_by_seed_else_welch():
    def runs(values: dict) -> list:
        return list(values.items())

    # The same seeds, in another order: paired by seed, not by position.
    shuffled = list(reversed(runs(KD)))
    assert seed_difference(shuffled, runs(CE)) == paired_difference(list(KD.values()), list(CE.values()))
    # A subset of the reference's seeds: paired on those seeds.
    two = seed_difference(runs(DKD), runs(CE))
    assert two == paired_difference([71.9, 71.0], [70.1, 70.5])
    assert two.test == PAIRED and two.n == 2 and two.few_seeds and two.low is not None
    assert two.mean == pytest.approx(1.15)
    assert two.high - two.mean == pytest.approx(stats.t.ppf(0.975, 1) * statistics.stdev([1.8, 0.5]) / math.sqrt(2))
    # Seeds the reference lacks, a seed twice, or no seed: unpaired.
    assert seed_difference(runs(FITNET), runs(CE)) == welch_difference(list(FITNET.values()), list(CE.values()))
    assert seed_difference([(1, 71.0), (1, 72.0)], runs(CE)).test == WELCH
    assert seed_difference([(None, 71.0), (None, 72.0)], runs(CE)).test == WELCH
    # One seed on a side: the difference but no interval and no p-value, marked.
    one = seed_difference(runs(AT), runs(CE))
    assert one.mean == pytest.approx(0.5) and (one.low, one.high, one.p_value) == (None, None, None)
    assert one.format() == "+0.50 (n=1, < 3 seeds, no interval)" and one.format_p() == "—"
    lone_reference = seed_difference(runs(FITNET), [(9, 70.0)])
    assert lone_reference.test == WELCH and lone_reference.low is None and lone_reference.mean == pytest.approx(1.0)
    # Missing values are left out; nothing on a side: no difference.
    assert seed_difference([(1, None), (2, 71.0)], runs(CE)) == paired_difference([71.0], [70.5])
    assert seed_difference([(1, None)], runs(CE)) is None and seed_difference(runs(KD), []) is None


def test_values_that_do_not_vary_have_no_interval_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SciPy warns of catastrophic cancellation on such samples
        same = paired_difference([71.5, 70.5, 72.5], [70.0, 69.0, 71.0])  # each seed +1.5
        assert same.mean == pytest.approx(1.5) and same.low is None and same.p_value is None
        assert same.format() == "+1.50 (n=3, no interval)"
        flat = welch_difference([70.0, 70.0], [69.0, 69.0, 69.0])
        assert flat.mean == pytest.approx(1.0) and flat.low is None and flat.p_value is None
    # A mean's interval needs two values that vary; fewer give none, an empty list too.
    assert seed_statistics.mean_interval([]) is None and seed_statistics.mean_interval([70.0]) is None
    assert seed_statistics.mean_interval([70.0, 70.0]) is None


def test_p_value_and_seed_count_formats():
    assert seed_statistics.format_p(0.04321) == "0.043" and seed_statistics.format_p(2e-5) == "< 0.001"
    assert seed_statistics.format_p(None) == "—"
    assert [seed_statistics.seed_count(n) for n in (1, 2, 3, 5)] == [
        "n=1, < 3 seeds", "n=2, < 3 seeds", "n=3", "n=5"]


# --- the comparison table ----------------------------------------------------------------------------

def _records(loss: str, accs: dict[int, float], start: int) -> list[RunRecord]:
    return [RunRecord(run_id=f"{loss}{seed}", name=f"light-{loss}", start_time=start + seed, role="student",
                      model="light", loss=loss, seed=seed, hyperparameters={}, parameter_count=1,
                      identity=(("loss", loss),), context=("data", "2"),
                      history={"test/acc": [(1, acc - 5.0), (2, acc)], "first_layer_norm": [(0, 2.5)]})
            for seed, acc in accs.items()]


def _fabricated_rows():
    records = [*_records("ce", CE, 0), *_records("kd", KD, 100), *_records("dkd", DKD, 200),
               *_records("at", AT, 300), *_records("fitnet", FITNET, 400)]
    return build_rows(records)


def _cells(markdown: str) -> dict[str, dict[str, str]]:
    header, _, *lines = markdown.splitlines()
    titles = [cell.strip() for cell in header.strip("| ").split(" | ")]
    return {cells[0]: dict(zip(titles, cells)) for cells in
            ([cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines)}


def test_comparison_table_shows_counts_intervals_and_marks(tmp_path):
    rows = _fabricated_rows()
    by_label = {row.label: row for row in rows}
    cells = _cells(markdown_table(rows))
    ce, kd, dkd, at, fitnet = (cells[f"light-{loss}"] for loss in ("ce", "kd", "dkd", "at", "fitnet"))
    # The number of seeds in every row, fewer than 3 marked.
    assert [row["n"] for row in (ce, kd, dkd, at, fitnet)] == [
        "n=5", "n=5", "n=2, < 3 seeds", "n=1, < 3 seeds", "n=3"]
    # Differences to the student alone: paired by seed, Welch where the seeds differ.
    expected = {
        "kd": paired_difference(list(KD.values()), list(CE.values())),
        "dkd": paired_difference([71.9, 71.0], [70.1, 70.5]),
        "at": paired_difference([70.6], [70.1]),
        "fitnet": welch_difference(list(FITNET.values()), list(CE.values())),
    }
    for loss, difference in expected.items():
        row, line = by_label[f"light-{loss}"], cells[f"light-{loss}"]
        assert row.vs_baseline == difference and row.delta == pytest.approx(difference.mean)
        assert line["Δ vs student CE [95 % CI]"] == difference.format(2)
        assert line["p vs student CE"] == difference.format_p()
    assert kd["Δ vs student CE [95 % CI]"].endswith("(n=5)") and "[" in kd["Δ vs student CE [95 % CI]"]
    assert dkd["Δ vs student CE [95 % CI]"].endswith("(n=2, < 3 seeds)")
    assert at["Δ vs student CE [95 % CI]"] == "+0.50 (n=1, < 3 seeds, no interval)" and at["p vs student CE"] == "—"
    assert fitnet["Δ vs student CE [95 % CI]"].endswith("(n=3 vs 5, Welch)")
    assert (ce["Δ vs student CE [95 % CI]"], ce["p vs student CE"]) == ("baseline", "—")
    # Differences to KD, KD's own row the reference.
    assert by_label["light-dkd"].vs_kd == paired_difference([71.9, 71.0], [71.2, 70.8])
    assert by_label["light-ce"].vs_kd == paired_difference(list(CE.values()), list(KD.values()))
    assert (kd["Δ vs KD [95 % CI]"], kd["note"]) == ("KD reference", "KD reference")
    assert dkd["Δ vs KD [95 % CI]"] == by_label["light-dkd"].vs_kd.format(2)
    # The footnote says how the intervals were made.
    footnote = write_markdown(rows, tmp_path / "comparison.md", "fabricated").read_text().split("\n\n")[-1]
    assert "Welch" in footnote and "paired by seed" in footnote and "KD reference: light-kd" in footnote
    # The CSV holds the full-precision interval, test and counts.
    with write_csv(rows, tmp_path / "comparison.csv").open() as handle:
        lines = {line["run"]: line for line in csv.DictReader(handle)}
    fitnet_line, at_line = lines["light-fitnet"], lines["light-at"]
    assert float(fitnet_line["delta_vs_baseline_low"]) == expected["fitnet"].low
    assert float(fitnet_line["delta_vs_baseline_p_value"]) == expected["fitnet"].p_value
    assert (fitnet_line["delta_vs_baseline_test"], fitnet_line["delta_vs_baseline_n"],
            fitnet_line["delta_vs_baseline_n_reference"]) == (WELCH, "3", "5")
    assert (at_line["delta_vs_baseline_low"], at_line["delta_vs_baseline_p_value"]) == ("", "")
    assert float(lines["light-dkd"]["delta_vs_kd"]) == pytest.approx(0.45)
    assert lines["light-dkd"]["kd_reference"] == "light-kd"


def test_figure_shows_the_differences_with_their_intervals():
    rows = _fabricated_rows()
    figure = Figure()
    ax = figure.subplots()
    plot_differences(ax, rows)
    vs_ce, vs_kd = ax.containers  # one errorbar series per reference
    shown = [row for row in rows if row.vs_baseline is not None or row.vs_kd is not None]
    assert [label.get_text() for label in ax.get_yticklabels()] == [
        f"{row.label} ({seed_statistics.seed_count(len(row.runs))})" for row in shown]
    with_baseline = [row.vs_baseline for row in shown if row.vs_baseline is not None]
    assert list(vs_ce.lines[0].get_xdata()) == pytest.approx([d.mean for d in with_baseline])
    bars = vs_ce.lines[2][0].get_segments()  # one horizontal bar per difference, from low to high
    ends = [end for bar in bars for end in (bar[0][0], bar[1][0])]
    assert ends == pytest.approx([end for d in with_baseline for end in ((d.mean, d.mean) if d.low is None
                                                                          else (d.low, d.high))])
    assert len(vs_kd.lines[0].get_xdata()) == sum(row.vs_kd is not None for row in shown)


# --- the method benchmark's table --------------------------------------------------------------------

PAIR = "cifar100_res56_res20"


def test_benchmark_table_shows_counts_and_differences():
    """build_table on a fabricated store: ce and kd at 5 seeds, dkd at 2, at at 1."""
    methods = {"ce": CE, "kd": KD, "dkd": DKD, "at": AT}
    runs, jobs = {}, []
    for method, accs in methods.items():
        for seed in accs:
            run_id = f"{method}-{seed}"
            tags = {} if method == "ce" else {"teacher_run_id": f"teacher-{seed}"}
            runs[run_id] = SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags))
            jobs.append(PlannedJob(f"{PAIR}|{method}", seed, f"out/{run_id}", [], [run_id]))
    histories = {f"{method}-{seed}": acc for method, accs in methods.items() for seed, acc in accs.items()}
    histories.update({f"teacher-{seed}": 75.0 + seed / 10 for seed in KD})

    class Client:
        def get_run(self, run_id):
            return runs[run_id]

        def get_metric_history(self, run_id, key):
            return [SimpleNamespace(step=1, value=histories[run_id])] if key == "test/acc" else []

    table = method_benchmark.build_table(Client(), jobs, [PAIR], ["kd", "dkd", "at"], {})
    cell = table.cells
    assert [cell[(method, PAIR)].last.n for method in ("teacher", "ce", "kd", "dkd", "at")] == [5, 5, 5, 2, 1]
    assert cell[("kd", PAIR)].vs_student == paired_difference(list(KD.values()), list(CE.values()))
    assert cell[("dkd", PAIR)].vs_student == paired_difference([71.9, 71.0], [70.1, 70.5])
    assert cell[("dkd", PAIR)].vs_kd == paired_difference([71.9, 71.0], [71.2, 70.8])
    assert cell[("kd", PAIR)].vs_kd is None and cell[("ce", PAIR)].vs_student is None
    assert cell[("teacher", PAIR)].vs_student is None
    markdown = table.markdown()
    accuracy, differences = markdown.split("\n\n")
    lines = {line.split(" | ")[0].strip("| "): line for line in accuracy.splitlines()[2:]}
    assert lines["ce"].endswith("(n=5) |") and lines["teacher"].endswith("(n=5) |")
    assert lines["dkd"].endswith("(n=2, < 3 seeds) |") and lines["at"].endswith("(n=1, < 3 seeds) |")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].rstrip(" |")
            for line in differences.splitlines()[2:]}
    assert list(rows) == ["kd − ce", "dkd − ce", "at − ce", "dkd − kd", "at − kd"]
    kd_vs_ce = cell[("kd", PAIR)].vs_student
    assert rows["kd − ce"] == f"{kd_vs_ce.format(2)}, p {kd_vs_ce.format_p()}"
    assert rows["dkd − ce"].endswith("(n=2, < 3 seeds), p " + cell[("dkd", PAIR)].vs_student.format_p())
    assert rows["at − kd"] == "-0.60 (n=1, < 3 seeds, no interval), p —"
    assert "Welch" in method_benchmark.FOOTNOTE and "marked below 3" in method_benchmark.FOOTNOTE


def test_kd_reference_is_chosen_by_name():
    records = [*_records("ce", CE, 0), *_records("kd", KD, 100), *_records("dkd", DKD, 200)]
    rows = {row.label: row for row in build_rows(records, kd_reference="light-dkd")}
    assert rows["light-dkd"].is_kd_reference and rows["light-dkd"].note == "KD reference"
    # KD's seeds 3 to 5 have no run of the reference: unpaired.
    assert rows["light-kd"].vs_kd == welch_difference(list(KD.values()), [71.9, 71.0])
    assert rows["light-ce"].vs_kd == welch_difference(list(CE.values()), [71.9, 71.0])
    assert rows["light-kd"].vs_baseline == paired_difference(list(KD.values()), list(CE.values()))
    with pytest.raises(KDResearchError, match="KD reference 'light-x' is none of the compared runs"):
        build_rows(records, kd_reference="light-x")
    compare_script = load_script("compare")
    assert compare_script.parse_args(["--kd-reference", "light-dkd"]).kd_reference == "light-dkd"


def test_sweep_parent_note_holds_the_differences(tmp_path):
    """A sweep's parent shows the comparison of its children (GroupSummary.of_comparison): with the
    intervals, the counts and the marks."""
    accs = {("ce", 1): 70.1, ("ce", 2): 70.5, ("kd", 1): 71.2, ("kd", 2): 70.8}

    class Client:
        def get_metric_history(self, run_id, key):
            loss, seed = run_id.split("-")
            if key == "test/acc":
                return [SimpleNamespace(step=1, value=accs[(loss, int(seed))])]
            return [SimpleNamespace(step=0, value=2.5)] if key == "first_layer_norm" else []

    def run(loss, seed):
        params = {"seed": str(seed), "epochs": "1", "loss.name": loss, "loss._target_": f"losses.{loss}",
                  "model.name": "light"}
        tags = {"role": "student", "loss": loss, "model": "light", "data_fingerprint": "data"}
        return SimpleNamespace(info=SimpleNamespace(run_id=f"{loss}-{seed}", run_name=f"light-{loss}",
                                                    start_time=seed),
                               data=SimpleNamespace(params=params, tags=tags, metrics={}))

    result = compare(SimpleNamespace(client=Client()), [run(loss, seed) for loss, seed in accs], tmp_path,
                     name="sweep", log_summary=False)
    note = GroupSummary.of_comparison(result).note
    difference = paired_difference([71.2, 70.8], [70.1, 70.5])
    line = _cells(note.split("\n\n")[0])["light-kd"]
    assert line["Δ vs student CE [95 % CI]"] == difference.format(2) and difference.low is not None
    assert line["p vs student CE"] == difference.format_p() and line["n"] == "n=2, < 3 seeds"
    assert "Welch" in note and result.figure.read_bytes()[:4] == b"\x89PNG"
