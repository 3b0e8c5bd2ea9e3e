"""Benchmark distillation methods on teacher/student pairs, over seeds, in the field's table layout.

For every pair (an experiment preset in conf/experiment/) and seed it runs a training job for
the student alone (loss=ce) and for each method; each pair's teacher is trained once per seed (by
the first job, with the preset's teacher recipe) and reused. It prints the table (rows: methods,
columns: pairs; last-epoch test accuracy, and with data.val_size=N the test accuracy at the epoch
chosen on validation; published figures and our difference beside them), writes benchmark.md in
the output folder and logs it to the MLflow parent run whose children are the jobs' runs. Every
OVERRIDE goes to every job, after the preset, so it wins (a shorter schedule, other data, a
tracking store). The logic lives in kdresearch/pipelines/method_benchmark.py.

Examples (from the project folder):
  python scripts/benchmark_methods.py --pairs cifar100_res32x4_res8x4 --methods kd dkd --seeds 42 43 44
  python scripts/benchmark_methods.py --pairs cifar100_res56_res20 --methods kd dkd dist at fitnet crd \\
      "kd loss.standardize=true" --seeds 42 43 44 data=cifar10 data.root=../shared/data/cifar10-real-10k \\
      data.verify=false data.val_size=1000 epochs=15 teacher.epochs=15 scheduler.milestones=[9,12,14] \\
      teacher.scheduler.milestones=[9,12,14]
  python scripts/benchmark_methods.py --pairs cifar100_res56_res20 --methods kd --seeds 1 --dry-run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.pipelines.method_benchmark import FOOTNOTE, PUBLISHED, benchmark
from kdresearch.pipelines.published_figures import PUBLISHED_COLUMNS


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (`key=value` words) apart from the script's own options; a method with
    options is one quoted word, e.g. "kd loss.standardize=true" (it holds a space)."""
    own, overrides = [], []
    for item in argv:
        (overrides if "=" in item and " " not in item and not item.startswith("--") else own).append(item)
    return own, overrides


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", required=True, metavar="PRESET",
                        help="experiment presets, e.g. cifar100_res32x4_res8x4 cifar100_res56_res20")
    parser.add_argument("--methods", nargs="+", default=["kd"], metavar="METHOD",
                        help='loss names, or a quoted name with options: "kd loss.standardize=true" (default: kd)')
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], metavar="SEED")
    parser.add_argument("--out", type=Path, help="folder of job outputs and benchmark.md, also the runs' sweep "
                                                 "tag (default: outputs/benchmark/<date>_<time>)")
    parser.add_argument("--published", type=Path, default=PUBLISHED,
                        help=f"CSV of published figures ({','.join(PUBLISHED_COLUMNS)}; the first row of a pair "
                             "and method is the one compared with), checked before the first job; 'none' for none")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    own, overrides = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(own)
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"seeds must be distinct integers >= 0, got {args.seeds}")
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    published = None if str(args.published) == "none" else args.published
    try:
        result = benchmark(args.pairs, args.methods, args.seeds, args.overrides, args.out, published, args.dry_run)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.table is None:  # dry run
        return 0
    print(f"\n=== Distillation benchmark ({result.group})\n")
    print(result.table.markdown())
    print(FOOTNOTE)
    print(f"wrote {result.markdown_path}; MLflow parent run {result.parent_run_id} holds the jobs' runs and the "
          f"table (tag role=benchmark)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
