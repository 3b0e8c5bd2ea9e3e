"""What the losses that compare relations between features (SP, PKT, RKD, CC, NST, ICKD, FSP)
share: their arithmetic in float32, the row-normalised Gram matrix, and the choice of one stage per
model.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from kdresearch.losses.base import pair_error
from kdresearch.losses.fitnet import resolve_stage
from kdresearch.models import Network


def _float32(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, (tuple, list)):
        return tuple(_float32(item) for item in value)
    return value


def _first_tensor(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def computed_in_float32(term):
    """Run `term` with autocast off and its tensor arguments (alone or in tuples/lists) in float32.

    Relation terms multiply features with each other (Gram matrices, kernels, pairwise distances);
    under bf16 autocast those products would keep 8 mantissa bits, and the large weights these
    methods use (SP 3000, PKT 30000) would amplify the rounding. On float32 inputs `.float()` is
    the tensor itself, so values and gradients are exactly those of the plain formula.
    """

    @functools.wraps(term)
    def in_float32(*args, **kwargs):
        tensor = _first_tensor(args)
        device_type = tensor.device.type if tensor is not None else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return term(*(_float32(arg) for arg in args), **kwargs)

    return in_float32


def normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """(..., K, D) -> (..., K, K): x x^T with each row L2-normalised (F.normalize's eps keeps an
    all-zero row at 0, not NaN). SP's sample-by-sample matrix for x (N, D), ICKD's channel-by-channel
    matrices for x (N, C, H*W)."""
    return F.normalize(x @ x.transpose(-1, -2), p=2.0, dim=-1)


def paired_stage(loss_name: str, stage: int, student: Network, teacher: Network) -> tuple[int, int]:
    """`stage` resolved in each model (negative counts from that model's last stage) as
    non-negative indices (student, teacher), or a pair error when either model lacks it."""
    s_count, t_count = len(student.stage_channels), len(teacher.stage_channels)
    s_index, t_index = resolve_stage(stage, s_count), resolve_stage(stage, t_count)
    if s_index is None or t_index is None:
        raise pair_error(loss_name, f"loss.stage={stage} is out of range (the student has {s_count} stages, "
                         f"the teacher {t_count})", student, teacher)
    return s_index, t_index
