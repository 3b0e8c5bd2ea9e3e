"""CIFAR-10 and CIFAR-100: one reader for both python releases, md5-verified, held in memory as
uint8 tensors (CIFAR-10 is 150 MB as uint8, so the whole set lives in one (N, 3, 32, 32) tensor).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdresearch.data.splits import (
    ImageData,
    check_class_count,
    check_normalisation,
    check_num_classes,
    in_memory_data,
)
from kdresearch.digests import file_digest
from kdresearch.errors import KDResearchError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR100_FOLDER = "cifar-100-python"


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
        mismatched = [name for name in release.data_files if file_digest(folder / name, "md5") != expected[name]]
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

    return in_memory_data(release.name, read(release.train_files), read([release.test_file]), classes,
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
