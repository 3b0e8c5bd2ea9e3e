"""Write one self-contained HTML report of a sweep or a method benchmark and log it to its parent
MLflow run (artifact report/report.html, shown in the MLflow UI).

Examples (from the project folder):
  python scripts/report.py 3f2a9c...                               # the parent run's id
  python scripts/report.py outputs/multirun/2026-11-28/14-03-07    # a sweep's folder
  python scripts/report.py outputs/benchmark/2026-11-28_14-03-07   # a benchmark's folder
  python scripts/report.py 3f2a9c... --tracking-uri sqlite:////abs/mlflow.db --out /tmp/report --no-log
The logic lives in kdresearch/reports/html_report.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.tracking.store import default_tracking_uri

EPILOG = """\
SWEEP_OR_BENCHMARK is the parent run of a group of jobs (tag role=sweep for a Hydra multirun,
role=benchmark for scripts/benchmark_methods.py, role=reproduction for
scripts/reproduce_tutorial.py), given by its run id or by the folder the group ran in (it holds
mlflow_parent_run.json, which also names the store).

The page shows the latest finished run of every configuration in the group: the best
configuration's headline numbers (also the parent's headline/* metrics), the comparison table of
scripts/compare.py (differences to the student alone and to KD with 95 % intervals and p-values,
seed counts), a benchmark's own table, accuracy per epoch with ± std bands over seeds and the
differences with their intervals as a figure, fidelity to the teacher (agreement, KL), budgets
(budget/* metrics; a note when the compared rows differ in them), lineage (git commit, versions)
and the runs. CSS and figure are inside the file: it opens without a network.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="SWEEP_OR_BENCHMARK",
                        help="the parent run id of a sweep or benchmark, or its folder")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow store or server (default: the one the folder's mlflow_parent_run.json names, "
                             f"else {default_tracking_uri()})")
    parser.add_argument("--out", type=Path,
                        help="folder for report.html and the comparison's files (default: "
                             "outputs/reports/<parent run name>)")
    parser.add_argument("--no-log", action="store_true", help="write the page but do not log it to the parent run")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from kdresearch.reports.html_report import report

    try:
        result = report(args.target, args.tracking_uri, args.out, log_to_parent=not args.no_log)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {result.path}")
    if result.headline is not None:
        metrics = result.headline.metrics()
        print(f"best: {result.headline.row.label}: test/acc {metrics['headline/test_acc']:.2f} "
              f"(n={metrics['headline/seeds']:.0f})")
    if result.artifact:
        print(f"logged to parent run {result.parent_run_id} as {result.artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
