"""Reproduce the PyTorch knowledge-distillation tutorial's five runs and print their comparison.

Runs five training jobs per seed -- the teacher (model=deep), then the students loss=ce,
loss=kd T=2, loss=cosine and loss=regressor, which reuse that teacher -- then compares the runs:
table on the console, comparison.md/.csv/.png in the output folder, and the same files as
artifacts of the MLflow parent run whose children are the jobs' runs. The logic lives in
kdresearch/pipelines/reproduce.py.

Examples (from the project folder):
  python scripts/reproduce_tutorial.py                                   # CIFAR-10, 10 epochs
  python scripts/reproduce_tutorial.py epochs=10 data.root=../shared/data/cifar10-real-10k data.verify=false
  python scripts/reproduce_tutorial.py data=synthetic epochs=1 data.limit_train=256 device=cpu
  python scripts/reproduce_tutorial.py --seeds 42 43 44 epochs=10        # mean ± std over seeds
  python scripts/reproduce_tutorial.py seeds=[42,43,44] epochs=10        # the same
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.pipelines.reproduce import reproduce


def _seed_list(text: str) -> list[int]:
    items = [item for item in re.split(r"[,\s]+", text.strip().strip("[]")) if item]
    try:
        seeds = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def _join_seeds(argv: list[str]) -> list[str]:
    """`--seeds 42 43 44 epochs=1` -> `--seeds=42,43,44 epochs=1`: the seeds end at the first non-integer."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--seeds":
            j = i + 1
            while j < len(argv) and re.fullmatch(r"\d+", argv[j]):
                j += 1
            out.append("--seeds=" + ",".join(argv[i + 1:j]))
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides passed to every job (epochs=10, data=synthetic, data.limit_train=N, "
                             "device=cpu, tracking.uri=..., ...); seeds=[42,43,44] is read as --seeds")
    parser.add_argument("--seeds", type=_seed_list, default=[], metavar="SEED [SEED ...]",
                        help="run the five jobs once per seed; the table gives mean ± std per configuration")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="skip the teacher job: the students reuse the newest finished teacher run with "
                             "their training config (one is trained first when there is none)")
    parser.add_argument("--out", type=Path, help="folder of the jobs' outputs and the comparison files, also "
                                                 "the runs' sweep tag (default: outputs/reproduce/<date>_<time>)")
    parser.add_argument("--no-log", action="store_true",
                        help="no MLflow parent run: the jobs' runs stand alone and the comparison is only written to files")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    args = parser.parse_intermixed_args(_join_seeds(list(sys.argv[1:] if argv is None else argv)))

    overrides = []
    for item in args.overrides:
        if item.startswith("seeds="):
            if args.seeds:
                parser.error("give the seeds once: --seeds or seeds=")
            args.seeds = _seed_list(item.partition("=")[2])
        else:
            overrides.append(item)
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = reproduce(args.overrides, args.seeds, args.out, args.reuse_teacher,
                           log_summary=not args.no_log, dry_run=args.dry_run)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    comparison = result.comparison
    if comparison is None:  # dry run
        return 0
    print(f"\n=== The tutorial's runs ({result.group})\n")
    print(comparison.table)
    print(comparison.footnote + "\n")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for row in comparison.rows:
        if row.first.role == "teacher" and row.delta is not None:
            print(f"teacher - student CE: {row.delta:+.2f} points of final test/acc")
    print(f"wrote {comparison.markdown}, {comparison.csv}, {comparison.figure}")
    if comparison.summary_run_id:
        print(f"MLflow parent run {comparison.summary_run_id} holds the jobs' runs and the comparison "
              f"(tag role=reproduction)")
    print(f"compare these runs again: {result.compare_command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
