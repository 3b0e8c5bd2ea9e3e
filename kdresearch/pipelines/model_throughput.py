"""Training throughput of the CIFAR models: the project's training step against a bare PyTorch
loop (`scripts/benchmark_models.py`).

What is measured: images per second of training (forward, loss, backward, SGD step) at batch 64,
100 classes, channels_last, in fp32 and in bf16 autocast, for each model in `Settings.models`.
Two loops run the same architecture from the same initial weights, on the same device, in one
process:

- **ours**: the project's step exactly as a job runs it. The config is composed from conf/
  (`model=<name> data=synthetic data.num_classes=100 data.num_train=<images> loss=ce optimizer=sgd`
  with the CIFAR-100 recipe's lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, `seed=<seed>`)
  and its objects are made by the steps `kdresearch.training.job.run_job` takes: the data
  (conf/data/synthetic's in-memory CIFAR-shaped uint8 images and normalisation), the student right
  after seeding and the loss bound to it (`bind_pair`), then (`Training`) both moved to the device
  in channels_last, the optimizer, and the job's batch iterator (`ImageData.batches`: a seeded
  permutation, the uint8 images gathered and normalised to float channels_last per batch). The
  timed call is
  `kdresearch.training.loop.train_one_epoch`: it autocasts with
  `kdresearch.runtime.devices.autocast` for bf16, checks for interrupts every step, sums the loss
  and its parts on the device and reads them once, at the end of the call (no device
  synchronisation per step), and runs a tqdm bar (disabled, as with `quiet=true`, unless `bar`).
  The job's process-wide switches (conf/device's `deterministic` and `keep_freed_memory`) are
  applied by `Job` and so hold for both loops. A Job opens its MLflow store: a throw-away SQLite
  store in a temporary folder, with no run in it.
- **bare**: a plain PyTorch loop on a fresh instance of the same architecture, loaded with the
  same initial weights: the same images, already normalised to float channels_last and held in
  memory (made once, before timing, by the project's iterator), then per batch `model(x)`,
  `F.cross_entropy`, `zero_grad(set_to_none=True)`, `backward`, `step` (torch.optim.SGD with the
  same options), inside `torch.autocast(dtype=torch.bfloat16)` for bf16. Nothing else: no read of
  the loss, no per-batch normalisation, no loss module.

Timing: both loops first train `warmup` steps untimed (oneDNN/cuDNN pick and cache their kernels
then). Each of `repeats` measurements then trains each loop on `images` images (whole batches of
64; by default a per-model count worth about 4 s of fp32 per loop on an idle 2-core CPU, see
DEFAULT_IMAGES), timed with time.perf_counter (CUDA synchronised at every clock read). The two
loops take turns of `chunk` steps: ours trains `chunk` steps (train_one_epoch over the next
`chunk` batches of the job's running batch iterator; one pass, i.e. one permutation, per
measurement, like an epoch), then bare trains `chunk` steps, and so on; each loop's time is the
sum of its turns. Turns of one step (the CPU default) let a shared machine's load fall on both
loops alike: on this 2-core CPU, with other training jobs running alongside, ShuffleV2's bf16
steps took anything from 1.2 to 8.7 s (0.4 s idle), yet the median ours/bare ratio of adjacent
steps was 0.995, while whole-measurement ratios of other models swung from 0.44 to 2.7.
`chunk` 0 times one train_one_epoch call over the whole measurement, then bare's whole pass (the
CUDA default: the clock reads around each turn synchronise the device, so turns of one step would
make both loops wait for the device every step, which neither does in a real epoch; ours reads
its loss once per train_one_epoch call).

How to read the table: `ours` and `bare` are the medians over the repeats of images/s, `spread`
each side's (max - min) / median over the repeats (how much the machine's load varied). `ratio`
is ours' speed over bare's, the median over every turn of every repeat (with chunk 0: over the
repeats) of ours img/s / bare img/s in that turn: 1.00 means the project's machinery costs
nothing, 0.80 that ours trains 20 % slower. The median of many adjacent pairs is what survives a
loaded machine: a load spike slows one turn of one side, and moves the median little. `ratios`
is the range over the repeats of each repeat's ours / bare (total images over total time of each
side), the noise of a whole-measurement comparison. `within 10 %` is "yes" when ratio >= 0.90,
i.e. ours at most 10 % slower than bare. On an idle machine spreads are a few percent and ratios
close to ratio; wide ratios with a ratio near 1 mean a loaded machine, not an overhead; rerun with
more repeats or images if in doubt.

bf16 runs only where it is supported: CUDA devices that report bf16 support, and CPUs with
AVX512-BF16 or AMX-BF16 (conf/device/auto.yaml's rule; kdresearch.runtime.devices has no query
of its own; the flags are read from /proc/cpuinfo); elsewhere the row says "bf16: not supported
here".
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from kdresearch.config.groups import build
from kdresearch.config.identity import config_identity
from kdresearch.reports.evaluation import compose
from kdresearch.runtime import devices
from kdresearch.tracking.lineage import cpu_model
from kdresearch.training.job import Job, Training, bind_pair
from kdresearch.training.loop import train_one_epoch

DEFAULT_MODELS = ("resnet20", "resnet8x4", "resnet32x4", "wrn_40_2", "ShuffleV2")
# Images per measurement when none are given: each about 4 s of fp32 training per loop on an
# idle 2-core AVX-512 CPU (resnet32x4 trains ~31 img/s there, wrn_40_2 ~88, resnet8x4 ~170,
# ShuffleV2 ~210, resnet20 ~560), so that the default run (five models, fp32 and bf16, 3 repeats)
# takes about 4 minutes there; other load on the machine stretches it. Other models: 512.
DEFAULT_IMAGES = {"resnet20": 2048, "resnet8x4": 640, "resnet32x4": 128, "wrn_40_2": 384, "ShuffleV2": 768}
OTHER_MODEL_IMAGES = 512
BATCH_SIZE = 64
NUM_CLASSES = 100
# The synthetic data holds at least one training image per class: whole batches of at least that many.
MIN_IMAGES = -(-NUM_CLASSES // BATCH_SIZE) * BATCH_SIZE
QUICK_IMAGES = MIN_IMAGES
TOLERANCE = 0.10  # ours may be at most this much slower than bare
# The CIFAR-100 recipe's optimizer (conf/experiment/cifar100_recipe.yaml).
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    device: str = "auto"
    images: Optional[int] = None  # per measurement, >= MIN_IMAGES; None: DEFAULT_IMAGES (QUICK_IMAGES with quick)
    warmup: int = 2  # untimed steps per loop first
    repeats: int = 3  # interleaved measurements per loop
    chunk: Optional[int] = None  # steps per turn; 0: one call per measurement; None: 1 on CPU, 0 on CUDA
    threads: Optional[int] = None  # torch.set_num_threads
    seed: int = 0
    bar: bool = False  # ours shows its tqdm bar (quiet=false)
    quick: bool = False  # smoke run: QUICK_IMAGES images


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

    kdresearch.runtime.devices has no support query of its own (it autocasts whatever it is told);
    this follows the rule its config documents (conf/device/auto.yaml: "CPUs with AVX512-BF16, CUDA").
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

def compose_config(model: str, device: torch.device, precision: str, num_train: int, settings: Settings,
                   work: Path) -> DictConfig:
    return compose([
        f"model={model}", "data=synthetic", f"data.num_classes={NUM_CLASSES}", f"data.num_train={num_train}",
        f"data.num_test={BATCH_SIZE}", "data.augment=false", "loss=ce", "optimizer=sgd", f"optimizer.lr={LR}",
        f"optimizer.momentum={MOMENTUM}", f"optimizer.weight_decay={WEIGHT_DECAY}", f"batch_size={BATCH_SIZE}",
        f"device.type={device.type}", "device.channels_last=true", f"device.precision={precision}",
        "epochs=1", f"seed={settings.seed}", f"quiet={'false' if settings.bar else 'true'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ])


class Ours:
    """The project's step: a job's data, student, loss, optimizer and batches, made by the job's
    own steps (`Job`, `bind_pair`, `Training`), trained by `train_one_epoch`."""

    def __init__(self, cfg: DictConfig):
        self.job = Job(cfg)
        self.data = build(cfg.data, "data")
        self.training = Training(self.job, bind_pair(cfg, self.data), self.data, None,
                                 config_identity(cfg, self.data.fingerprint()))
        self.initial_state = {key: value.detach().clone() for key, value in self.training.student.state_dict().items()}

    def passes(self):
        """The job's training batches, pass after pass (a fresh permutation each), without end."""
        return itertools.chain.from_iterable(itertools.repeat(self.training.train_batches))

    def train(self, batches) -> None:
        training = self.training
        train_one_epoch(training.student, training.loss_fn, training.loss_fn, None, training.optimizer, batches, 1,
                        training.cfg, training.runtime.device)


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


def images_per_measurement(model: str, settings: Settings) -> int:
    """Whole batches: `images`, else quick's, else the model's default."""
    wanted = settings.images or (QUICK_IMAGES if settings.quick else DEFAULT_IMAGES.get(model, OTHER_MODEL_IMAGES))
    return max(MIN_IMAGES, wanted // BATCH_SIZE * BATCH_SIZE)


def measure(model: str, precision: str, device: torch.device, settings: Settings,
            work: Path) -> tuple[list[float], list[float], list[float]]:
    """(ours img/s per repeat, bare img/s per repeat, ours / bare per turn) for one model and precision."""
    images = images_per_measurement(model, settings)
    steps = images // BATCH_SIZE
    chunk = steps if settings.chunk <= 0 else min(settings.chunk, steps)
    cfg = compose_config(model, device, precision, images, settings, work)
    ours = Ours(cfg)
    bare = Bare(cfg, ours.initial_state, device, precision)
    # Bare's batches: the same images, normalised once (by the project's own iterator), in memory.
    made = torch.Generator().manual_seed(settings.seed)
    bare_batches = [(x.clone(), y.clone()) for x, y, _ in ours.data.batches(
        "train", BATCH_SIZE, device, generator=made, channels_last=True)]
    if settings.warmup:
        ours.train(Take(ours.passes(), settings.warmup))
        bare.train(itertools.islice(itertools.cycle(bare_batches), settings.warmup))

    ours_rates, bare_rates, turn_ratios = [], [], []
    for _ in range(settings.repeats):
        epoch = ours.training.train_batches  # one pass over the measurement data: a fresh permutation, as each epoch
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


def run_throughput(settings: Settings) -> list[str]:
    """Measure every model and precision and print the table; returns the rows where ours is more
    than TOLERANCE slower than bare ("<model> <precision>")."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = devices.resolve_device(settings.device)
    if settings.chunk is None:
        settings.chunk = 1 if device.type == "cpu" else 0
    bf16_ok, bf16_why = bf16_support(device)
    with tempfile.TemporaryDirectory(prefix="kd-throughput-") as folder:
        work = Path(folder)
        # A first Job creates the throw-away store (its log lines come before the table) and applies
        # conf/device's process-wide switches, as every Job does (so they hold for both loops);
        # keep_freed_memory is asked again whether it took effect here.
        first = compose_config(settings.models[0], device, "fp32", MIN_IMAGES, settings, work)
        Job(first)
        freed = devices.keep_freed_memory(first.device.keep_freed_memory)

        per_model = ", ".join(f"{name} {images_per_measurement(name, settings)}" for name in settings.models)
        print(f"torch {torch.__version__} | threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
              f" | device {device_name(device)} | CPU {cpu_model()} ({os.cpu_count()} logical cores)")
        print(f"batch {BATCH_SIZE}, {NUM_CLASSES} classes, channels_last, SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}"
              f" | bf16: {'yes' if bf16_ok else 'no'} ({bf16_why}) | keep_freed_memory {'on' if freed else 'off'}"
              f" | ours' bar {'on' if settings.bar else 'off (quiet=true)'}")
        turns = (f"alternating {settings.chunk} step{'s' if settings.chunk > 1 else ''} of ours and of bare"
                 if settings.chunk > 0 else "ours then bare, one call each")
        print(f"images per measurement: {per_model} | {settings.warmup} warm-up steps per loop | {settings.repeats} repeats,"
              f" each measuring both loops {turns}")
        header = f"{'model':<11} {'precision':<9} {'ours img/s':>10} {'spread':>6} {'bare img/s':>10} {'spread':>6} " \
                 f"{'ratio':>6} {'ratios':>11}  within 10 %"
        print(header)
        print("-" * len(header))
        failures = []
        started = time.perf_counter()
        for model in settings.models:
            for precision in settings.precisions:
                if precision == "bf16" and not bf16_ok:
                    print(f"{model:<11} {precision:<9} bf16: not supported here", flush=True)
                    continue
                ours_rates, bare_rates, turn_ratios = measure(model, precision, device, settings, work)
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
    return failures
