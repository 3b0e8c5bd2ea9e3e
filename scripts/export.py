"""Export a trained run as a bundle another lab can check: its final weights (safetensors), config,
command line, metrics per epoch, teacher provenance, lineage, a model card and the sha256 of every file.

Examples (from the project folder):
  python scripts/export.py 3f2a9c... exports/resnet8x4-kd
  python scripts/export.py 3f2a9c... exports/resnet8x4-kd --force        # replace an earlier export
  python scripts/export.py 3f2a9c... out --tracking-uri sqlite:////abs/mlflow.db
The logic lives in kdresearch/sharing/export.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.tracking.store import default_tracking_uri

EPILOG = """\
OUT_DIR receives (kdresearch/sharing/bundle.py describes each file):
  README.md            model card: accuracy table (final test, best validation epoch and its test
                       accuracy), model, teacher, loss, data, seed, epochs; how to check and reuse it
  weights.safetensors  the run's final weights (artifact checkpoints/final.pt)
  config.yaml          the resolved config; command.txt: the command that started the run
  metrics.csv          every metric, one row per epoch (system_metrics.csv: MLflow's samples, if any)
  teacher.json         the teacher's provenance (runs distilled from a teacher)
  lineage.json         run, git commit, package versions, hardware (git_diff.patch: a dirty checkout's changes)
  SHA256SUMS           sha256 of every other file: check with  cd OUT_DIR && sha256sum -c SHA256SUMS

It is written beside OUT_DIR and renamed into place when complete: an error leaves OUT_DIR as it
was. A bundle is a teacher too: python train.py loss=kd teacher=MODEL teacher.checkpoint=OUT_DIR
verifies every digest in SHA256SUMS before loading the weights, and refuses a changed file.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow run to export (it needs a final checkpoint)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="the bundle's folder: new, empty, or (with --force) an earlier bundle")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier bundle in OUT_DIR (a folder holding other files is never replaced)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help=f"MLflow store or server holding the run (default: {default_tracking_uri()})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from kdresearch.sharing.export import export_run  # after parsing: --help stays fast
    from kdresearch.tracking.store import Tracker

    try:
        exported = export_run(Tracker(args.tracking_uri, "kdresearch"), args.run_id, args.out_dir, force=args.force)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported MLflow run {exported.run_id} ({exported.run_name}) to {exported.folder}: "
          f"{', '.join(exported.files)}")
    print(f"check it:  cd {exported.folder} && sha256sum -c SHA256SUMS")
    if exported.model:
        print(f"distil from it:  python train.py loss=kd teacher={exported.model} teacher.checkpoint={exported.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
