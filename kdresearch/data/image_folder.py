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
from typing import Iterator, Optional, Sequence

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
            f"(every image is resized to {IMAGE_SIZE}x{IMAGE_SIZE})"
        ) from None
    except UnidentifiedImageError:
        raise KDResearchError(f"cannot read image {path} (not an image format PIL knows)") from None
    except (OSError, ValueError) as error:
        raise KDResearchError(f"cannot read image {path} ({error})") from None


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 (3, 32, 32) tensors, decoded in DataLoader workers."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with open_image(path) as image:
                image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                pixels = np.asarray(image).copy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise KDResearchError(f"cannot read image {path} ({error})") from None
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # HWC -> CHW


def _worker_error_line(error: Exception) -> str:
    """DataLoader re-raises a worker's exception with the worker's traceback in its message;
    the user needs its last line, the original message."""
    last = [line for line in str(error).splitlines() if line.strip()][-1]
    return last.split("KDResearchError: ", 1)[-1]


class StreamingBatches(Batches):
    """Like `kdresearch.data.batches.BatchIterator`, but the images of each batch are read from files by
    `num_workers` DataLoader processes (0: in this process)."""

    def __init__(self, files: ImageFiles, labels: torch.Tensor, data: "ImageFolderData", batch_size: int,
                 device: torch.device, generator: Optional[torch.Generator] = None,
                 channels_last: bool = False, augment: bool = False, shard: tuple[int, int] = (0, 1),
                 augment_seed: int = 0):
        super().__init__(labels, data.mean, data.std, batch_size, device, generator, channels_last, augment, shard,
                         augment_seed)
        self.files = files
        self.num_workers = data.num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = list(batch_indices(len(self.labels), self.batch_size, self.order(), self.shard))
        views = self.views()
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
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def batches(self, split: str, batch_size: int, device: torch.device,
                generator: Optional[torch.Generator] = None, channels_last: bool = False,
                augment: bool = False, shard: tuple[int, int] = (0, 1), augment_seed: int = 0) -> StreamingBatches:
        files, labels = {"train": (self.train_files, self.train_labels), "val": (self.val_files, self.val_labels),
                         "test": (self.test_files, self.test_labels)}[split]
        return StreamingBatches(ImageFiles(files), labels, self, batch_size, device, generator,
                                channels_last, augment, shard, augment_seed)

    def fingerprint(self) -> str:
        """Content hash of every file (with its place and label) and of the preprocessing; it
        reads the whole dataset once, so it is computed once per job, and checks every file's
        header on the way (`open_image`): a bad file stops the job before training starts."""
        if self._fingerprint is None:
            log.info("hashing the %d files of %s", len(self.train_files) + len(self.test_files), self.root)
            digest = hashlib.sha256()
            splits = [(self.train_files, self.train_labels), (self.test_files, self.test_labels)]
            if self.has_validation:
                splits.insert(1, (self.val_files, self.val_labels))
            for files, labels in splits:
                for path, label in zip(files, labels.tolist()):
                    content = path.read_bytes()
                    open_image(path, content).close()
                    digest.update(f"{path.relative_to(self.root)}|{label}|".encode())
                    digest.update(content)
            digest.update(repr((self.mean, self.std, IMAGE_SIZE)).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def _list_split(folder: Path, classes: Sequence[str]) -> tuple[list[Path], torch.Tensor]:
    files, labels = [], []
    known = {name: label for label, name in enumerate(classes)}
    for class_folder in sorted(path for path in folder.iterdir() if path.is_dir()):
        if class_folder.name not in known:
            raise KDResearchError(f"{class_folder} is a class that {folder.parent / 'train'} does not have")
        found = sorted(path for path in class_folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [known[class_folder.name]] * len(found)
    if not files:
        raise KDResearchError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}/<class>/")
    return files, torch.tensor(labels, dtype=torch.int64)


def load_image_folder(root: Optional[str] = None, num_classes: int = 10, num_workers: int = 2,
                      augment: bool = False, limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                      mean: Sequence[float] = (0.485, 0.456, 0.406),
                      std: Sequence[float] = (0.229, 0.224, 0.225), val_size: int = 0,
                      val_seed: int = 0) -> ImageFolderData:
    """`<root>/train/<class>/*` and `<root>/test/<class>/*`, read per batch (see the module docstring);
    train/ must hold `num_classes` class folders."""
    if not root:
        raise KDResearchError("data=image_folder needs data.root=PATH (a folder with train/<class>/ and test/<class>/)")
    folder = Path(root).expanduser()
    for split in ("train", "test"):
        if not (folder / split).is_dir():
            raise KDResearchError(f"data.root={root}: {folder / split} is missing; the layout is "
                                  f"<root>/train/<class>/<image> and <root>/test/<class>/<image>")
    validators.integer("data.num_workers", num_workers, at_least=0)
    check_normalisation(mean, std)
    check_num_classes(num_classes)
    classes = tuple(sorted(path.name for path in (folder / "train").iterdir() if path.is_dir()))
    check_class_count(len(classes), num_classes, f"{folder / 'train'} has {len(classes)} class folders")
    # The files are listed class by class: the limits are drawn across the classes, never a prefix.
    (train_files, train_labels), val, (test_files, test_labels) = split_samples(
        _list_split(folder / "train", classes), _list_split(folder / "test", classes),
        limit_train, limit_test, val_size, val_seed)
    val_files, val_labels = val or (None, None)
    return ImageFolderData("image_folder", folder, train_files, train_labels, test_files, test_labels, classes,
                           tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(augment), num_workers,
                           val_files, val_labels)
