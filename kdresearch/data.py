"""Datasets held in memory as uint8 tensors, and the batches the trainer draws from them.

CIFAR-10 and CIFAR-100 (one reader for both python releases) and a synthetic set. CIFAR-10 is
150 MB as uint8, so the whole set lives in one (N, 3, 32, 32) tensor; each batch is
cut from it by a seeded permutation and converted to float and normalised on the device. That is
the tutorial's `ToTensor()` + `Normalize(mean, std)` computed per batch instead of per image in a
DataLoader (the same numbers, a fraction of the cost).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from kdresearch.errors import KDResearchError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR100_FOLDER = "cifar-100-python"


class Dataset(Protocol):
    """What the trainer needs of a dataset: `ImageData` (in memory, below) or
    `kdresearch.streaming.ImageFolderData` (image files read per batch by DataLoader workers)."""

    name: str
    augment: bool
    classes: tuple[str, ...]
    num_classes: int  # labels lie in [0, num_classes); equals len(classes)
    train_size: int  # training samples (sample indices lie in [0, train_size))

    def fingerprint(self) -> str:
        """Content hash of the samples, labels and normalisation (not of `augment`: whether a job
        augments is part of its training identity, kdresearch.identity, so teacher and student of
        one data set share a fingerprint however each trains)."""

    def batches(self, split: str, batch_size: int, device: torch.device,
                generator: Optional[torch.Generator] = None, channels_last: bool = False,
                augment: bool = False, shard: tuple[int, int] = (0, 1), augment_seed: int = 0):
        """A re-iterable of (normalised images, labels, sample index) with len() = batches per pass;
        with `augment`, each epoch's views (`set_epoch`) follow from `augment_seed`."""


class LabelledSplits:
    """Sizes every dataset derives from its class names and label tensors."""

    classes: tuple[str, ...]
    train_labels: torch.Tensor
    val_labels: Optional[torch.Tensor]
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        """How many classes the labels index (the loaders check labels against it)."""
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def has_validation(self) -> bool:
        return self.val_labels is not None

    def split_sizes(self) -> dict[str, int]:
        """Images per split, named as MLflow's dataset contexts: train, validation (when held out), test."""
        sizes = {"train": self.train_size}
        if self.has_validation:
            sizes["validation"] = len(self.val_labels)
        sizes["test"] = len(self.test_labels)
        return sizes


@dataclass
class ImageData(LabelledSplits):
    """A labelled image-classification dataset in memory, plus how to normalise it."""

    name: str
    train_images: torch.Tensor  # uint8, (N, 3, 32, 32)
    train_labels: torch.Tensor  # int64, (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # random crop + flip of training batches (BatchIterator)
    val_images: Optional[torch.Tensor] = None  # data.val_size images held out of the training set
    val_labels: Optional[torch.Tensor] = None
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """Content hash of images, labels and normalisation: identifies the data a model saw.
        Hashing 180 MB takes about a second, so it is computed once per dataset."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def batches(self, split: str, batch_size: int, device: torch.device,
                generator: Optional[torch.Generator] = None, channels_last: bool = False,
                augment: bool = False, shard: tuple[int, int] = (0, 1), augment_seed: int = 0) -> "BatchIterator":
        """Batches of the `train`, `val` or `test` split (see BatchIterator)."""
        images, labels = {"train": (self.train_images, self.train_labels), "val": (self.val_images, self.val_labels),
                          "test": (self.test_images, self.test_labels)}[split]
        return BatchIterator(images, labels, self, batch_size, device, generator, channels_last, augment, shard,
                             augment_seed)

    def _hash(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.train_images, self.train_labels, self.val_images, self.val_labels,
                       self.test_images, self.test_labels):
            if tensor is not None:
                digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(repr((self.mean, self.std)).encode())
        return digest.hexdigest()[:16]


def check_limit(limit: Optional[int], what: str) -> Optional[int]:
    """`data.limit_train` / `data.limit_test`: None (all) or a positive integer."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise KDResearchError(f"data.{what} must be a positive integer or null, got {limit!r}")
    return limit


def check_num_classes(num_classes: int) -> int:
    """`data.num_classes`: an integer >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KDResearchError(f"data.num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def check_class_count(found: int, num_classes: int, where: str) -> None:
    """Refuse data whose number of classes is not `data.num_classes`; `where` says what was
    counted (e.g. "PATH has 3 class folders"), the message ends with the fix."""
    if found != num_classes:
        fix = f"set data.num_classes={found}" if found >= 2 else "a dataset needs at least 2 classes"
        raise KDResearchError(f"{where} but data.num_classes={num_classes}; {fix}")


def check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    """`data.mean` / `data.std`: one value per RGB channel, std > 0."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise KDResearchError(f"data.mean and data.std need 3 values each, std > 0 (got {mean}, {std})")


def _limited(images: torch.Tensor, labels: torch.Tensor, limit: Optional[int], what: str):
    if check_limit(limit, what) is None:
        return images, labels
    return images[:limit].contiguous(), labels[:limit].contiguous()


def _image_data(name, train, test, classes, limit_train, limit_test, mean, std, augment,
                val_size=0, val_seed=0) -> ImageData:
    check_normalisation(mean, std)
    train_images, train_labels = _limited(*train, limit_train, "limit_train")
    test_images, test_labels = _limited(*test, limit_test, "limit_test")
    val_images = val_labels = None
    if check_val_size(val_size, len(train_labels)):
        kept, held_out = stratified_holdout(train_labels, val_size, val_seed)
        val_images, val_labels = train_images[held_out], train_labels[held_out]
        train_images, train_labels = train_images[kept], train_labels[kept]
    return ImageData(name, train_images, train_labels, test_images, test_labels, tuple(classes),
                     tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(augment),
                     val_images, val_labels)


# --- validation hold-out ----------------------------------------------------------------------

def check_val_size(val_size, train_size: int) -> int:
    """`data.val_size`: 0 (no validation split) or fewer images than the training set holds."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < train_size:
        raise KDResearchError(f"data.val_size must be an integer in [0, {train_size}) (the training images), "
                              f"got {val_size!r}")
    return val_size


def stratified_holdout(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions, held-out positions), both sorted: `val_size` training samples held out for
    validation, each class in proportion to its share of the labels (largest remainders decide the
    rounding, ties to the lower class), drawn with a generator seeded by `data.val_seed`, so every
    training seed and every job on this data validates on the same images."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / len(labels)
    quota = exact.floor().long()
    remainders = exact - quota
    extra = val_size - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda i: (-float(remainders[i]), i))
    for i in order[:extra]:
        quota[i] += 1
    held_out = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        held_out.append(members[torch.randperm(len(members), generator=generator)[:take]])
    held = torch.cat(held_out).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


# --- CIFAR-10 and CIFAR-100 ----------------------------------------------------------------

@dataclass(frozen=True)
class CifarRelease:
    """Where a CIFAR python release keeps what; one reader (`load_cifar`) serves every release."""

    name: str                        # ImageData.name
    title: str                       # in messages
    folder: str                      # under data.root
    train_files: tuple[str, ...]
    test_file: str
    label_key: str                   # the labels in each data file
    meta_file: str
    meta_key: str                    # the class names in the meta file
    torchvision_class: str           # in torchvision.datasets: downloads, and carries the official md5s
    official_classes: Optional[tuple[str, ...]] = None  # used without a meta file; None: meta required

    @property
    def data_files(self) -> tuple[str, ...]:
        return self.train_files + (self.test_file,)

    @property
    def required_files(self) -> tuple[str, ...]:
        return self.data_files + (() if self.official_classes else (self.meta_file,))


CIFAR10 = CifarRelease("cifar10", "CIFAR-10", CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE,
                       "labels", "batches.meta", "label_names", "CIFAR10", CIFAR10_CLASSES)
CIFAR100 = CifarRelease("cifar100", "CIFAR-100", CIFAR100_FOLDER, ("train",), "test",
                        "fine_labels", "meta", "fine_label_names", "CIFAR100")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torchvision_dataset(release: CifarRelease):
    import torchvision.datasets

    return getattr(torchvision.datasets, release.torchvision_class)


def _official_md5s(release: CifarRelease) -> dict[str, str]:
    # torchvision carries the official release's checksums; reuse them rather than copy them.
    dataset = _torchvision_dataset(release)
    return {name: md5 for name, md5 in dataset.train_list + dataset.test_list}


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles; allow only what numpy arrays need, so that a crafted
    file (md5 is not checked with data.verify=false, and never for the meta file) cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles from Python 3 store raw bytes

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")


def _unpickle(path: Path, title: str, keys: Sequence[str]) -> dict:
    """The dict pickled in one of `title`'s python files, which must hold `keys`."""
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise KDResearchError(f"{path} is not a {title} python data file ({error})") from None
    if not isinstance(content, dict):
        raise KDResearchError(f"{path} is not a {title} python data file (holds a {type(content).__name__})")
    missing = [key for key in keys if key not in content]
    if missing:
        raise KDResearchError(f"{path} is not a {title} python data file (no {', '.join(map(repr, missing))})")
    return content


def _read_batch(path: Path, release: CifarRelease, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of one data file, checked."""
    batch = _unpickle(path, release.title, ("data", release.label_key))
    images, labels = batch["data"], np.asarray(batch[release.label_key])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise KDResearchError(f"{path} is not a {release.title} python data file "
                              f"('data' must be uint8 rows of 3072 bytes)")
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise KDResearchError(f"{path} is not a {release.title} python data file "
                              f"('{release.label_key}' must be a list of integers)")
    if len(images) != len(labels):
        raise KDResearchError(f"{path} holds {len(images)} images but {len(labels)} labels "
                              f"('{release.label_key}'); the file is damaged or not {release.title}")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise KDResearchError(f"{path} holds label {int(labels[outside][0])}, outside [0, {num_classes}) "
                              f"for data.num_classes={num_classes}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download(release: CifarRelease, root: Path) -> None:
    try:
        _torchvision_dataset(release)(root=str(root), train=True, download=True)
    except Exception as error:  # URLError, socket errors, corrupt archive: one message for all
        raise KDResearchError(
            f"could not download {release.title} into {root} ({error}). Without network, put a copy in the "
            f"standard '{release.folder}' layout under data.root=PATH, or use data=synthetic"
        ) from None


def _class_names(folder: Path, release: CifarRelease, num_classes: int) -> tuple[str, ...]:
    meta = folder / release.meta_file
    if meta.is_file():
        names = _unpickle(meta, release.title, (release.meta_key,))[release.meta_key]
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise KDResearchError(f"{meta} is not a {release.title} python data file "
                                  f"('{release.meta_key}' must be a list of names)")
        classes = tuple(names)
        check_class_count(len(classes), num_classes, f"{meta} names {len(classes)} classes")
    else:
        classes = release.official_classes
        check_class_count(len(classes), num_classes, f"{release.title} has {len(classes)} classes")
    return classes


def load_cifar(release: CifarRelease, root: str, download: bool, verify: bool, num_classes: int,
               limit_train: Optional[int], limit_test: Optional[int], mean: Sequence[float],
               std: Sequence[float], augment: bool = False, val_size: int = 0, val_seed: int = 0) -> ImageData:
    """A CIFAR python release (`CIFAR10` or `CIFAR100`) from `root/<release.folder>`, downloading
    it with torchvision if allowed and files are missing.

    With `verify`, every data file must match the official release's md5 (torchvision's); a
    re-encoded copy (like the 10k-image sample in ../shared/data) loads with `verify=False`.
    `num_classes` must be the number of class names, and every label must lie in [0, num_classes).
    """
    check_normalisation(mean, std)
    check_num_classes(num_classes)
    root_path = Path(root).expanduser()
    folder = root_path / release.folder
    missing = [name for name in release.required_files if not (folder / name).is_file()]
    if missing and download:
        _download(release, root_path)
        missing = [name for name in release.required_files if not (folder / name).is_file()]
    if missing:
        raise KDResearchError(
            f"{release.title} not found: {folder} lacks {', '.join(missing)}. Options: data.download=true "
            f"(needs network), data.root=PATH to a folder holding '{release.folder}', or data=synthetic"
        )
    if verify:
        expected = _official_md5s(release)
        mismatched = [name for name in release.data_files if _md5(folder / name) != expected[name]]
        if mismatched:
            raise KDResearchError(
                f"{release.title} files in {folder} do not match the official md5 sums "
                f"({', '.join(mismatched)}). If this copy is trusted (e.g. a re-encoded sample), "
                f"load it with data.verify=false"
            )
    classes = _class_names(folder, release, num_classes)

    def read(names):
        images, labels = zip(*(_read_batch(folder / name, release, num_classes) for name in names))
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    return _image_data(release.name, read(release.train_files), read([release.test_file]), classes,
                       limit_train, limit_test, mean, std, augment, val_size, val_seed)


def load_cifar10(root: str = "data", download: bool = True, verify: bool = True, num_classes: int = 10,
                 limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), augment: bool = False,
                 val_size: int = 0, val_seed: int = 0) -> ImageData:
    """CIFAR-10 from `root/cifar-10-batches-py` (see `load_cifar`); class names from
    batches.meta when present, else the official ones."""
    return load_cifar(CIFAR10, root, download, verify, num_classes, limit_train, limit_test, mean, std, augment,
                      val_size, val_seed)


def load_cifar100(root: str = "data", download: bool = True, verify: bool = True, num_classes: int = 100,
                  limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                  mean: Sequence[float] = (0.5071, 0.4865, 0.4409),
                  std: Sequence[float] = (0.2673, 0.2564, 0.2762), augment: bool = False,
                  val_size: int = 0, val_seed: int = 0) -> ImageData:
    """CIFAR-100 from `root/cifar-100-python/{train,test,meta}` (see `load_cifar`): the 100 fine
    labels, class names from meta's fine_label_names."""
    return load_cifar(CIFAR100, root, download, verify, num_classes, limit_train, limit_test, mean, std, augment,
                      val_size, val_seed)


# --- synthetic --------------------------------------------------------------------------------

def make_synthetic(num_train: int = 2000, num_test: int = 500, num_classes: int = 10,
                   noise: float = 2.5, seed: int = 0,
                   limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                   mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225), augment: bool = False,
                   val_size: int = 0, val_seed: int = 0) -> ImageData:
    """A small offline CIFAR-shaped dataset that a CNN can learn, for demos and tests.

    Each class has a smooth random colour pattern (8x8 noise upsampled to 32x32); an image is its
    class's pattern, randomly shifted by up to 4 pixels and dimmed or brightened, plus per-pixel
    noise of relative strength `noise`. The data's own `seed` keeps it identical across
    training seeds.
    """
    check_num_classes(num_classes)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 8, 8, generator=generator)
    patterns = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bilinear", align_corners=False)

    def sample(count: int, chunk: int = 4096):
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        dx, dy = (torch.randint(0, 9, (count,), generator=generator) for _ in range(2))
        contrast = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=generator)
        images = torch.empty(count, 3, 32, 32, dtype=torch.uint8)
        # In chunks: float intermediates for 50,000 images would take GBs; the result is uint8.
        for start in range(0, count, chunk):
            part = range(start, min(start + chunk, count))
            crops = torch.stack([patterns[labels[i], :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in part])
            pixels = crops * contrast[start:part.stop] + noise * torch.randn(len(part), 3, 32, 32, generator=generator)
            images[start:part.stop] = (128 + 50 * pixels).round().clamp(0, 255).to(torch.uint8)
        return images, labels

    classes = tuple(f"pattern_{index}" for index in range(num_classes))
    return _image_data("synthetic", sample(num_train), sample(num_test), classes,
                       limit_train, limit_test, mean, std, augment, val_size, val_seed)


# --- batches ----------------------------------------------------------------------------------

def view_parameters(count: int, augment_seed: int, epoch: int, padding: int = 4) -> tuple[torch.Tensor, ...]:
    """The usual CIFAR augmentation's random choices for every training image of one epoch: row and
    column shifts of the zero-padded image (0 .. 2*padding) and a horizontal flip with probability
    1/2. They depend on (augment_seed, epoch, sample index) only, not on the data order, the batch
    size or the student, so every job with the same augmentation seed sees the same views in an
    epoch, and their teacher outputs can be computed once (kdresearch.teacher_outputs)."""
    generator = torch.Generator().manual_seed((augment_seed * 1_000_003 + epoch) % 2**63)
    dy, dx = (torch.randint(0, 2 * padding + 1, (count,), generator=generator) for _ in range(2))
    flip = torch.rand(count, generator=generator) < 0.5
    return dy, dx, flip


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Each image's 32x32 crop of the zero-padded image at (dy, dx), flipped where `flip`."""
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    columns = torch.arange(width).expand(count, width)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + dx[:, None]
    return padded[torch.arange(count)[:, None, None, None], torch.arange(3)[None, :, None, None],
                  rows, columns[:, None, None, :]]


class Normalizer:
    """uint8 image batches -> float on `device`, normalised, in the chosen memory format: the
    tutorial's ToTensor() + Normalize(mean, std), folded into one multiply-add per pixel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool):
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        self.scale = (1 / (255 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return (images * self.scale + self.shift).contiguous(memory_format=self.memory_format)


def batch_indices(count: int, batch_size: int, order: Optional[torch.Tensor],
                  shard: tuple[int, int]) -> Iterator[torch.Tensor]:
    """The sample indices of each batch: `order` (a permutation) cut into global batches, of which
    data-parallel process `rank` of `size` takes every size-th sample; None means stored order."""
    rank, size = shard
    for start in range(0, count, batch_size):
        if order is None:
            yield torch.arange(start, min(start + batch_size, count))
        else:
            yield order[start:start + batch_size][rank::size]


class Batches:
    """What every dataset's batches share: a seeded order per pass, data-parallel sharding,
    augmentation and normalisation. Subclasses say how the images of a batch are fetched.

    `generator` (a CPU torch.Generator) shuffles once per pass; its state belongs to the
    training run's checkpoint. None means the stored order (evaluation). With `shard=(rank, size)`
    each of `size` data-parallel processes draws the same permutation and takes every size-th
    sample of each global batch, so `batch_size` stays the global batch size. With `augment`,
    each image is seen as its view of the current epoch (`set_epoch`, see `view_parameters`).
    """

    def __init__(self, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 channels_last: bool = False, augment: bool = False, shard: tuple[int, int] = (0, 1),
                 augment_seed: int = 0):
        self.labels = labels
        self.batch_size, self.device, self.generator = batch_size, device, generator
        self.augment, self.augment_seed, self.epoch = augment, augment_seed, 1
        self.shard = shard  # data-parallel: (this process's rank, number of processes)
        self.normalize = Normalizer(mean, std, device, channels_last)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmented views the next passes yield."""
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def order(self) -> Optional[torch.Tensor]:
        """This pass's permutation (None: stored order); draws from the generator."""
        return torch.randperm(len(self.labels), generator=self.generator) if self.generator is not None else None

    def views(self) -> Optional[tuple[torch.Tensor, ...]]:
        """This epoch's view parameters of every sample (None without augmentation)."""
        return view_parameters(len(self.labels), self.augment_seed, self.epoch) if self.augment else None

    def finish(self, images: torch.Tensor, index: torch.Tensor, views: Optional[tuple[torch.Tensor, ...]]):
        """(normalised images, labels, index) of one batch of uint8 images."""
        if views is not None:
            images = crop_flip(images, *(choice[index] for choice in views))
        return self.normalize(images), self.labels[index].to(self.device, non_blocking=True), index


class BatchIterator(Batches):
    """Batches of in-memory uint8 images (see Batches)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, data: ImageData, batch_size: int,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 channels_last: bool = False, augment: bool = False, shard: tuple[int, int] = (0, 1),
                 augment_seed: int = 0):
        super().__init__(labels, data.mean, data.std, batch_size, device, generator, channels_last, augment, shard,
                         augment_seed)
        self.images = images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yields (images, labels, index): index says which stored samples the batch holds."""
        order, views = self.order(), self.views()
        for index in batch_indices(len(self.labels), self.batch_size, order, self.shard):
            if order is None:  # contiguous: slicing avoids a gather copy
                images = self.images[int(index[0]):int(index[-1]) + 1]
            else:
                images = self.images[index]
            yield self.finish(images, index, views)
