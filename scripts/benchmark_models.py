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

Both loops first run `--warmup` steps untimed; then each measurement trains on `--images` images
(rounded down to whole batches of 64; by default a per-model count of about 4-5 s of fp32 training
on a 2-core CPU, see DEFAULT_IMAGES) and is timed with time.perf_counter (CUDA is synchronised
before the clock stops). Measurements are interleaved, ours, bare, ours, bare, ... `--repeats`
times, so that the load of other processes on this shared machine falls on both alike.

How to read the table: `ours` and `bare` are the medians over the repeats of images/s; `spread` is
(max - min) / median of each side's repeats, the noise of the measurement; `ratio` is median ours /
median bare (1.00: the project's machinery costs nothing; 0.80: ours trains 20 % slower);
`within 10 %` is "yes" when ours is at most 10 % slower than bare (ratio >= 0.90). A ratio below
0.90 with small spreads is a real overhead of the project's step; with spreads of 10 % or more,
rerun with more `--repeats` / `--images`. bf16 runs only where it is supported: CUDA devices that
report bf16 support, and CPUs with AVX512-BF16 or AMX-BF16 (conf/device/auto.yaml's rule; the
flag is read from /proc/cpuinfo); elsewhere the row says "bf16: not supported here".

    python scripts/benchmark_models.py                         # all five models, fp32 + bf16
    python scripts/benchmark_models.py --quick                 # smoke run: few images, one repeat
    python scripts/benchmark_models.py --models resnet20 wrn_40_2 --precisions fp32 --repeats 5
    python scripts/benchmark_models.py --device cuda --images 8192 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
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
from kdresearch.data import make_synthetic  # noqa: E402
from kdresearch.trainer import build, seed_everything, train_one_epoch  # noqa: E402

DEFAULT_MODELS = ("resnet20", "resnet8x4", "resnet32x4", "wrn_40_2", "ShuffleV2")
# Images per measurement when --images is not given: each about 4-5 s of fp32 training on a 2-core
# AVX-512 CPU (resnet32x4 trains ~14 img/s there, resnet20 ~450), so that the default run of all
# five models, both precisions and 3 repeats takes about 7 minutes. Other models: 512.
DEFAULT_IMAGES = {"resnet20": 2048, "resnet8x4": 640, "resnet32x4": 128, "wrn_40_2": 384, "ShuffleV2": 768}
QUICK_IMAGES = 128
BATCH_SIZE = 64
NUM_CLASSES = 100
TOLERANCE = 0.10  # ours may be at most this much slower than bare
# The CIFAR-100 recipe's optimizer (conf/experiment/cifar100_recipe.yaml).
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# --- environment --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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
        self.cfg, self.device = cfg, device
        seed_everything(seed)
        self.model = build(cfg.model, "model")
        self.initial_state = {key: value.clone() for key, value in self.model.state_dict().items()}
        self.loss_fn = build(cfg.loss, "loss")
        self.loss_fn.bind(self.model, None, train_size=data.train_size)
        self.model.to(device, memory_format=torch.channels_last)
        self.loss_fn.to(device)
        self.optimizer = build(cfg.optimizer, "optimizer", list(self.model.parameters()) + list(self.loss_fn.parameters()))
        self.data = data
        self.order = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def batches(self, data):
        return data.batches("train", self.cfg.batch_size, self.device, generator=self.order,
                            channels_last=self.cfg.device.channels_last, augment=False)

    def run(self, data=None) -> None:
        """One pass of train_one_epoch over `data` (default: the measurement data)."""
        self.epoch += 1
        cfg = self.cfg
        train_one_epoch(self.model, self.loss_fn, self.loss_fn, None, self.optimizer, self.batches(self.data if data is None else data),
                        1, cfg, self.device)


class Bare:
    """model(x), F.cross_entropy, zero_grad, backward, step on batches already in memory."""

    def __init__(self, cfg: DictConfig, initial_state: dict, batches: list, device: torch.device, precision: str):
        self.model = build(cfg.model, "model")  # a fresh instance of the same architecture ...
        self.model.load_state_dict(initial_state)  # ... with ours' initial weights
        self.model.to(device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.batches = batches
        self.device = device
        self.dtype = devices.PRECISIONS[precision]

    def run(self, batches=None) -> None:
        model, optimizer = self.model, self.optimizer
        model.train()
        for images, labels in batches if batches is not None else self.batches:
            if self.dtype is None:
                loss = F.cross_entropy(model(images), labels)
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def timed(fn, device: torch.device, images: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return images / (time.perf_counter() - start)


def images_per_measurement(model: str, args) -> int:
    """Whole batches: --images, else --quick's, else the model's default."""
    wanted = args.images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES.get(model, 512))
    return max(1, wanted // BATCH_SIZE) * BATCH_SIZE


def measure(model: str, precision: str, device: torch.device, args) -> tuple[list[float], list[float]]:
    """(ours img/s per repeat, bare img/s per repeat) for one model and precision."""
    images = images_per_measurement(model, args)
    warm_images = args.warmup * BATCH_SIZE
    cfg = compose_config(model, device, precision, images, args.bar)
    # The project's in-memory synthetic data (CIFAR-shaped uint8 images), with conf/data/synthetic's
    # normalisation: one set for the warm-up steps, one for the measurements.
    data = synthetic(cfg, images, seed=0)
    warm = synthetic(cfg, warm_images, seed=1) if warm_images else None

    ours = Ours(cfg, data, device, args.seed)
    # Bare's batches: the same images, normalised once by the project's own iterator, kept in memory.
    made = torch.Generator().manual_seed(args.seed)

    def prepared(part):
        return [(x.clone(), y.clone()) for x, y, _ in part.batches("train", BATCH_SIZE, device, generator=made,
                                                                   channels_last=True)]

    bare = Bare(cfg, ours.initial_state, prepared(data), device, precision)
    if warm_images:
        ours.run(warm)
        bare.run(prepared(warm))
    synchronize(device)

    ours_rates, bare_rates = [], []
    for _ in range(args.repeats):
        ours_rates.append(timed(ours.run, device, images))
        bare_rates.append(timed(bare.run, device, images))
    return ours_rates, bare_rates


# --- report -------------------------------------------------------------------------------------

def spread(rates: list[float]) -> str:
    if len(rates) < 2:
        return "-"
    return f"{100 * (max(rates) - min(rates)) / statistics.median(rates):.0f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="conf/model names (space- or comma-separated); default: %(default)s")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(devices.PRECISIONS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None,
                        help="images trained per measurement, rounded down to whole batches of 64; default: "
                             "per model, about 4-5 s of fp32 on a 2-core CPU (" +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGES.items()) + f"; others 512); --quick {QUICK_IMAGES}")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per loop first; default 2, --quick 1")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved measurements per loop; default 3, --quick 1")
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
    # What Job.__init__ sets for every job, process-wide (so for both loops).
    devices.set_deterministic(False)
    freed = devices.keep_freed_memory(True)
    bf16_ok, bf16_why = bf16_support(device)

    per_model = ", ".join(f"{name} {images_per_measurement(name, args)}" for name in args.models)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
          f" | device {device_name(device)} | CPU {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"batch {BATCH_SIZE}, {NUM_CLASSES} classes, channels_last, SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}"
          f" | images per measurement: {per_model} | {args.warmup} warm-up steps, {args.repeats} repeats interleaved"
          f" | bf16: {'yes' if bf16_ok else 'no'} ({bf16_why}) | keep_freed_memory {'on' if freed else 'off'}"
          f" | ours' bar {'on' if args.bar else 'off (quiet=true)'}")
    header = f"{'model':<11} {'precision':<9} {'ours img/s':>10} {'spread':>6} {'bare img/s':>10} {'spread':>6} " \
             f"{'ratio':>6}  within 10 %"
    print(header)
    print("-" * len(header))
    failures = []
    started = time.perf_counter()
    for model in args.models:
        for precision in args.precisions:
            if precision == "bf16" and not bf16_ok:
                print(f"{model:<11} {precision:<9} bf16: not supported here", flush=True)
                continue
            ours_rates, bare_rates = measure(model, precision, device, args)
            ours, bare = statistics.median(ours_rates), statistics.median(bare_rates)
            ratio = ours / bare
            within = ratio >= 1 - TOLERANCE
            if not within:
                failures.append(f"{model} {precision}")
            print(f"{model:<11} {precision:<9} {ours:>10.1f} {spread(ours_rates):>6} {bare:>10.1f} "
                  f"{spread(bare_rates):>6} {ratio:>6.2f}  {'yes' if within else 'no'}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s; ratio = median ours / median bare; "
          f"'within 10 %': ours >= {1 - TOLERANCE:.2f} x bare)")
    if failures:
        print("ours more than 10 % slower than bare: " + ", ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
