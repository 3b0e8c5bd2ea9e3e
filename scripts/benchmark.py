"""Side-by-side speed benchmark: kdresearch's trainer against the tutorial's loop as written.

The baseline is the tutorial's code path: a shuffled DataLoader (batch 128, num_workers=2) over
a dataset that turns each image into a PIL image and applies ToTensor + Normalize, NCHW fp32
models with the tutorial's (not in-place) ReLUs, and the teacher's forward under no_grad on every
student step. It runs in a fresh Python process of its own, so that no setting kdresearch makes
in its process (e.g. `device.keep_freed_memory`) reaches it. kdresearch runs the same
jobs through `kdresearch.training.job.run_job` (in-memory data, channels_last, teacher-output
cache, optionally bf16), with MLflow in a throw-away store. Both use the same data, epochs and
batch size. The logic lives in kdresearch/pipelines/speed_benchmark.py.

    python scripts/benchmark.py                          # 10 epochs on ../shared/data/cifar10-real-10k
    python scripts/benchmark.py --epochs 3 --skip-rss    # shorter
    python scripts/benchmark.py --data synthetic         # no CIFAR copy needed
    python scripts/benchmark.py --accuracy-only --seeds 43 44   # accuracy over more seeds

Prints one table of times, images/s, speed-ups and accuracies; `--json PATH` saves the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.pipelines.speed_benchmark import (
    DATA_CHOICES,
    DEFAULT_REAL,
    Settings,
    run_benchmark,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", choices=DATA_CHOICES, default="cifar10-real-10k")
    parser.add_argument("--root", type=Path, default=DEFAULT_REAL, help="CIFAR-10 copy for --data cifar10-real-10k")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="training seeds; speed is measured on the first, accuracy averaged over all")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only the accuracy comparison: no online-KD run, sweep, memory job or speed-ups")
    parser.add_argument("--sweep", type=int, default=8, help="temperatures in the KD sweep")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 50,000-image peak-memory job")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        run_benchmark(Settings(**vars(args)))
    except KDResearchError as error:
        sys.exit(f"benchmark: {error}")


if __name__ == "__main__":
    main()
