"""Evaluate a trained model on a dataset's test split: print its accuracy, per-class accuracy and
confusion matrix, and log them to MLflow.

Examples (from the project folder):
  python scripts/evaluate.py 3f2a9c...                          # an MLflow run id: its final checkpoint
  python scripts/evaluate.py outputs/2026-11-28/14-03-07/checkpoints/final.pt
  python scripts/evaluate.py 3f2a9c... data.root=../shared/data/cifar10-real-10k data.verify=false
  python scripts/evaluate.py 3f2a9c... data=cifar100 data.root=/data     # another dataset
  python scripts/evaluate.py resnet8x4.pth model=resnet8x4 data=cifar100   # a file from elsewhere
  python scripts/evaluate.py 3f2a9c... device=cpu tracking.uri=sqlite:////abs/mlflow.db
The logic lives in kdresearch/reports/evaluation.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.tracking.store import default_tracking_uri

EPILOG = f"""\
SOURCE is an MLflow run id (its artifact checkpoints/final.pt is evaluated), a job folder (its
checkpoints/final.pt, else its newest epoch checkpoint) or a checkpoint file: one of ours, a
benchmark suite's (weights under `model`, `net` or `state_dict`) or a bare state_dict. Files are
read with torch.load(weights_only=True).

OVERRIDES are Hydra overrides of conf/config.yaml, as for train.py:
  model   the architecture stored in the checkpoint's training config; model=NAME (conf/model/)
          replaces it, and is required for a checkpoint without a stored config.
  data    the checkpoint's own training data settings (dataset, root, limit_test, ...);
          data.KEY=VALUE changes one of them; data=NAME takes conf/data/NAME.yaml instead (with
          any data.KEY=VALUE on top). A checkpoint without a stored config uses conf's data
          (data=cifar10 unless given). Its data.num_classes must be the checkpoint's class count.
  device, tracking
          from the overrides and conf's defaults, never from the checkpoint: device=auto, and the
          store {default_tracking_uri()} with experiment kdresearch unless tracking.uri=... /
          tracking.experiment=... are given.

Results are logged to the MLflow run that produced the weights when that run is in the store
(a run id, or a checkpoint whose run_id is a run of the store), else to a new run
evaluate-<model> (tags role=evaluation, evaluated_checkpoint=<path>):
  metrics   eval/<data>/acc, eval/<data>/loss, eval/<data>/acc/class_<i> (at the checkpoint's epoch)
  tags      eval/<data>/checkpoint, eval/<data>/test_images, eval/<data>/data (the data settings)
  artifacts evaluation/<data>/confusion_matrix.png, confusion_matrix.csv, per_class.csv
where <data> is data.name (cifar10, cifar100, synthetic, image_folder), so evaluations on several
datasets stay apart; evaluating again on the same data adds values at the same step.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] [--out DIR] [--no-log] SOURCE [OVERRIDES ...]",
    )
    parser.add_argument("source", metavar="SOURCE", help="MLflow run id, job folder or checkpoint file")
    parser.add_argument("overrides", metavar="OVERRIDES", nargs="*",
                        help="Hydra overrides, e.g. data=cifar100 data.root=PATH device=cpu tracking.uri=URI")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="also keep confusion_matrix.png/.csv and per_class.csv in DIR")
    parser.add_argument("--no-log", action="store_true", help="print (and with --out write) only; log nothing")
    return parser.parse_intermixed_args(argv)  # options may follow the overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from kdresearch.reports.evaluation import (  # after parsing: --help stays fast
        report,
        run_evaluation,
    )

    try:
        outcome = run_evaluation(args.source, args.overrides, out=args.out, log_to_mlflow=not args.no_log)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config, evaluation = outcome.config, outcome.evaluation
    print(f"{outcome.source.description}: {outcome.model_label} ({config.model._target_}), "
          f"{evaluation.count} test images of {config.data.name}, device {outcome.device}\n")
    print(report(evaluation, outcome.title))
    if outcome.files:
        print(f"\nwrote {', '.join(str(path) for path in outcome.files)}")
    if outcome.run_id:
        where = "a new run" if outcome.new_run else "the run that trained it"
        print(f"\nlogged to MLflow ({outcome.tracking_uri}) {where}, {outcome.run_id} ({outcome.run_name}): "
              f"metrics eval/{outcome.data_name}/..., artifacts under evaluation/{outcome.data_name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
