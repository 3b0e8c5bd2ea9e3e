"""Augmented views: random crop (padding 4) and horizontal flip, a function of (augment_seed,
epoch, sample), applied to whole batches on the device.
"""

from __future__ import annotations

import torch


def view_parameters(count: int, augment_seed: int, epoch: int, padding: int = 4) -> tuple[torch.Tensor, ...]:
    """The usual CIFAR augmentation's random choices for every training image of one epoch: row and
    column shifts of the zero-padded image (0 .. 2*padding) and a horizontal flip with probability
    1/2. They depend on (augment_seed, epoch, sample index) only, not on the data order, the batch
    size or the student, so every job with the same augmentation seed sees the same views in an
    epoch, and their teacher outputs can be computed once (kdresearch.teacher.outputs)."""
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
