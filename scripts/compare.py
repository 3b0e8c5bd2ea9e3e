"""Compare finished kdresearch runs: print a table, write it as Markdown and CSV with a figure, and
log all three to MLflow as artifacts of a summary run (tag role=summary).

Examples (from the project folder):
  python scripts/compare.py                                   # every finished run of experiment kdresearch
  python scripts/compare.py --sweep outputs/multirun/2026-11-28/14-03-07
  python scripts/compare.py --tag role=student                # tag filters (repeatable, AND)
  python scripts/compare.py --filter "params.epochs = '10'"   # any MLflow filter string
  python scripts/compare.py --run-ids 3f2a... 9be1...
The logic lives in kdresearch/reports/compare.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.reports.compare import compare, default_name, select_runs
from kdresearch.tracking.store import Tracker, default_tracking_uri


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Rows: runs of one configuration (all params but the seed) are one row, mean ± std over their "
            "seeds; the newest run counts when a configuration and seed were run twice. 'Δ vs student CE' "
            "is the difference of the mean final test/acc to the student trained with cross-entropy on the "
            "same data and epochs, with its 95 % confidence interval and the t-test's p-value: paired by seed "
            "when the baseline has a run of every seed of the row, else Welch's unpaired test; 'Δ vs KD' the "
            "same to the student trained with KD. Fewer than 3 seeds are marked. A student whose "
            "first_layer_norm at step 0 differs from the baseline's is marked UNFAIR (it did not start from "
            "the same weights). When the students' rows differ in budget (epochs, steps, images seen, views per "
            "image: the runs' budget/* metrics), a note under the table says which rows have which."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    select = parser.add_argument_group("which runs (default: every finished run of the experiment)")
    select.add_argument("--experiment", help="MLflow experiment name (default: kdresearch; with --run-ids: "
                                             "the experiment of the first run)")
    select.add_argument("--sweep", help="only runs with this tag `sweep` (a multirun folder, or the one "
                                        "scripts/reproduce_tutorial.py prints)")
    select.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag value (repeatable), e.g. --tag loss=kd --tag role=student")
    select.add_argument("--filter", dest="filter_string", metavar="MLFLOW_FILTER",
                        help="an MLflow search filter, e.g. \"params.epochs = '10'\"")
    select.add_argument("--run-ids", nargs="+", default=[], metavar="RUN_ID", help="exactly these runs")
    select.add_argument("--include-unfinished", action="store_true",
                        help="also runs that are RUNNING, FAILED or KILLED")

    table = parser.add_argument_group("table")
    table.add_argument("--per-run", action="store_true", help="one row per run instead of per configuration")
    table.add_argument("--baseline", metavar="LABEL|RUN_NAME|RUN_ID",
                       help="the row to compute differences to (default: the student trained with CE)")
    table.add_argument("--kd-reference", metavar="LABEL|RUN_NAME|RUN_ID",
                       help="the row of the 'Δ vs KD' columns (default: the student trained with loss=kd)")

    output = parser.add_argument_group("output")
    output.add_argument("--tracking-uri", default=None,
                        help=f"MLflow store or server (default: {default_tracking_uri()})")
    output.add_argument("--name", help="summary run name and table title (default: comparison-<date>_<time>)")
    output.add_argument("--out", type=Path, help="folder for comparison.md/.csv/.png "
                                                 "(default: outputs/comparisons/<name>)")
    output.add_argument("--no-log", action="store_true", help="write the files but log no summary run")
    return parser.parse_args(argv)


def _tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KDResearchError(f"--tag wants KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        tracker = Tracker(args.tracking_uri, args.experiment or "kdresearch")
        runs = select_runs(tracker, args.run_ids, args.sweep, _tags(args.tag), args.filter_string,
                           args.include_unfinished)
        if args.run_ids and not args.experiment:  # the summary goes where the compared runs are
            experiment = tracker.client.get_experiment(runs[0].info.experiment_id).name
            if experiment != "kdresearch":
                tracker = Tracker(args.tracking_uri, experiment)
        name = args.name or default_name()
        selection = {"experiment": args.experiment, "sweep": args.sweep, "tags": " ".join(args.tag),
                     "filter": args.filter_string, "run_ids": " ".join(args.run_ids)}
        result = compare(tracker, runs, args.out or Path("outputs") / "comparisons" / name, name=name,
                         per_run=args.per_run, baseline=args.baseline, kd_reference=args.kd_reference,
                         log_summary=not args.no_log,
                         selection=selection)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.table)
    print(result.footnote + "\n")
    print(f"wrote {result.markdown}, {result.csv}, {result.figure}")
    if result.summary_run_id:
        print(f"logged to MLflow ({tracker.uri}) as run {result.summary_run_id} ({name}, tag role=summary), "
              f"artifacts under comparison/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
