"""A small offline CIFAR-shaped dataset that CNNs learn (`data=synthetic`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kdresearch.config import validators
from kdresearch.data.splits import ImageData, check_num_classes, in_memory_data


def check_sizes(num_train, num_test, num_classes) -> None:
    """`data.num_train`, `data.num_test` and `data.num_classes`: at most one class per training
    image (the class patterns take 19 KB each, so a typo such as num_classes=1000000 would fill the
    memory before anything is reported)."""
    validators.integer("data.num_train", num_train, at_least=1)
    validators.integer("data.num_test", num_test, at_least=1)
    check_num_classes(num_classes, at_most=num_train, note="data.num_train: one class per training image at most")


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
    check_sizes(num_train, num_test, num_classes)
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
    return in_memory_data("synthetic", sample(num_train), sample(num_test), classes,
                       limit_train, limit_test, mean, std, augment, val_size, val_seed)
