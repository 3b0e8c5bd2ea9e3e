"""Image datasets too large to hold in memory: files decoded per batch by DataLoader workers.

`data=image_folder` reads `<root>/train/<class>/<image>` and `<root>/test/<class>/<image>` (any
format PIL opens; the classes are the sorted folder names under train/, as many as
`data.num_classes` says; every image is resized to the tutorial networks' 32x32). Workers decode
images to uint8; the main process then shuffles, augments and normalises them exactly as it does
in-memory data (the same generator draws, the same `kdresearch.data.batches.Batches` code), so a
folder written from an in-memory dataset yields identical batches. The teacher-output cache works
as for in-memory data: it is indexed by sample and keyed by a content hash of every file, computed
once per job. Limits (`data.limit_train`, `data.limit_test`) are drawn across the classes, as for
in-memory data (`kdresearch.data.splits.select_splits`).

The same machinery serves other folder layouts (`kdresearch.data.imagenet`): a `FolderLayout` names
the folder of each of the trainer's splits (ImageNet reports its `val/` folder as `test`), a
`preprocess` transform runs on every image in the workers, and an optional `augmentation`
transform replaces the batch-level crop+flip by one drawn per image in the workers, still a
function of (augmentation seed, epoch, sample) so that resumed jobs and the teacher's per-view
outputs see the same views.

A file that is no image, or whose header declares more pixels than PIL's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`; up to twice that PIL itself only warns, then decodes the whole
file), is refused in one line naming it. The content hash reads every file before training starts, so it
checks every header there too; the workers check again as they decode.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdresearch.config import validators
from kdresearch.data.batches import Batches, batch_indices
from kdresearch.data.splits import (
    LabelledSplits,
    check_class_count,
    check_normalisation,
    check_num_classes,
    split_samples,
)
from kdresearch.errors import KDResearchError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32  # what DeepNN / LightNN take
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"}


class FolderTransform(Protocol):
    """What a worker does to one decoded RGB image of sample `index`: returns the uint8 HWC pixels
    the batch holds (every image of a split the same size). `identity` enters the data fingerprint."""

    identity: object

    def __call__(self, image: Image.Image, index: int, epoch: int, augment_seed: int) -> np.ndarray:
        ...


@dataclass(frozen=True)
class ResizeTo:
    """Every image resized (bilinear) to `size` x `size`: the tutorial networks' 32 px inputs."""

    size: int = IMAGE_SIZE

    @property
    def identity(self) -> object:
        return self.size

    def __call__(self, image: Image.Image, index: int, epoch: int, augment_seed: int) -> np.ndarray:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(image)


@dataclass(frozen=True)
class FolderLayout:
    """Where a folder dataset keeps its splits: `folders` maps the trainer's split names (train,
    test) to folders under the root; `title` names the data option in messages."""

    title: str
    folders: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))

    def folder(self, split: str) -> str:
        return dict(self.folders)[split]


IMAGE_FOLDER = FolderLayout("data=image_folder")


def open_image(path: Path, content: Optional[bytes] = None) -> Image.Image:
    """`Image.open(path)` (of `content` when given: the file's bytes already read), which reads
    only the header; a file PIL cannot identify, or one declaring more than
    `Image.MAX_IMAGE_PIXELS` pixels, is a KDResearchError naming the file."""
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that, and raises beyond: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path if content is None else io.BytesIO(content))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise KDResearchError(
            f"cannot read image {path}: {str(error).rstrip('.')}; remove or shrink the file "
            f"(every image is resized before training)"
        ) from None
    except UnidentifiedImageError:
        raise KDResearchError(f"cannot read image {path} (not an image format PIL knows)") from None
    except (OSError, ValueError) as error:
        raise KDResearchError(f"cannot read image {path} ({error})") from None


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 (3, H, W) tensors, decoded and transformed (`transform`, for the views
    of `epoch` and `augment_seed`) in DataLoader workers."""

    def __init__(self, files: Sequence[Path], transform: FolderTransform = ResizeTo(), epoch: int = 1,
                 augment_seed: int = 0):
        self.files = list(files)
        self.transform, self.epoch, self.augment_seed = transform, epoch, augment_seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            pixels = self.transform(self.decode(path), index, self.epoch, self.augment_seed)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise KDResearchError(f"cannot read image {path} ({error})") from None
        return self.to_tensor(pixels)

    @staticmethod
    def decode(path: Path) -> Image.Image:
        """The file's pixels as an RGB image."""
        with open_image(path) as image:
            return image.convert("RGB")

    @staticmethod
    def to_tensor(pixels: np.ndarray) -> torch.Tensor:
        """HWC uint8 pixels -> the (3, H, W) uint8 tensor a worker returns."""
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()


def _worker_error_line(error: Exception) -> str:
    """DataLoader re-raises a worker's exception with the worker's traceback in its message;
    the user needs its last line, the original message."""
    last = [line for line in str(error).splitlines() if line.strip()][-1]
    return last.split("KDResearchError: ", 1)[-1]


class StreamingBatches(Batches):
    """Like `kdresearch.data.batches.BatchIterator`, but the images of each batch are read from files by
    `num_workers` DataLoader processes (0: in this process). `files` transforms each image; with
    `augment` and a data set whose `augmentation` runs in the workers, the batch-level crop+flip is off."""

    def __init__(self, files: ImageFiles, labels: torch.Tensor, data: "ImageFolderData", batch_size: int,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 channels_last: bool = False, augment: bool = False, shard: tuple[int, int] = (0, 1),
                 augment_seed: int = 0):
        super().__init__(labels, data.mean, data.std, batch_size, device, generator, channels_last, augment, shard,
                         augment_seed)
        self.files = files
        self.num_workers = data.num_workers
        self.augments_in_workers = augment and data.augmentation is not None

    def views(self) -> Optional[tuple[torch.Tensor, ...]]:
        return None if self.augments_in_workers else super().views()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = list(batch_indices(len(self.labels), self.batch_size, self.order(), self.shard))
        views = self.views()
        self.files.epoch, self.files.augment_seed = self.epoch, self.augment_seed  # copied to the workers below
        loader = torch.utils.data.DataLoader(self.files, batch_sampler=[index.tolist() for index in batches],
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        try:
            for index, images in zip(batches, loader):
                yield self.finish(images, index, views)
        except KDResearchError as error:
            # DataLoader's re-raised error sits in a reference cycle with its traceback, whose
            # frames hold the loader's iterator: left to the garbage collector, the workers' queues
            # close before the iterator's shutdown and each worker waits out a 5 s timeout. Without
            # the traceback, the iterator is freed (and its workers stopped) right here.
            error.__traceback__ = None
            raise KDResearchError(_worker_error_line(error)) from None


@dataclass
class ImageFolderData(LabelledSplits):
    """An image-classification dataset as files on disk (see the module docstring)."""

    name: str
    root: Path
    train_files: list[Path]
    train_labels: torch.Tensor  # int64, (N,)
    test_files: list[Path]
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    num_workers: int = 2
    val_files: Optional[list[Path]] = None  # data.val_size files held out of the training set
    val_labels: Optional[torch.Tensor] = None
    preprocess: FolderTransform = ResizeTo()  # every split's images, in the workers
    augmentation: Optional[FolderTransform] = None  # training views drawn in the workers; None: batch crop+flip
    sampled_fingerprint: bool = False  # fingerprint from file metadata and sampled bytes (`folder_fingerprint`)
    eval_batch_size: int = 256
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def batches(self, split: str, batch_size: int, device: torch.device,
                generator: Optional[torch.Generator] = None, channels_last: bool = False,
                augment: bool = False, shard: tuple[int, int] = (0, 1), augment_seed: int = 0) -> StreamingBatches:
        files, labels = {"train": (self.train_files, self.train_labels), "val": (self.val_files, self.val_labels),
                         "test": (self.test_files, self.test_labels)}[split]
        transform = self.augmentation if augment and self.augmentation is not None else self.preprocess
        return StreamingBatches(ImageFiles(files, transform), labels, self, batch_size, device, generator,
                                channels_last, augment, shard, augment_seed)

    def all_splits(self) -> list[tuple[list[Path], torch.Tensor]]:
        splits = [(self.train_files, self.train_labels), (self.test_files, self.test_labels)]
        if self.has_validation:
            splits.insert(1, (self.val_files, self.val_labels))
        return splits

    def fingerprint(self) -> str:
        """Content hash of every file (with its place and label) and of the preprocessing; it
        reads the whole dataset once, so it is computed once per job, and checks every file's
        header on the way (`open_image`): a bad file stops the job before training starts.
        With `sampled_fingerprint` (ImageNet: 140 GB) it hashes file metadata and a sample of the
        bytes instead (`folder_fingerprint`), and the workers alone check the files as they decode."""
        if self._fingerprint is None and self.sampled_fingerprint:
            self._fingerprint = folder_fingerprint(self.root, self.all_splits(),
                                                   repr((self.mean, self.std, self.preprocess.identity,
                                                         None if self.augmentation is None
                                                         else self.augmentation.identity)))
        if self._fingerprint is None:
            log.info("hashing the %d files of %s", len(self.train_files) + len(self.test_files), self.root)
            digest = hashlib.sha256()
            for files, labels in self.all_splits():
                for path, label in zip(files, labels.tolist()):
                    content = path.read_bytes()
                    open_image(path, content).close()
                    digest.update(f"{path.relative_to(self.root)}|{label}|".encode())
                    digest.update(content)
            digest.update(repr((self.mean, self.std, self.preprocess.identity)).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


FINGERPRINT_SAMPLE = 64  # files whose first and last FINGERPRINT_BYTES enter a sampled fingerprint
FINGERPRINT_BYTES = 64 * 1024


def folder_fingerprint(root: Path, splits: Sequence[tuple[Sequence[Path], torch.Tensor]], settings: str,
                       sample: int = FINGERPRINT_SAMPLE) -> str:
    """A fingerprint of a folder dataset that costs seconds, not a read of every byte: each file's
    place, label, size and modification time (one stat per file), the first and last 64 KiB of a
    seeded sample of `sample` files, and `settings` (normalisation, preprocessing). A file
    replaced, added, removed or relabelled changes it (its size or time changes; a copy that keeps
    both is caught only where the sample reads it)."""
    digest = hashlib.sha256()
    files = []
    for split_files, labels in splits:
        for path, label in zip(split_files, labels.tolist()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            files.append((path, stat.st_size))
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:sample].sort().values
    for position in chosen.tolist():
        path, size = files[position]
        with open(path, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(handle.read(FINGERPRINT_BYTES))
    digest.update(settings.encode())
    return digest.hexdigest()[:16]


def list_class_folders(folder: Path, classes: Sequence[str], train_folder: Path,
                       files_under: str = "") -> tuple[list[Path], torch.Tensor]:
    """The images of `folder/<class>/<files_under>/*`, class by class, labelled by their class's
    position in `classes` (the class folders of `train_folder`)."""
    files, labels = [], []
    known = {name: label for label, name in enumerate(classes)}
    for class_folder in sorted(path for path in folder.iterdir() if path.is_dir()):
        if class_folder.name not in known:
            raise KDResearchError(f"{class_folder} is a class that {train_folder} does not have")
        images = class_folder / files_under
        found = sorted(path for path in images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES) \
            if images.is_dir() else []
        files += found
        labels += [known[class_folder.name]] * len(found)
    if not files:
        where = f"{folder}/<class>/{files_under + '/' if files_under else ''}"
        raise KDResearchError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {where}")
    return files, torch.tensor(labels, dtype=torch.int64)


def class_folder_splits(layout: FolderLayout, root: Optional[str], num_classes: int, num_workers: int,
                        limit_train: Optional[int], limit_test: Optional[int], mean: Sequence[float],
                        std: Sequence[float], val_size: int, val_seed: int):
    """The checked root folder, classes and (train, validation or None, test) (files, labels) pairs
    of a `<root>/<split folder>/<class>/<image>` dataset laid out as `layout` says, limited and
    split (`split_samples`)."""
    train_name, test_name = layout.folder("train"), layout.folder("test")
    shape = f"<root>/{train_name}/<class>/<image> and <root>/{test_name}/<class>/<image>"
    if not root:
        raise KDResearchError(f"{layout.title} needs data.root=PATH (a folder with {train_name}/<class>/ "
                              f"and {test_name}/<class>/)")
    folder = Path(root).expanduser()
    for name in (train_name, test_name):
        if not (folder / name).is_dir():
            raise KDResearchError(f"data.root={root}: {folder / name} is missing; the layout is {shape}")
    validators.integer("data.num_workers", num_workers, at_least=0)
    check_normalisation(mean, std)
    check_num_classes(num_classes)
    train_folder = folder / train_name
    classes = tuple(sorted(path.name for path in train_folder.iterdir() if path.is_dir()))
    check_class_count(len(classes), num_classes, f"{train_folder} has {len(classes)} class folders")
    # The files are listed class by class: the limits are drawn across the classes, never a prefix.
    splits = split_samples(list_class_folders(train_folder, classes, train_folder),
                           list_class_folders(folder / test_name, classes, train_folder),
                           limit_train, limit_test, val_size, val_seed)
    return folder, classes, splits


def load_image_folder(root: Optional[str] = None, num_classes: int = 10, num_workers: int = 2,
                      augment: bool = False, limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                      mean: Sequence[float] = (0.485, 0.456, 0.406),
                      std: Sequence[float] = (0.229, 0.224, 0.225), val_size: int = 0,
                      val_seed: int = 0, eval_batch_size: int = 256) -> ImageFolderData:
    """`<root>/train/<class>/*` and `<root>/test/<class>/*`, read per batch (see the module docstring);
    train/ must hold `num_classes` class folders."""
    validators.integer("data.eval_batch_size", eval_batch_size, at_least=1)
    folder, classes, ((train_files, train_labels), val, (test_files, test_labels)) = class_folder_splits(
        IMAGE_FOLDER, root, num_classes, num_workers, limit_train, limit_test, mean, std, val_size, val_seed)
    val_files, val_labels = val or (None, None)
    return ImageFolderData("image_folder", folder, train_files, train_labels, test_files, test_labels, classes,
                           tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(augment), num_workers,
                           val_files, val_labels, eval_batch_size=eval_batch_size)
