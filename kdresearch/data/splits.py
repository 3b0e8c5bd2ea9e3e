"""What the trainer needs of a dataset (the protocol), the labelled splits every dataset derives,
in-memory image data, the input checks of data keys, and the one stratified draw that both the
limits (`data.limit_train`, `data.limit_test`) and the validation hold-out use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from kdresearch.config import validators
from kdresearch.data.batches import BatchIterator
from kdresearch.errors import KDResearchError


class Dataset(Protocol):
    """What the trainer needs of a dataset: `ImageData` (in memory, below) or
    `kdresearch.data.image_folder.ImageFolderData` (image files read per batch by DataLoader workers)."""

    name: str
    augment: bool
    classes: tuple[str, ...]
    num_classes: int  # labels lie in [0, num_classes); equals len(classes)
    train_size: int  # training samples (sample indices lie in [0, train_size))

    def fingerprint(self) -> str:
        """Content hash of the samples, labels and normalisation (not of `augment`: whether a job
        augments is part of its training identity, kdresearch.config.identity, so teacher and
        student of one data set share a fingerprint however each trains)."""

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
    eval_batch_size: int = 256  # the batch of evaluation passes (data.eval_batch_size where the data has the key)

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
    return validators.integer(f"data.{what}", limit, at_least=1, or_null=True)


def check_num_classes(num_classes: int, at_most: Optional[int] = None, note: str = "") -> int:
    """`data.num_classes`: an integer >= 2 (and <= `at_most` where the data sets a bound, `note` saying why)."""
    return validators.integer("data.num_classes", num_classes, at_least=2, at_most=at_most, note=note)


def check_class_count(found: int, num_classes: int, where: str) -> None:
    """Refuse data whose number of classes is not `data.num_classes`; `where` says what was
    counted (e.g. "PATH has 3 class folders"), the message ends with the fix."""
    if found != num_classes:
        fix = f"set data.num_classes={found}" if found >= 2 else "a dataset needs at least 2 classes"
        raise KDResearchError(f"{where} but data.num_classes={num_classes}; {fix}")


def check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    """`data.mean` / `data.std`: one number per RGB channel, std > 0."""
    for key, values, bound in (("data.mean", mean, {}), ("data.std", std, {"above": 0})):
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
            raise KDResearchError(f"{key} must be 3 numbers (one per RGB channel), got {values!r}")
        for index, value in enumerate(values):
            validators.number(f"{key}[{index}]", value, **bound)


def in_memory_data(name, train, test, classes, limit_train, limit_test, mean, std, augment,
                   val_size=0, val_seed=0) -> ImageData:
    """`ImageData` of the (images, labels) pairs `train` and `test`, limited and split (`split_samples`)."""
    check_normalisation(mean, std)
    (train_images, train_labels), val, (test_images, test_labels) = split_samples(
        train, test, limit_train, limit_test, val_size, val_seed)
    val_images, val_labels = val or (None, None)
    return ImageData(name, train_images, train_labels, test_images, test_labels, tuple(classes),
                     tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(augment),
                     val_images, val_labels)


# --- stratified draws: limits and the validation hold-out -------------------------------------

def select_splits(train_labels: torch.Tensor, test_labels: torch.Tensor, limit_train: Optional[int],
                  limit_test: Optional[int], val_size: int, val_seed: int):
    """What a job uses of a dataset's full train and test splits, as sorted positions into them:
    (train, validation, test). The limits are drawn first (`limit_positions`), then `val_size`
    of the limited training samples are held out (`stratified_holdout`). None stands for every
    sample (train, test) or for no validation split."""
    train = limit_positions(train_labels, limit_train, "limit_train")
    test = limit_positions(test_labels, limit_test, "limit_test")
    limited = train_labels if train is None else train_labels[train]
    val = None
    if check_val_size(val_size, len(limited)):
        kept, held_out = stratified_holdout(limited, val_size, val_seed)
        positions = torch.arange(len(train_labels)) if train is None else train
        train, val = positions[kept], positions[held_out]
    return train, val, test


def split_samples(train: tuple, test: tuple, limit_train: Optional[int], limit_test: Optional[int],
                  val_size: int, val_seed: int) -> tuple[tuple, Optional[tuple], tuple]:
    """The (samples, labels) pairs `train` and `test` as a job uses them: (train, validation or
    None, test), chosen by `select_splits`; samples are image tensors or lists of files."""
    (train_samples, train_labels), (test_samples, test_labels) = train, test
    train_at, val_at, test_at = select_splits(train_labels, test_labels, limit_train, limit_test, val_size, val_seed)
    val = None if val_at is None else (take(train_samples, val_at), take(train_labels, val_at))
    return ((take(train_samples, train_at), take(train_labels, train_at)), val,
            (take(test_samples, test_at), take(test_labels, test_at)))


def take(items, positions: Optional[torch.Tensor]):
    """`items` (a tensor, or a list such as image files) at `positions`; all of them for None."""
    if positions is None:
        return items
    if isinstance(items, torch.Tensor):
        return items[positions].contiguous()
    return [items[i] for i in positions.tolist()]


# The seed of the limits' draw: fixed, so a limit keeps the same images in every job and for every
# training seed (the images are part of the data fingerprint, hence of a teacher's identity).
LIMIT_SEED = 0


def limit_positions(labels: torch.Tensor, limit: Optional[int], what: str) -> Optional[torch.Tensor]:
    """The sorted positions that `data.<what>` (limit_train or limit_test) keeps of a split with
    these labels, drawn across the classes (`stratified_sample`), so a limit of a class-sorted split
    (image folders) keeps every class; None when there is no limit or it keeps every sample."""
    if check_limit(limit, what) is None or limit >= len(labels):
        return None
    return stratified_sample(labels, limit, LIMIT_SEED)


def check_val_size(val_size, train_size: int) -> int:
    """`data.val_size`: 0 (no validation split) or fewer images than the training set holds."""
    return validators.integer("data.val_size", val_size, at_least=0, below=train_size, note="the training images")


def stratified_holdout(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions, held-out positions), both sorted: `val_size` training samples held out for
    validation (`stratified_sample` seeded by `data.val_seed`, so every training seed and every job
    on this data validates on the same images)."""
    held = stratified_sample(labels, val_size, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def stratified_sample(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted positions of `size` samples, each class in proportion to its share of the labels
    (largest remainders decide the rounding, ties to the lower class), drawn at random within each
    class with a generator seeded by `seed`: the same labels, size and seed give the same samples."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / len(labels)
    quota = exact.floor().long()
    remainders = exact - quota
    extra = size - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda i: (-float(remainders[i]), i))
    for i in order[:extra]:
        quota[i] += 1
    drawn = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        drawn.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(drawn).sort().values
