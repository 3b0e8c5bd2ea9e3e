"""ImageNet in the ImageFolder layout: `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`.

The images stream through the image-folder machinery (`kdresearch.data.image_folder`: DataLoader
workers decode and transform each file, the main process batches and normalises). The transforms
are the standard recipe's (torchvision's reference scripts): training views are a
RandomResizedCrop(`image_size`, scale 0.08-1, ratio 3/4-4/3) + horizontal flip, evaluation is
Resize(`resize_size`, shorter side) + CenterCrop(`image_size`). Each training view is drawn from a
generator seeded by (augmentation seed, epoch, sample), not from the worker's random state, so a
resumed job and the teacher's per-view outputs (`kdresearch.teacher.outputs.ViewsTeacher`, where
they fit under `cache.max_gb`) see the same crops whatever the number of workers.

ImageNet's labelled evaluation split is `val/`: the trainer reports it as its `test` split. The
fingerprint hashes file metadata and a sample of the bytes (`folder_fingerprint`), seconds
instead of a read of 140 GB; the workers check every file as they decode it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from kdresearch.config import validators
from kdresearch.data.image_folder import FolderLayout, ImageFolderData, class_folder_splits

IMAGENET_LAYOUT = FolderLayout("data=imagenet", (("train", "train"), ("test", "val")))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Evaluation: the shorter side resized (bilinear) to `resize_size`, then the central
    `crop_size` x `crop_size` square (torchvision's Resize + CenterCrop)."""

    resize_size: int = 256
    crop_size: int = 224

    @property
    def identity(self) -> object:
        return ("resize-center-crop", self.resize_size, self.crop_size)

    def __call__(self, image: Image.Image, index: int, epoch: int, augment_seed: int) -> np.ndarray:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        resized = (max(self.resize_size, round(width * scale)), max(self.resize_size, round(height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left = int(round((resized[0] - self.crop_size) / 2))
        top = int(round((resized[1] - self.crop_size) / 2))
        return np.asarray(image.crop((left, top, left + self.crop_size, top + self.crop_size)))


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Training views: a random area (`scale`) and aspect ratio (`ratio`, log-uniform) of the image
    resized to `size` x `size`, flipped with probability 1/2 (torchvision's RandomResizedCrop +
    RandomHorizontalFlip, ten tries then the central crop), drawn from a generator seeded by
    (augment_seed, epoch, index)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @property
    def identity(self) -> object:
        return ("random-resized-crop-flip", self.size, self.scale, self.ratio)

    def box(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + draws[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + draws[1] * (log_ratio[1] - log_ratio[0]))
            crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                return (int(draws[2] * (width - crop_w + 1)), int(draws[3] * (height - crop_h + 1)), crop_w, crop_h)
        aspect = width / height  # fallback: the central crop of the nearest allowed aspect ratio
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h

    def __call__(self, image: Image.Image, index: int, epoch: int, augment_seed: int) -> np.ndarray:
        seed = ((augment_seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63
        generator = torch.Generator().manual_seed(seed)
        left, top, crop_w, crop_h = self.box(*image.size, generator)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        if torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(image)


def load_imagenet(root: Optional[str] = None, num_classes: int = 1000, num_workers: int = 8, augment: bool = True,
                  image_size: int = 224, resize_size: int = 256, limit_train: Optional[int] = None,
                  limit_test: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, val_size: int = 0, val_seed: int = 0,
                  eval_batch_size: int = 256) -> ImageFolderData:
    """ImageNet (or any `train/<class>/`, `val/<class>/` folder) streamed per batch with the
    standard transforms (see the module docstring); `val/` is the reported `test` split, and
    `val_size` holds out images of `train/` for model selection."""
    validators.integer("data.image_size", image_size, at_least=8)
    validators.integer("data.resize_size", resize_size, at_least=image_size, note="data.image_size")
    validators.integer("data.eval_batch_size", eval_batch_size, at_least=1)
    folder, classes, ((train_files, train_labels), val, (test_files, test_labels)) = class_folder_splits(
        IMAGENET_LAYOUT, root, num_classes, num_workers, limit_train, limit_test, mean, std, val_size, val_seed)
    val_files, val_labels = val or (None, None)
    return ImageFolderData("imagenet", folder, train_files, train_labels, test_files, test_labels, classes,
                           tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(augment), num_workers,
                           val_files, val_labels, preprocess=ResizeCenterCrop(resize_size, image_size),
                           augmentation=RandomResizedCropFlip(image_size), sampled_fingerprint=True,
                           eval_batch_size=eval_batch_size)
