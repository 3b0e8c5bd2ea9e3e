"""Training throughput of the CIFAR models: the project's training step against a bare PyTorch loop.

What is measured: images per second of training (forward, loss, backward, SGD step) at batch 64,
100 classes, channels_last, in fp32 and in bf16 autocast, for each model in `--models`. Two loops
run the same architecture from the same initial weights, on the same device, in one process:

- **ours**: the project's step exactly as a job runs it. The config is composed with Hydra from
  conf/ (`model=<name> data=synthetic data.num_classes=100 loss=ce optimizer=sgd` with the
  CIFAR-100 recipe's lr 0.05, momentum 0.9, weight decay 5e-4, batch 64); the model, loss and
  optimizer are made from it by `kdresearch.trainer.build` (the model right after
  `seed_everything`, moved to the device in channels_last, as `Job.build` does). The data is
  `kdresearch.data.make_synthetic(num_train=N, num_classes=100)` (in-memory CIFAR-shaped uint8
  images, conf/data/synthetic.yaml's normalisation), its batches the project's iterator
  (`ImageData.batches`: a seeded permutation, the uint8 images gathered and normalised to float
  channels_last per batch). The timed call is `kdresearch.trainer.train_one_epoch` with
  `kdresearch.losses.ce.CrossEntropy`: it autocasts with `kdresearch.devices.autocast` for bf16,
  calls `.item()` on the loss and on its parts every step, checks for interrupts and runs a tqdm
  bar (disabled, as with `quiet=true`, unless `--bar`). The job's process-wide switches
  (`devices.set_deterministic(False)`, `devices.keep_freed_memory(True)`) are applied once at
  start and so hold for both loops.
- **bare**: a plain PyTorch loop on a fresh instance of the same architecture, loaded with the
  same initial weights: the same images, already normalised to float channels_last and held in
  memory (made once, before timing, by the project's iterator), then per batch `model(x)`,
  `F.cross_entropy`, `zero_grad(set_to_none=True)`, `backward`, `step` (torch.optim.SGD with the
  same options), inside `torch.autocast(dtype=torch.bfloat16)` for bf16. Nothing else: no
  `.item()`, no per-batch normalisation, no loss module.

Timing: both loops first train `--warmup` steps untimed (oneDNN/cuDNN pick and cache their
kernels then). Each of `--repeats` measurements then trains each loop on `--images` images (whole
batches of 64; by default a per-model count worth about 4 s of fp32 per loop on an idle 2-core
CPU, see DEFAULT_IMAGES), timed with time.perf_counter (CUDA synchronised at every clock read).
The two loops take turns of `--chunk` steps: ours trains `chunk` steps (train_one_epoch over the
next `chunk` batches of the project's running batch iterator; one iterator, i.e. one permutation,
per measurement, like an epoch), then bare trains `chunk` steps, and so on; each loop's time is
the sum of its turns. Turns of one step (the CPU default) let a shared machine's load fall on both
loops alike: on this 2-core CPU, with other training jobs running alongside, ShuffleV2's bf16
steps took anything from 1.2 to 8.7 s (0.4 s idle), yet the median ours/bare ratio of adjacent
steps was 0.995, while whole-measurement ratios of other models swung from 0.44 to 2.7. `--chunk 0` times
one train_one_epoch call over the whole measurement, then bare's whole pass (the CUDA default,
where a per-turn synchronisation would hide what bare gains from never synchronising; each of
ours' steps synchronises through `.item()`).

How to read the table: `ours` and `bare` are the medians over the repeats of images/s, `spread`
each side's (max - min) / median over the repeats (how much the machine's load varied). `ratio`
is ours' speed over bare's, the median over every turn of every repeat (with `--chunk 0`: over the
repeats) of ours img/s / bare img/s in that turn: 1.00 means the project's machinery costs
nothing, 0.80 that ours trains 20 % slower. The median of many adjacent pairs is what survives a
loaded machine: a load spike slows one turn of one side, and moves the median little. `ratios`
is the range over the repeats of each repeat's ours / bare (total images over total time of each
side), the noise of a whole-measurement comparison. `within 10 %` is "yes" when ratio >= 0.90,
i.e. ours at most 10 % slower than bare. On an idle machine spreads are a few percent and ratios
close to ratio; wide ratios with a ratio near 1 mean a loaded machine, not an overhead; rerun with
more `--repeats` or `--images` if in doubt.

bf16 runs only where it is supported: CUDA devices that report bf16 support, and CPUs with
AVX512-BF16 or AMX-BF16 (conf/device/auto.yaml's rule; kdresearch.devices has no query of its
own; the flags are read from /proc/cpuinfo); elsewhere the row says "bf16: not supported here".
The default run takes about 4 minutes on an idle 2-core AVX-512 CPU; other jobs on the machine
stretch it (to 30 minutes and more with two other training processes on those 2 cores).

    python scripts/benchmark_models.py                         # all five models, fp32 + bf16
    python scripts/benchmark_models.py --quick                 # smoke run: few images, one repeat
    python scripts/benchmark_models.py --models resnet20 wrn_40_2 --precisions fp32 --repeats 5
    python scripts/benchmark_models.py --device cuda --images 8192 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from kdresearch import devices  # noqa: E402
from kdresearch.config.groups import build
from kdresearch.data.synthetic import make_synthetic  # noqa: E402
from kdresearch.tracking.lineage import cpu_model  # noqa: E402
from kdresearch.training.loop import seed_everything, train_one_epoch  # noqa: E402

DEFAULT_MODELS = ("resnet20", "resnet8x4", "resnet32x4", "wrn_40_2", "ShuffleV2")
# Images per measurement when --images is not given: each about 4 s of fp32 training per loop on an
# idle 2-core AVX-512 CPU (resnet32x4 trains ~31 img/s there, wrn_40_2 ~88, resnet8x4 ~170,
# ShuffleV2 ~210, resnet20 ~560), so that the default run (five models, fp32 and bf16, 3 repeats)
# takes about 4 minutes there; other load on the machine stretches it. Other models: 512.
DEFAULT_IMAGES = {"resnet20": 2048, "resnet8x4": 640, "resnet32x4": 128, "wrn_40_2": 384, "ShuffleV2": 768}
QUICK_IMAGES = 128
BATCH_SIZE = 64
NUM_CLASSES = 100
TOLERANCE = 0.10  # ours may be at most this much slower than bare
# The CIFAR-100 recipe's optimizer (conf/experiment/cifar100_recipe.yaml).
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# --- environment --------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(supported, why) for bf16 autocast on `device`.

    kdresearch.devices has no support query of its own (it autocasts whatever it is told); this
    follows the rule its config documents (conf/device/auto.yaml: "CPUs with AVX512-BF16, CUDA").
    """
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return supported, "torch.cuda.is_bf16_supported()"
    if device.type == "cpu":
        flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
        if flags:
            return True, "CPU flags " + ", ".join(sorted(flags))
        return False, "no avx512_bf16 / amx_bf16 in /proc/cpuinfo"
    return False, f"no bf16 rule for {device.type}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the two loops ------------------------------------------------------------------------------

def synthetic(cfg: DictConfig, num_train: int, seed: int):
    return make_synthetic(num_train=num_train, num_test=BATCH_SIZE, num_classes=cfg.data.num_classes,
                          noise=cfg.data.noise, seed=seed, mean=list(cfg.data.mean), std=list(cfg.data.std))


def compose_config(model: str, device: torch.device, precision: str, num_train: int, bar: bool) -> DictConfig:
    overrides = [
        f"model={model}", "data=synthetic", f"data.num_classes={NUM_CLASSES}", f"data.num_train={num_train}",
        "data.num_test=64", "data.augment=false", "loss=ce", "optimizer=sgd", f"optimizer.lr={LR}",
        f"optimizer.momentum={MOMENTUM}", f"optimizer.weight_decay={WEIGHT_DECAY}", f"batch_size={BATCH_SIZE}",
        f"device.type={device.type}", "device.channels_last=true", f"device.precision={precision}",
        "epochs=1", f"quiet={'false' if bar else 'true'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


class Ours:
    """The project's objects, made as Job.build makes them, and its train_one_epoch."""

    def __init__(self, cfg: DictConfig, data, device: torch.device, seed: int):
        self.cfg, self.device, self.data = cfg, device, data
        seed_everything(seed)
        self.model = build(cfg.model, "model")
        self.initial_state = {key: value.clone() for key, value in self.model.state_dict().items()}
        self.loss_fn = build(cfg.loss, "loss")
        self.loss_fn.bind(self.model, None, train_size=data.train_size)
        self.model.to(device, memory_format=torch.channels_last)
        self.loss_fn.to(device)
        self.optimizer = build(cfg.optimizer, "optimizer",
                               itertools.chain(self.model.parameters(), self.loss_fn.parameters()))
        self.order = torch.Generator().manual_seed(seed)  # the job's data_order

    def batches(self, data=None):
        """The project's batch iterator over `data` (default: the measurement data), as Job.build makes it."""
        return (self.data if data is None else data).batches(
            "train", self.cfg.batch_size, self.device, generator=self.order,
            channels_last=self.cfg.device.channels_last, augment=False)

    def train(self, batches) -> None:
        train_one_epoch(self.model, self.loss_fn, self.loss_fn, None, self.optimizer, batches, 1, self.cfg, self.device)


class Take:
    """The next `count` batches of a running batch iterator, as a sized iterable for train_one_epoch."""

    def __init__(self, iterator, count: int):
        self.iterator, self.count = iterator, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return itertools.islice(self.iterator, self.count)


class Bare:
    """model(x), F.cross_entropy, zero_grad, backward, step on batches already in memory."""

    def __init__(self, cfg: DictConfig, initial_state: dict, device: torch.device, precision: str):
        self.model = build(cfg.model, "model")  # a fresh instance of the same architecture ...
        self.model.load_state_dict(initial_state)  # ... with ours' initial weights
        self.model.to(device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.device = device
        self.dtype = devices.PRECISIONS[precision]

    def train(self, batches) -> None:
        model, optimizer = self.model, self.optimizer
        model.train()
        for images, labels in batches:
            if self.dtype is None:
                loss = F.cross_entropy(model(images), labels)
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def images_per_measurement(model: str, args) -> int:
    """Whole batches: --images, else --quick's, else the model's default."""
    wanted = args.images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES.get(model, 512))
    return max(1, wanted // BATCH_SIZE) * BATCH_SIZE


def measure(model: str, precision: str, device: torch.device, args) -> tuple[list[float], list[float], list[float]]:
    """(ours img/s per repeat, bare img/s per repeat, ours / bare per turn) for one model and precision."""
    images = images_per_measurement(model, args)
    steps = images // BATCH_SIZE
    chunk = steps if args.chunk <= 0 else min(args.chunk, steps)
    cfg = compose_config(model, device, precision, images, args.bar)
    # The project's in-memory synthetic data (CIFAR-shaped uint8 images, conf/data/synthetic's
    # normalisation): one set for the measurements, one for the warm-up steps.
    data = synthetic(cfg, images, seed=0)
    warm = synthetic(cfg, args.warmup * BATCH_SIZE, seed=1) if args.warmup else None

    ours = Ours(cfg, data, device, args.seed)
    bare = Bare(cfg, ours.initial_state, device, precision)
    # Bare's batches: the same images, normalised once (by the project's own iterator), in memory.
    made = torch.Generator().manual_seed(args.seed)

    def prepared(part):
        return [(x.clone(), y.clone()) for x, y, _ in part.batches("train", BATCH_SIZE, device, generator=made,
                                                                   channels_last=True)]

    bare_batches = prepared(data)
    if warm is not None:
        ours.train(ours.batches(warm))
        bare.train(prepared(warm))

    ours_rates, bare_rates, turn_ratios = [], [], []
    for _ in range(args.repeats):
        epoch = ours.batches()  # one pass over the measurement data: a fresh permutation, as each epoch
        if chunk == steps:  # one call per measurement: train_one_epoch over the iterator itself
            ours_times = [seconds(lambda: ours.train(epoch), device)]
            bare_times = [seconds(lambda: bare.train(bare_batches), device)]
        else:  # turns of `chunk` steps, ours then bare, through the measurement
            running, ours_times, bare_times = iter(epoch), [], []
            for first in range(0, steps, chunk):
                count = min(chunk, steps - first)
                ours_times.append(seconds(lambda: ours.train(Take(running, count)), device))
                bare_times.append(seconds(lambda: bare.train(bare_batches[first:first + count]), device))
        ours_rates.append(images / sum(ours_times))
        bare_rates.append(images / sum(bare_times))
        turn_ratios += [bare_time / ours_time for ours_time, bare_time in zip(ours_times, bare_times)]
    return ours_rates, bare_rates, turn_ratios


# --- report -------------------------------------------------------------------------------------

def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"{100 * (max(values) - min(values)) / statistics.median(values):.0f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="conf/model names (space- or comma-separated); default: %(default)s")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(devices.PRECISIONS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None,
                        help="images trained per measurement, rounded down to whole batches of 64; default: "
                             "per model, about 4 s of fp32 per loop on an idle 2-core CPU (" +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGES.items()) + f"; others 512); --quick {QUICK_IMAGES}")
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
    if (args.images is not None and args.images < BATCH_SIZE) or args.repeats < 1 or args.warmup < 0:
        parser.error("--images must be >= 64, --repeats >= 1, --warmup >= 0")
    missing = [name for name in args.models if not (ROOT / "conf" / "model" / f"{name}.yaml").is_file()]
    if missing:
        parser.error(f"no conf/model/{missing[0]}.yaml")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = devices.resolve_device(args.device)
    if args.chunk is None:
        args.chunk = 1 if device.type == "cpu" else 0
    # What Job.__init__ sets for every job, process-wide (so for both loops).
    devices.set_deterministic(False)
    freed = devices.keep_freed_memory(True)
    bf16_ok, bf16_why = bf16_support(device)

    per_model = ", ".join(f"{name} {images_per_measurement(name, args)}" for name in args.models)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
          f" | device {device_name(device)} | CPU {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"batch {BATCH_SIZE}, {NUM_CLASSES} classes, channels_last, SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}"
          f" | bf16: {'yes' if bf16_ok else 'no'} ({bf16_why}) | keep_freed_memory {'on' if freed else 'off'}"
          f" | ours' bar {'on' if args.bar else 'off (quiet=true)'}")
    turns = (f"alternating {args.chunk} step{'s' if args.chunk > 1 else ''} of ours and of bare" if args.chunk > 0
             else "ours then bare, one call each")
    print(f"images per measurement: {per_model} | {args.warmup} warm-up steps per loop | {args.repeats} repeats,"
          f" each measuring both loops {turns}")
    header = f"{'model':<11} {'precision':<9} {'ours img/s':>10} {'spread':>6} {'bare img/s':>10} {'spread':>6} " \
             f"{'ratio':>6} {'ratios':>11}  within 10 %"
    print(header)
    print("-" * len(header))
    failures = []
    started = time.perf_counter()
    for model in args.models:
        for precision in args.precisions:
            if precision == "bf16" and not bf16_ok:
                print(f"{model:<11} {precision:<9} bf16: not supported here", flush=True)
                continue
            ours_rates, bare_rates, turn_ratios = measure(model, precision, device, args)
            ratios = [o / b for o, b in zip(ours_rates, bare_rates)]
            ratio = statistics.median(turn_ratios)
            within = ratio >= 1 - TOLERANCE
            if not within:
                failures.append(f"{model} {precision}")
            print(f"{model:<11} {precision:<9} {statistics.median(ours_rates):>10.1f} {spread(ours_rates):>6} "
                  f"{statistics.median(bare_rates):>10.1f} {spread(bare_rates):>6} {ratio:>6.2f} "
                  f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>11}  {'yes' if within else 'no'}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s. img/s: median over repeats; spread: (max - min) / median; "
          f"ratio: median over all turns of ours img/s / bare img/s; ratios: range over repeats of ours / bare; "
          f"within 10 %: ratio >= {1 - TOLERANCE:.2f})")
    if failures:
        print("ours more than 10 % slower than bare: " + ", ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
