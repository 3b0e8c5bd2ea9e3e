"""Training images/s of the ImageNet input pipeline alone: kdresearch's `data=imagenet` against
torchvision's reference recipe, side by side (`scripts/benchmark_data.py`).

The images: an ImageNet-layout folder (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`, 10 classes) of
real JPEGs at ImageNet's typical sizes (500x375, 500x333, 375x500, 500x400, 333x500; quality 90),
written once and reused. Each is a real CIFAR-10 image of ../shared/data/cifar10-real-10k upscaled
(bicubic), or, without that sample, a synthetic texture (random fields at three scales); both get a
film grain (Gaussian, sigma 10) so that the files carry a photo's detail (60-70 kB each;
ImageNet's average is ~110 kB) rather than the 17 kB of a smooth upscale. A folder that already
has a `train/<class>/` of its own (ImageNet itself) is read as it is.

The two pipelines, each yielding normalised float batches of `batch_size` training views in this
process, with the same number of DataLoader worker processes:

- **ours**: the training batches of the job `python train.py experiment=imagenet_res34_res18
  data.root=<folder> data.num_classes=10 data.num_workers=<workers> batch_size=<batch>` would train
  on: its data group built as the job builds it, and `batches("train", ...)` with the job's seeded
  order, augmentation and memory format (kdresearch.data.imagenet: workers decode each file and
  draw its RandomResizedCrop(224) + flip as uint8 pixels; this process batches and normalises),
  in a process with the job's `device.keep_freed_memory` applied (glibc keeps the freed float
  batches for reuse instead of page-faulting fresh ones in every batch). The switch is
  process-wide: the reference's workers, forked from this process, have it too.
- **reference**: torchvision's reference recipe: `ImageFolder(train/)` with `RandomResizedCrop(224)`
  + `RandomHorizontalFlip()` + `ToTensor()` + `Normalize(mean, std)` in the workers, and a shuffling
  `DataLoader` with the same batch size and workers.

Timing: after one untimed batch of each (the first start of workers, lazy imports), one
measurement is one pass over every training image (an epoch; each starts its own workers, as
both pipelines do every epoch). The pipelines alternate, ours first in the 1st, 3rd, ... repeat
and the reference first in the others. Each pass gives two numbers: images/s (wall clock, from the
pass's start to its last batch) and CPU ms per image (user + system time of this process and of
its workers, which have exited and been reaped when the pass ends). With other programs on the
machine, images/s varies from pass to pass while CPU time per image hardly does: on a machine
where the pipeline has the cores to itself, images/s is about cores / CPU time per image.
Reported: each side's medians over the repeats with their spread ((max - min) / median), `ratio`
(ours' images/s over the reference's) and `CPU ratio` (the reference's CPU time per image over
ours'), each the median over the repeats of adjacent passes' ratios: above 1, ours is faster.

Where the time goes: the stages of each pipeline timed one by one in this process (no workers) over
the same `profile_images` files, in milliseconds per image: decode (open and decode the JPEG to RGB),
crop (the random crop, its resize to 224 and the flip), tensor (the pixels to the tensor a worker
returns: uint8 for ours; float, normalised for the reference), collate (a batch's tensors stacked)
and normalise (ours: the batch to normalised float in the memory format the model trains in).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.layout import SHARED_CIFAR10_SAMPLE

DEFAULT_CIFAR = SHARED_CIFAR10_SAMPLE
SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (333, 500))  # (width, height): ImageNet's usual
CLASSES = 10  # of a generated folder
VAL_PER_CLASS = 2  # data=imagenet needs a val/ folder; the benchmark reads only train/
QUALITY = 90
GRAIN = 10.0
PRESET = "experiment=imagenet_res34_res18"


@dataclass
class Settings:
    images: int = 1500  # training JPEGs generated (and read per measurement)
    folder: Optional[Path] = None  # where the images are (generated when missing); default under /tmp
    workers: int = 2  # DataLoader worker processes of each pipeline
    batch_size: int = 64
    repeats: int = 5  # measurements of each pipeline
    profile_images: int = 128  # files timed stage by stage
    cifar: Path = DEFAULT_CIFAR  # the real CIFAR-10 sample to upscale; synthetic textures without it
    threads: int = 1  # torch threads of this process (the batching and normalising one)

    def image_folder(self) -> Path:
        return Path(self.folder) if self.folder else Path(f"/tmp/kdresearch-data-benchmark-{self.images}")


# --- the images --------------------------------------------------------------------------------------

def prepare_folder(folder: Path, images: int, cifar: Path) -> str:
    """What the training images of `folder` are: a folder with a `train/` of its own (ImageNet
    itself, say) is read as it is; else `images` training JPEGs (and VAL_PER_CLASS validation ones
    per class) are written there, unless an earlier call wrote them."""
    done = folder / "complete"
    if done.exists():
        return done.read_text().strip()
    if (folder / "train").is_dir():
        return "the folder's own images"
    sources = _cifar_images(cifar, images + VAL_PER_CLASS * CLASSES)
    source = f"real CIFAR-10 images of {cifar} upscaled" if sources is not None else "synthetic textures"
    rng = np.random.default_rng(0)
    for number in range(images + VAL_PER_CLASS * CLASSES):
        split = "train" if number < images else "val"
        label = number % CLASSES
        size = SIZES[number % len(SIZES)]
        base = (Image.fromarray(sources[number]).resize(size, Image.BICUBIC) if sources is not None
                else _texture(size, rng))
        pixels = np.asarray(base, dtype=np.float32) + rng.normal(0.0, GRAIN, (size[1], size[0], 3))
        path = folder / split / f"n{label:08d}" / f"n{label:08d}_{number}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=QUALITY)
    done.write_text(f"{source}; sizes {', '.join(f'{w}x{h}' for w, h in SIZES)}\n")
    return done.read_text().strip()


def _cifar_images(root: Path, count: int) -> Optional[np.ndarray]:
    """`count` CIFAR-10 training images (HWC uint8, repeated when fewer), or None without the sample."""
    if not (Path(root) / "cifar-10-batches-py").is_dir():
        return None
    from kdresearch.data.cifar import load_cifar10

    images = load_cifar10(str(root), download=False, verify=False).train_images.permute(0, 2, 3, 1).numpy()
    return images[np.arange(count) % len(images)]


def _texture(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Random fields at three scales, summed: blobs, shapes and fine detail."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        field_ = rng.uniform(0, 255, (max(1, cells * height // width), cells, 3)).astype(np.uint8)
        pixels += weight * np.asarray(Image.fromarray(field_).resize(size, Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# --- the two pipelines -------------------------------------------------------------------------------

def our_pipeline(folder: Path, workers: int, batch_size: int):
    """(data, training batches) of the preset's job over `folder` (see the module docstring)."""
    from kdresearch.config.groups import build
    from kdresearch.reports.evaluation import compose
    from kdresearch.runtime import devices

    classes = sum(1 for path in (folder / "train").iterdir() if path.is_dir())
    cfg = compose([PRESET, f"data.root={folder}", f"data.num_classes={classes}", f"data.num_workers={workers}",
                   f"batch_size={batch_size}", "device=cpu"])
    devices.keep_freed_memory(cfg.device.keep_freed_memory)  # the job's process-wide switch, as Runtime.open applies it
    data = build(cfg.data, "data")
    return data, data.batches("train", cfg.batch_size, torch.device("cpu"),
                              generator=torch.Generator().manual_seed(cfg.seed),
                              channels_last=cfg.device.channels_last, augment=data.augment, augment_seed=cfg.seed)


def reference_transform(mean, std):
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def reference_pipeline(folder: Path, workers: int, batch_size: int, mean, std) -> torch.utils.data.DataLoader:
    """torchvision's reference recipe over the same training images."""
    from torchvision.datasets import ImageFolder

    return torch.utils.data.DataLoader(ImageFolder(str(folder / "train"), reference_transform(mean, std)),
                                       batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Pass:
    """One pass over every training image: its wall-clock speed, and the processor time it took
    (this process and its workers, which have exited and been reaped when the pass ends)."""

    images_per_second: float
    cpu_ms_per_image: float


def processor_seconds() -> float:
    """User + system time of this process and of its reaped children (the workers of past passes)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def one_pass(batches: Iterable) -> Pass:
    """One pass over `batches` (images first in each): timed from its start to its last batch."""
    cpu_before, started, count = processor_seconds(), time.perf_counter(), 0
    iterator = iter(batches)
    for batch in iterator:
        count += len(batch[0])
    seconds = time.perf_counter() - started
    del iterator  # its workers stop and are reaped here, so that their processor time is counted
    return Pass(count / seconds, 1000 * (processor_seconds() - cpu_before) / count)


@dataclass
class Comparison:
    ours: list[Pass] = field(default_factory=list)
    reference: list[Pass] = field(default_factory=list)

    def median(self, name: str, measure: str) -> float:
        return statistics.median(getattr(one, measure) for one in getattr(self, name))

    def spread(self, name: str, measure: str) -> float:
        """(max - min) / median over the repeats: how much the machine's load varied."""
        values = [getattr(one, measure) for one in getattr(self, name)]
        return (max(values) - min(values)) / statistics.median(values)

    @property
    def ratio(self) -> float:
        """Ours' speed over the reference's: the median over the repeats of adjacent passes' ratios."""
        return statistics.median(o.images_per_second / r.images_per_second for o, r in zip(self.ours, self.reference))

    @property
    def cpu_ratio(self) -> float:
        """The reference's processor time per image over ours' (above 1: ours costs less), median
        over adjacent passes. Other programs' load slows both passes' clocks, not their processor time."""
        return statistics.median(r.cpu_ms_per_image / o.cpu_ms_per_image for o, r in zip(self.ours, self.reference))


def compare(folder: Path, settings: Settings, report: Callable[[str], None] = print) -> Comparison:
    data, our_batches = our_pipeline(folder, settings.workers, settings.batch_size)
    their_loader = reference_pipeline(folder, settings.workers, settings.batch_size, data.mean, data.std)
    if len(their_loader.dataset) != data.train_size:
        raise KDResearchError(f"{folder}: the two pipelines see {data.train_size} and "
                              f"{len(their_loader.dataset)} training images")
    for batches in (our_batches, their_loader):  # warm-up, untimed: the first start of workers, lazy imports
        next(iter(batches))
    result = Comparison()
    for repeat in range(settings.repeats):
        our_batches.set_epoch(repeat + 1)
        turns = [("ours", our_batches), ("reference", their_loader)]
        for name, batches in turns if repeat % 2 == 0 else reversed(turns):
            getattr(result, name).append(one_pass(batches))
        report(f"  repeat {repeat + 1}: " + ", ".join(
            f"{name} {getattr(result, name)[-1].images_per_second:.0f} images/s "
            f"({getattr(result, name)[-1].cpu_ms_per_image:.2f} CPU ms/image)" for name in ("ours", "reference")))
    return result


# --- where the time goes -----------------------------------------------------------------------------

STAGES = ("decode", "crop", "tensor", "collate", "normalise")


def profile(folder: Path, settings: Settings) -> dict[str, dict[str, Optional[float]]]:
    """{pipeline: {stage: ms per image, None where the pipeline has no such stage}} over the first
    `profile_images` training files (module docstring). The two pipelines take turns item by item
    (image or batch), the first item of each stage also once untimed (a warm-up), so that the
    machine's load falls on both alike."""
    from torch.utils.data import default_collate

    from kdresearch.data.image_folder import ImageFiles

    data, batches = our_pipeline(folder, 0, settings.batch_size)
    files = data.train_files[:settings.profile_images]
    our_files = ImageFiles(files, data.augmentation)
    crop, flip, to_tensor, normalize = reference_transform(data.mean, data.std).transforms

    def decode_reference(path: Path) -> Image.Image:
        with open(path, "rb") as handle:  # torchvision's pil_loader
            return Image.open(handle).convert("RGB")

    stages = {  # stage: (ours, reference), each called with (item, its position); None: no such stage
        "decode": (lambda path, _: our_files.decode(path), lambda path, _: decode_reference(path)),
        "crop": (lambda image, index: our_files.transform(image, index, our_files.epoch, our_files.augment_seed),
                 lambda image, _: flip(crop(image))),
        "tensor": (lambda pixels, _: our_files.to_tensor(pixels), lambda image, _: normalize(to_tensor(image))),
        "collate": (lambda tensors, _: default_collate(tensors), lambda tensors, _: default_collate(tensors)),
        "normalise": (lambda batch, _: batches.normalize(batch), None),
    }
    names = ("ours", "reference")
    seconds = {name: {} for name in names}
    items = {name: list(files) for name in names}
    for stage, calls in stages.items():
        if stage == "collate":  # from here on, an item is a batch
            items = {name: [values[start:start + settings.batch_size]
                            for start in range(0, len(values), settings.batch_size)] for name, values in items.items()}
        turns = [(name, call) for name, call in zip(names, calls) if call is not None]
        outputs = {name: [] for name, _ in turns}
        for name, call in turns:
            call(items[name][0], 0)  # warm-up
            seconds[name][stage] = 0.0
        for position in range(len(items["ours"])):
            for name, call in turns if position % 2 == 0 else reversed(turns):
                started = time.perf_counter()
                outputs[name].append(call(items[name][position], position))
                seconds[name][stage] += time.perf_counter() - started
        items.update(outputs)
    return {name: {stage: 1000 * seconds[name][stage] / len(files) if stage in seconds[name] else None
                   for stage in STAGES} for name in names}


# --- the report --------------------------------------------------------------------------------------

@dataclass
class Report:
    source: str
    comparison: Comparison
    stages: dict[str, dict[str, Optional[float]]]  # profile()
    mean_file_kb: float


def run_benchmark(settings: Settings, report: Callable[[str], None] = print) -> Report:
    """Prepare the images, compare the pipelines, profile their stages; each step's lines go to `report`."""
    for name in ("images", "workers", "batch_size", "repeats", "profile_images", "threads"):
        validators.integer(f"--{name.replace('_', '-')}", getattr(settings, name), at_least=0 if name == "workers" else 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run(settings, report)
    finally:
        torch.set_num_threads(threads)


def _run(settings: Settings, report: Callable[[str], None]) -> Report:
    folder = settings.image_folder()
    started = time.perf_counter()
    source = prepare_folder(folder, settings.images, settings.cifar)
    data, _ = our_pipeline(folder, 0, settings.batch_size)
    mean_kb = sum(path.stat().st_size for path in data.train_files) / data.train_size / 1000
    report(f"images: {folder}: {data.train_size} training images of {len(data.classes)} classes ({source}; "
           f"mean {mean_kb:.0f} kB), ready in {time.perf_counter() - started:.1f} s")
    report(f"pipelines: {settings.workers} DataLoader workers each, batch {settings.batch_size}, "
           f"{settings.threads} torch thread(s) in this process; {settings.repeats} alternating passes over every image")
    comparison = compare(folder, settings, report)
    report("")
    report("| pipeline  | images/s (median) | spread | CPU ms/image (median) | spread |")
    report("|-----------|------------------:|-------:|----------------------:|-------:|")
    for name in ("ours", "reference"):
        report(f"| {name:<9} | {comparison.median(name, 'images_per_second'):17.0f} | "
               f"{100 * comparison.spread(name, 'images_per_second'):5.0f}% | "
               f"{comparison.median(name, 'cpu_ms_per_image'):21.2f} | "
               f"{100 * comparison.spread(name, 'cpu_ms_per_image'):5.0f}% |")
    report(f"ratio (ours / reference images/s, median of adjacent passes): {comparison.ratio:.2f}")
    report(f"CPU ratio (reference / ours CPU time per image, median of adjacent passes): {comparison.cpu_ratio:.2f}")
    stages = profile(folder, settings)
    report("")
    report(f"where the time goes (one process, no workers, {min(settings.profile_images, data.train_size)} files), "
           f"ms per image:")
    report("| stage     | " + " | ".join(f"{name:>9}" for name in stages) + " |")
    report("|-----------|" + "|".join("-" * 10 + ":" for _ in stages) + "|")
    for stage in (*STAGES, "total"):
        cells = [sum(ms for ms in times.values() if ms is not None) if stage == "total" else times[stage]
                 for times in stages.values()]
        report(f"| {stage:<9} | " + " | ".join("        -" if cell is None else f"{cell:9.2f}" for cell in cells) + " |")
    return Report(source, comparison, stages, mean_kb)
