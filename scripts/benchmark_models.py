"""Training throughput of the CIFAR models: the project's training step against a bare PyTorch loop.

Images per second of training (forward, loss, backward, SGD step) at batch 64, 100 classes,
channels_last, in fp32 and in bf16 autocast (where supported), for each model: "ours" is the
step a job runs (its objects made by Job.build, trained by train_one_epoch, which reads the loss
once per call, not per step), "bare" a plain PyTorch loop on the same architecture, initial
weights and pre-normalised batches. The two take turns, and the table gives each side's images/s
and the median ratio of adjacent turns. What is measured and how to read the table:
kdresearch/pipelines/model_throughput.py. The default run takes about 4 minutes on an idle
2-core AVX-512 CPU; other jobs on the machine stretch it (to 30 minutes and more with two other
training processes on those 2 cores).

    python scripts/benchmark_models.py                         # all five models, fp32 + bf16
    python scripts/benchmark_models.py --quick                 # smoke run: few images, one repeat
    python scripts/benchmark_models.py --models resnet20 wrn_40_2 --precisions fp32 --repeats 5
    python scripts/benchmark_models.py --device cuda --images 8192 --threads 2
"""

from __future__ import annotations

import argparse
import sys

from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.pipelines.model_throughput import (
    BATCH_SIZE,
    DEFAULT_IMAGES,
    DEFAULT_MODELS,
    MIN_IMAGES,
    OTHER_MODEL_IMAGES,
    QUICK_IMAGES,
    Settings,
    run_throughput,
)
from kdresearch.runtime.devices import PRECISIONS


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="conf/model names (space- or comma-separated); default: %(default)s")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None,
                        help=f"images trained per measurement, rounded down to whole batches of {BATCH_SIZE}; "
                             "default: per model, about 4 s of fp32 per loop on an idle 2-core CPU (" +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGES.items()) +
                             f"; others {OTHER_MODEL_IMAGES}); --quick {QUICK_IMAGES}")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per loop first; default 2, --quick 1")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved measurements per loop; default 3, --quick 1")
    parser.add_argument("--chunk", type=int, default=None,
                        help="steps per turn: each measurement alternates `chunk` steps of ours and of bare "
                             "(0: one train_one_epoch call over the whole measurement, then bare's); "
                             "default 1 on CPU, 0 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bar", action="store_true", help="ours shows its tqdm bar (quiet=false, a job's default)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_IMAGES} images, 1 warm-up step, 1 repeat")
    args = parser.parse_args(argv)
    args.models = [name for item in args.models for name in item.split(",") if name]
    for key, normal, quick in (("warmup", 2, 1), ("repeats", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)
    if (args.images is not None and args.images < MIN_IMAGES) or args.repeats < 1 or args.warmup < 0:
        parser.error(f"--images must be >= {MIN_IMAGES} (one training image per class), --repeats >= 1, "
                     f"--warmup >= 0")
    missing = [name for name in args.models if not (CONF_DIR / "model" / f"{name}.yaml").is_file()]
    if missing:
        parser.error(f"no conf/model/{missing[0]}.yaml")
    return Settings(**vars(args))


def main(argv=None) -> int:
    settings = parse_args(argv)
    try:
        run_throughput(settings)
    except KDResearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
