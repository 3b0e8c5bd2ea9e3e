"""Training images/s of the ImageNet input pipeline alone: kdresearch's data=imagenet against
torchvision's reference recipe (ImageFolder + RandomResizedCrop(224) + flip + ToTensor + Normalize,
DataLoader), with the same workers and batch, side by side on generated real JPEGs; then where the
time goes, stage by stage. The logic lives in kdresearch/pipelines/data_benchmark.py.

    python scripts/benchmark_data.py                       # 1,500 JPEGs, 2 workers
    python scripts/benchmark_data.py --images 5000 --workers 8 --batch-size 256 --repeats 5

The folder (ImageNet layout, 10 classes) is generated once per --images and reused.
"""

import argparse
import sys
from pathlib import Path

from kdresearch.errors import KDResearchError
from kdresearch.pipelines.data_benchmark import DEFAULT_CIFAR, Settings, run_benchmark


def main(argv=None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=defaults.images,
                        help=f"training JPEGs to generate and read (default {defaults.images})")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the images are, generated when missing (default /tmp/kdresearch-data-benchmark-<images>)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help=f"DataLoader worker processes of each pipeline (default {defaults.workers})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help=f"alternating passes of each pipeline (default {defaults.repeats})")
    parser.add_argument("--profile-images", type=int, default=defaults.profile_images,
                        help=f"files timed stage by stage (default {defaults.profile_images})")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR,
                        help="the CIFAR-10 sample whose images are upscaled (synthetic textures without it)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help=f"torch threads of the batching process (default {defaults.threads})")
    args = parser.parse_args(argv)
    try:
        run_benchmark(Settings(**vars(args)))
    except KDResearchError as error:
        sys.exit(f"benchmark_data: {error}")


if __name__ == "__main__":
    main()
