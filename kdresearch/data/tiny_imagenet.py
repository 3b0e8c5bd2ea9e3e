"""Tiny-ImageNet (200 classes of 64x64 images) in its release layout, held in memory like CIFAR.

    <root>/wnids.txt                        the class ids (wnids), one a line: the label order
    <root>/train/<wnid>/images/*.JPEG       500 training images per class
    <root>/val/images/*.JPEG                10,000 labelled images: the reported `test` split
    <root>/val/val_annotations.txt          file <TAB> wnid <TAB> bounding box (4 numbers)

(The release's `test/` images carry no labels and are not read.) Every image is decoded once, by
`data.num_workers` DataLoader workers (`kdresearch.data.image_folder.ImageFiles`), resized to
`data.image_size` where it differs (64 in the release) and kept as uint8 (100,000 x 3 x 64 x 64:
1.2 GB); batches, the batch-level crop (padding 4) + flip and the fingerprint are the in-memory
ones (`kdresearch.data.splits.ImageData`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from kdresearch.config import validators
from kdresearch.data.image_folder import IMAGE_SUFFIXES, ImageFiles, ResizeTo, list_class_folders
from kdresearch.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from kdresearch.data.splits import ImageData, check_class_count, check_num_classes, in_memory_data
from kdresearch.errors import KDResearchError

LAYOUT = ("<root>/wnids.txt, <root>/train/<wnid>/images/*.JPEG, <root>/val/images/*.JPEG and "
          "<root>/val/val_annotations.txt")


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise KDResearchError(f"data.root={root}: {path} is missing; the layout is {LAYOUT}")
    classes = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(set(classes)) != len(classes):
        raise KDResearchError(f"{path} names a class twice")
    return classes


def read_val_annotations(root: Path, classes: Sequence[str]) -> tuple[list[Path], torch.Tensor]:
    """The val/ images and their labels, in file-name order, from val_annotations.txt."""
    path = root / "val" / "val_annotations.txt"
    if not path.is_file():
        raise KDResearchError(f"data.root={root}: {path} is missing; the layout is {LAYOUT}")
    known = {name: label for label, name in enumerate(classes)}
    labelled = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in known:
            raise KDResearchError(f"{path} line {number}: expected 'file<TAB>wnid<TAB>...' with a wnid of "
                                  f"wnids.txt, got {line.strip()[:80]!r}")
        labelled[fields[0]] = known[fields[1]]
    images = root / "val" / "images"
    files = sorted(image for image in images.iterdir() if image.suffix.lower() in IMAGE_SUFFIXES) \
        if images.is_dir() else []
    unlabelled = [image.name for image in files if image.name not in labelled]
    if unlabelled:
        raise KDResearchError(f"{images / unlabelled[0]} has no line in {path}")
    if not files:
        raise KDResearchError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images}")
    return files, torch.tensor([labelled[image.name] for image in files], dtype=torch.int64)


def decode_all(files: Sequence[Path], image_size: int, num_workers: int) -> torch.Tensor:
    """uint8 (N, 3, image_size, image_size) of `files`, decoded by `num_workers` DataLoader workers."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, ResizeTo(image_size)), batch_size=500,
                                         num_workers=num_workers)
    return torch.cat(list(loader))


def load_tiny_imagenet(root: Optional[str] = None, num_classes: int = 200, num_workers: int = 4,
                       augment: bool = False, image_size: int = 64, limit_train: Optional[int] = None,
                       limit_test: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, val_size: int = 0, val_seed: int = 0,
                       eval_batch_size: int = 256) -> ImageData:
    """Tiny-ImageNet from `root` (see the module docstring): `val/` is the reported `test` split;
    the limits are drawn across the classes before anything is decoded."""
    if not root:
        raise KDResearchError(f"data=tiny_imagenet needs data.root=PATH (a folder with {LAYOUT})")
    validators.integer("data.num_workers", num_workers, at_least=0)
    validators.integer("data.image_size", image_size, at_least=8)
    validators.integer("data.eval_batch_size", eval_batch_size, at_least=1)
    check_num_classes(num_classes)
    folder = Path(root).expanduser()
    classes = read_classes(folder)
    check_class_count(len(classes), num_classes, f"{folder / 'wnids.txt'} names {len(classes)} classes")
    if not (folder / "train").is_dir():
        raise KDResearchError(f"data.root={root}: {folder / 'train'} is missing; the layout is {LAYOUT}")
    train = list_class_folders(folder / "train", classes, folder / "wnids.txt", files_under="images")
    test = read_val_annotations(folder, classes)
    # Limit the file lists first (the same stratified draw as every dataset), then decode only those.
    limited = in_memory_data("tiny_imagenet", train, test, classes, limit_train, limit_test, mean, std, augment,
                             val_size, val_seed)
    for split in ("train", "val", "test"):
        files = getattr(limited, f"{split}_images")
        if files is not None:
            setattr(limited, f"{split}_images", decode_all(files, image_size, num_workers))
    limited.eval_batch_size = eval_batch_size
    return limited
