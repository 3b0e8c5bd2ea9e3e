"""The strong augmented view: its own random crop (padding 4) and horizontal flip, then FixMatch's
RandAugment (two operations) and a Cutout, on whole uint8 batches.

This is the policy multi-level logit distillation trains on (Jin, Wang & Lin, "Multi-level Logit
Distillation", CVPR 2023; the authors' CIFAR-100 code, `get_cifar100_train_transform_strong` in
`mdistiller/dataset/cifar100.py`): per image,

1. a crop and flip drawn independently of the weak view's (the ordinary crop+flip view);
2. two operations drawn with replacement from the 14 below, each with a magnitude drawn uniformly
   from its range (the `10` of `RandAugment(2, 10)` is unused by that code, as in FixMatch's);
3. a Cutout: a grey (125, 123, 114) square of side u * W, u uniform in [0, 0.5), whose centre is
   drawn the way that code draws it, `np.random.uniform(W)`, i.e. uniform in (1, W] rather than
   [0, W) (numpy's first argument is the lower bound), its top-left corner clipped at 0, both
   corners inclusive as PIL draws a filled rectangle.

    op             range            what it does to pixel values x in 0..255
    AutoContrast   -                per channel, [min, max] stretched to [0, 255]
    Brightness     [0.05, 0.95]     v * x
    Color          [0.05, 0.95]     grey + v * (x - grey), grey = 0.299 R + 0.587 G + 0.114 B (PIL's L)
    Contrast       [0.05, 0.95]     m + v * (x - m), m the image's mean grey level
    Equalize       -                per channel histogram equalisation (PIL's lookup table)
    Identity       -                x
    Posterize      [4, 8]           keep the top int(v) bits
    Rotate         [-30, 30]        rotated v degrees counter-clockwise about the centre
    Sharpness      [0.05, 0.95]     s + v * (x - s), s smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13
    ShearX/ShearY  [-0.3, 0.3]      x_in = x + v * y / y_in = y + v * x (about the top-left corner)
    Solarize       [0, 256]         255 - x where x >= v
    TranslateX/Y   [-0.3, 0.3]      shifted by v * W / v * H pixels

Geometric operations sample the nearest pixel and fill with black, as PIL's `rotate` and
`transform(AFFINE)` do by default. Every operation ends on whole levels in 0..255 the way PIL's do
(blends truncate, the grey conversion and the smoothing filter round), so each gives PIL's pixels
(checked in tests/test_mlkd.py against Pillow itself).

All choices for every training image of an epoch are drawn at once from a generator seeded by
(augmentation seed, epoch) and this view's name, so a sample's strong view is a pure function of
(augment_seed, epoch, sample index): independent of the batch order, the batch size and the job,
which keeps resume exact and lets the teacher's outputs on it be cached per epoch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kdresearch.data.augmentation import crop_flip

OPERATIONS = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Rotate",
              "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
RANGES = {"Brightness": (0.05, 0.95), "Color": (0.05, 0.95), "Contrast": (0.05, 0.95), "Posterize": (4, 8),
          "Rotate": (-30, 30), "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
          "Solarize": (0, 256), "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3)}  # the others: (0, 1), unused
OPS_PER_IMAGE = 2
CUTOUT_MAX = 0.5  # the Cutout's side as a fraction of the width: uniform in [0, CUTOUT_MAX)
CUTOUT_FILL = (125, 123, 114)
GREY = (19595, 38470, 7471)  # PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. 0.299, 0.587, 0.114


@dataclass(frozen=True)
class StrongChoices:
    """The strong view's random choices for a set of samples (one row each)."""

    dy: torch.Tensor  # (N,) crop row shift 0..8
    dx: torch.Tensor  # (N,) crop column shift 0..8
    flip: torch.Tensor  # (N,) bool
    ops: torch.Tensor  # (N, OPS_PER_IMAGE) index into OPERATIONS
    magnitudes: torch.Tensor  # (N, OPS_PER_IMAGE) in [0, 1): position within the operation's range
    cutout: torch.Tensor  # (N,) uniform [0, 1): side = CUTOUT_MAX * this * W
    centre: torch.Tensor  # (N, 2) uniform [0, 1): (x, y) of the Cutout's centre, mapped to (1, W]

    def __getitem__(self, index: torch.Tensor) -> "StrongChoices":
        return StrongChoices(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


def strong_seed(augment_seed: int, epoch: int) -> int:
    """The generator seed of an epoch's strong views: a hash, so it never coincides with the weak
    view's seed of any (seed, epoch)."""
    digest = hashlib.sha256(f"strong|{augment_seed}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def strong_view_parameters(count: int, augment_seed: int, epoch: int, padding: int = 4) -> StrongChoices:
    """Every training image's strong-view choices for one epoch (module docstring)."""
    generator = torch.Generator().manual_seed(strong_seed(augment_seed, epoch))
    dy, dx = (torch.randint(0, 2 * padding + 1, (count,), generator=generator) for _ in range(2))
    flip = torch.rand(count, generator=generator) < 0.5
    ops = torch.randint(0, len(OPERATIONS), (count, OPS_PER_IMAGE), generator=generator)
    magnitudes = torch.rand(count, OPS_PER_IMAGE, generator=generator)
    cutout = torch.rand(count, generator=generator)
    centre = torch.rand(count, 2, generator=generator)
    return StrongChoices(dy, dx, flip, ops, magnitudes, cutout, centre)


def strong_view(images: torch.Tensor, choices: StrongChoices) -> torch.Tensor:
    """Each uint8 (N, 3, H, W) image's strong view under its `choices` (one row per image), uint8."""
    cropped = crop_flip(images, choices.dy, choices.dx, choices.flip)
    pixels = cropped.float()
    for slot in range(OPS_PER_IMAGE):
        for op_index, name in enumerate(OPERATIONS):
            chosen = (choices.ops[:, slot] == op_index).nonzero().flatten()
            if name == "Identity" or chosen.numel() == 0:
                continue
            low, high = RANGES.get(name, (0, 1))
            value = low + (high - low) * choices.magnitudes[chosen, slot].float()
            pixels[chosen] = OPERATION_FUNCTIONS[name](pixels[chosen], value.to(pixels.device))
    return cutout(pixels, choices.cutout, choices.centre).to(torch.uint8)


# --- the operations: float (n, 3, H, W) pixels in 0..255 and one value per image -> the same ----------

def _levels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.round().clamp_(0, 255)


def _truncated(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.floor().clamp_(0, 255)


def _per_image(value: torch.Tensor) -> torch.Tensor:
    return value.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, pixels: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + v * (image - degenerate), truncated (Image.blend)."""
    return _truncated(degenerate + _per_image(value) * (pixels - degenerate))


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GREY, dtype=torch.float64, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.double() * weights).sum(dim=1, keepdim=True) + 2**15).div(2**16).floor().to(pixels.dtype)


def auto_contrast(pixels, value):
    low = pixels.amin(dim=(2, 3), keepdim=True).double()
    high = pixels.amax(dim=(2, 3), keepdim=True).double()
    spread = high - low
    scale = torch.full_like(spread, 255).div_(spread.clamp(min=1))  # `255 / t` would multiply by 1 / t
    # PIL's lookup table: int(x * scale - low * scale) in double precision (truncated)
    stretched = (pixels.double() * scale - low * scale).floor().clamp_(0, 255).to(pixels.dtype)
    return torch.where(spread > 0, stretched, pixels)  # a flat channel is left as it is


def brightness(pixels, value):
    return _blend(torch.zeros_like(pixels), pixels, value)


def color(pixels, value):
    return _blend(_grey(pixels).expand_as(pixels), pixels, value)


def contrast(pixels, value):
    mean = (_grey(pixels).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()  # PIL: int(mean + 0.5)
    return _blend(mean.expand_as(pixels), pixels, value)


def equalize(pixels, value):
    """PIL's ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below level i) // step with
    step = (#pixels - #pixels of the highest level present) // 255; identity when step is 0."""
    count, channels, height, width = pixels.shape
    levels = pixels.long().view(count * channels, height * width)
    histogram = torch.zeros(count * channels, 256, dtype=torch.long, device=pixels.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    highest = 255 - histogram.flip(1).ne(0).long().argmax(dim=1)  # the highest level present
    step = (height * width - histogram.gather(1, highest[:, None])) // 255  # (rows, 1)
    below = histogram.cumsum(dim=1) - histogram
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    equalized = lut.gather(1, levels)
    return torch.where(step > 0, equalized, levels).view_as(pixels).float()


def posterize(pixels, value):
    drop = 2.0 ** (8 - value.floor().clamp(min=1))
    return (pixels / _per_image(drop)).floor() * _per_image(drop)


def sharpness(pixels, value):
    """The smoothed image keeps the border pixels of the original (PIL's filters leave them)."""
    kernel = torch.ones(3, 1, 3, 3, device=pixels.device)
    kernel[:, :, 1, 1] = 5
    smooth = _levels(F.conv2d(pixels, kernel / 13, groups=3))
    degenerate = pixels.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, pixels, value)


def solarize(pixels, value):
    return torch.where(pixels >= _per_image(value), 255 - pixels, pixels)


def affine(pixels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """PIL's transform(AFFINE, NEAREST): output pixel (x, y) takes the input pixel under
    matrix @ (x + 0.5, y + 0.5, 1) (rounded down), black outside the image. `matrix`: (n, 2, 3)."""
    count, channels, height, width = pixels.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=pixels.device) + 0.5,
                            torch.arange(width, device=pixels.device) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)]).view(3, -1)  # (3, H*W)
    source = (matrix.to(pixels.device, torch.float64) @ points.double()).floor().long()  # (n, 2, H*W)
    x_in, y_in = source[:, 0], source[:, 1]
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    flat = (y_in.clamp(0, height - 1) * width + x_in.clamp(0, width - 1))[:, None, :].expand(-1, channels, -1)
    moved = pixels.view(count, channels, -1).gather(2, flat)
    return (moved * inside[:, None, :]).view_as(pixels)


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], dim=-1), torch.stack([d, e, f], dim=-1)], dim=-2)


def rotate(pixels, value):
    """PIL's Image.rotate(v): about the image centre, counter-clockwise for positive v."""
    angle = -value.double() * math.pi / 180
    cos, sin = angle.cos(), angle.sin()
    cx, cy = pixels.shape[3] / 2, pixels.shape[2] / 2
    return affine(pixels, _matrices(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def _shift_matrix(value, b=0.0, c=0.0, d=0.0, f=0.0):
    one, zero = torch.ones_like(value, dtype=torch.float64), torch.zeros_like(value, dtype=torch.float64)
    return _matrices(one, zero + b, zero + c, zero + d, one, zero + f)


def shear_x(pixels, value):
    return affine(pixels, _shift_matrix(value, b=value.double()))


def shear_y(pixels, value):
    return affine(pixels, _shift_matrix(value, d=value.double()))


def translate_x(pixels, value):
    return affine(pixels, _shift_matrix(value, c=value.double() * pixels.shape[3]))


def translate_y(pixels, value):
    return affine(pixels, _shift_matrix(value, f=value.double() * pixels.shape[2]))


OPERATION_FUNCTIONS = {
    "AutoContrast": auto_contrast, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Equalize": equalize, "Posterize": posterize, "Rotate": rotate, "Sharpness": sharpness, "ShearX": shear_x,
    "ShearY": shear_y, "Solarize": solarize, "TranslateX": translate_x, "TranslateY": translate_y,
}


def cutout(pixels: torch.Tensor, size: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The grey square of each image (module docstring, step 3); `size` and `centre` uniform [0, 1)."""
    _, _, height, width = pixels.shape
    side = (CUTOUT_MAX * size.double() * width).to(pixels.device)
    centre = centre.double().to(pixels.device)
    x0 = (width - (width - 1) * centre[:, 0] - side / 2).clamp(min=0).floor()
    y0 = (height - (height - 1) * centre[:, 1] - side / 2).clamp(min=0).floor()
    x1, y1 = (x0 + side).floor(), (y0 + side).floor()  # inclusive, clipped by the image below
    xs = torch.arange(width, device=pixels.device)
    ys = torch.arange(height, device=pixels.device)
    inside_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] <= x1[:, None])
    inside_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] <= y1[:, None])
    covered = (inside_y[:, :, None] & inside_x[:, None, :] & (side > 0)[:, None, None])[:, None]
    fill = torch.tensor(CUTOUT_FILL, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return torch.where(covered, fill, pixels)
