"""Knowledge review, ReviewKD (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
CVPR 2021), as the authors' CIFAR-100 code (github.com/dvlab-research/ReviewKD, CIFAR-100/train.py,
model/reviewkd.py, script/reviewKD.sh) and mdistiller (`distillers/ReviewKD.py`) compute it.

Each teacher stage is distilled from the student's same stage *and all deeper ones*: the student's
levels (its stages, then its pooled embedding as a 1x1 map) are fused from the deepest upwards by
attention-based fusion (ABF) modules, one per level j:

    x_j        = BN(conv1x1(S_j))                                      mid channels
    x_j        = x_j * a_j + up(r_{j+1}) * b_j,  (a_j, b_j) = sigmoid(conv1x1([x_j, up(r_{j+1})]))
                                                                      (not at the deepest level)
    r_j        = x_j resized to the teacher's level-j size            (nearest; the residual passed up)
    out_j      = BN(conv3x3(r_j))                                      the teacher's level-j channels

(`up`: nearest-neighbour resizing to the student's level-j size). Each output is compared with the
teacher's level j, its stage before the final ReLU (`preact_stages`) or, for the last level, its
pooled embedding, by the hierarchical context loss: the MSE of the maps plus the MSEs of their
average-pooled 4x4, 2x2 and 1x1 pyramids, each level (of those smaller than the map) weighing half
the one before, normalised by the weights' sum:

    hcl(F_s, F_t) = (mse(F_s, F_t) + sum_k w_k * mse(pool_k(F_s), pool_k(F_t))) / (1 + sum_k w_k)
                    w = 1/2, 1/4, 1/8 for the pyramid sizes k in 4, 2, 1 that are < the map's side
    reviewkd      = sum_j hcl(out_j, T_j)
    total         = ce_weight * CE + min((epoch - 1) / warmup, 1) * distill_weight * reviewkd

The warm-up counts epochs from 0 as the authors' loop does (`min(1, epoch / kd_warm_up)` with
`epoch` in range(epochs)): the first epoch trains on cross-entropy alone. mdistiller passes 1-based
epochs to the same formula, one epoch ahead of the authors.

Connectors sized from the pair, as the authors' `build_review_kd` tables (and mdistiller's
IN_CHANNELS / OUT_CHANNELS / SHAPES / OUT_SHAPES) spell out per model: input channels the student's
stage channels and embedding width, output channels the teacher's, middle width
min(max_mid_channels, the student's embedding width). The student's levels are its post-activation
stages (the authors' `is_feat=True`; mdistiller's STU_PREACT False); the teacher's are
pre-activation (`preact=True`). A pair with different stage counts is refused: the levels pair one
to one, as in every pair of the authors' tables.

Defaults are the authors' for resnet32x4 -> resnet8x4, also mdistiller's CIFAR-100 config: weight 5,
warm-up 20 epochs, CE weight 1, middle width at most 512. Their other CIFAR-100 weights
(script/reviewKD.sh): 5 for wrn_40_2 -> wrn_16_2 / wrn_40_1 / ShuffleV1 and resnet32x4 ->
ShuffleV1, 8 for resnet32x4 -> ShuffleV2, 0.6 for resnet56 -> resnet20, 1 for resnet110 ->
resnet32; the pair presets carry theirs (`pair_recipe.reviewkd.distill_weight`). Their recipe
trains 240 epochs (SGD, Nesterov, lr 0.1, 0.02 for ShuffleNet / MobileNet students, batch 128,
lr / 10 at 150, 180, 210); mdistiller's lr 0.05, batch 64.

Logged parts: "ce" and "reviewkd" (the HCL sum, unweighted and before the warm-up).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import WeightedDistillation, number, pair_error
from kdresearch.losses.dkd import warmup_factor
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import preact_field

PYRAMID = (4, 2, 1)  # the pooled sizes of the hierarchical context loss, each weighing half the one before


def hierarchical_context(student_map: torch.Tensor, teacher_map: torch.Tensor,
                         pyramid: Sequence[int] = PYRAMID) -> torch.Tensor:
    """The MSE of the maps and of their average-pooled pyramid levels smaller than the map, weights
    1, 1/2, 1/4, ... normalised (module docstring)."""
    side = student_map.shape[2]
    loss, weight, weights = F.mse_loss(student_map, teacher_map), 1.0, 1.0
    for size in pyramid:
        if size >= side:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student_map, size),
                                          F.adaptive_avg_pool2d(teacher_map, size))
        weights += weight
    return loss / weights


@computed_in_float32
def hierarchical_context_loss(student_maps: Sequence[torch.Tensor],
                              teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over the levels of `hierarchical_context`."""
    return torch.stack([hierarchical_context(s, t) for s, t in zip(student_maps, teacher_maps)]).sum()


class AttentionBasedFusion(nn.Module):
    """One level's ABF (module docstring); `fuse` False at the deepest level, which has no residual
    to fuse. Layer names and initialisation are the authors'."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], out_size: tuple[int, int]):
        """(the level's output, the fused map passed on to the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(WeightedDistillation):
    """ce_weight * CE + warm-up * distill_weight * HCL over the fused levels; module docstring.

    `bind` creates one ABF per level (the stages, then the embedding), sized from the pair; they
    are in `state_dict()` and trained with the student. Needs `progress` (the epoch) for the warm-up.
    """

    student_features = True
    part_name = "reviewkd"

    def __init__(self, warmup: float = 20, max_mid_channels: int = 512, ce_weight: float = 1.0,
                 distill_weight: float = 5.0):
        super().__init__(ce_weight, distill_weight)
        self.warmup = number("loss.warmup", warmup)
        self.max_mid_channels = validators.integer("loss.max_mid_channels", max_mid_channels, at_least=1)
        self.fusions = nn.ModuleList()

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        s_count, t_count = len(student.stage_channels), len(teacher.stage_channels)
        if s_count != t_count:
            raise pair_error("reviewkd", f"ReviewKD fuses the student's stage j into the teacher's stage j, so both "
                             f"need the same number of stages (the student has {s_count}, the teacher {t_count})",
                             student, teacher)
        in_channels = (*student.stage_channels, student.embedding_dim)
        out_channels = (*teacher.stage_channels, teacher.embedding_dim)
        mid_channels = min(self.max_mid_channels, student.embedding_dim)
        levels = len(in_channels)
        self.fusions = nn.ModuleList(AttentionBasedFusion(c_in, mid_channels, c_out, fuse=j < levels - 1)
                                     for j, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))
        self.teacher_fields = (*(preact_field(j) for j in range(t_count)), "embedding")

    def reviewed(self, student_levels: Sequence[torch.Tensor], teacher_levels: Sequence[torch.Tensor]):
        """Each level's ABF output, fused from the deepest level up, at the teacher's level sizes."""
        outputs: list[torch.Tensor] = [None] * len(self.fusions)
        residual = None
        for j in reversed(range(len(self.fusions))):
            outputs[j], residual = self.fusions[j](student_levels[j], residual, teacher_levels[j].shape[2:])
        return outputs

    def distillation_term(self, student, teacher, progress=None):
        student_levels = (*student.stages, student.embedding[:, :, None, None])
        teacher_levels = (*teacher.preact_stages, teacher.embedding[:, :, None, None])
        return hierarchical_context_loss(self.reviewed(student_levels, teacher_levels), teacher_levels)

    def forward(self, student, teacher, labels, progress=None):
        if progress is None:
            raise KDResearchError("loss=reviewkd needs the training progress (its warm-up reads the epoch): "
                                  "call it as loss(student, teacher, labels, progress)")
        ce = F.cross_entropy(student.logits, labels)
        reviewkd = self.distillation_term(student, teacher, progress)
        ramp = warmup_factor(progress.epoch - 1, self.warmup)  # the authors count epochs from 0
        total = self.ce_weight * ce + ramp * self.distill_weight * reviewkd
        return total, {"ce": ce, "reviewkd": reviewkd}
