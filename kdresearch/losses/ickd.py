"""Inter-channel correlation (Liu, Huang, Lin, Xie, Wang, Chang & Liang, "Exploring Inter-Channel
Correlation for Diversity-Preserved Knowledge Distillation", ICCV 2021), as the authors' CIFAR-100
code computes it (ADLab-AutoDrive/ICKD `Cifar100/distiller_zoo/ICKD.py`; torchdistill's ChSimLoss
is their ImageNet version, which divides by one more N, see below).

The student learns how the teacher's channels of one stage correlate with each other. The
student's map first goes through an embedding (1x1 conv without bias, then BatchNorm) to the
teacher's channel count C; with the maps flattened over positions, Q (N, C, H*W):

    G(F)  = row_normalise(Q Q^T)                     (N, C, C), each row L2-normalised
    ickd  = 1 / (C * N) * || G(embed(F_s)) - G(F_t) ||_F^2
    total = ce_weight * CE + kd_weight * soft_target_kd(student, teacher, T) + distill_weight * ickd

Only channel-by-channel matrices are compared, so the two maps may differ in size: any pair of
models can be served at the default stage (a `stage` one model lacks is refused). Defaults are the
authors' CIFAR-100 ones: the last stage (their `feat[-2]`), weight 2.5 and no KD term
(`-b 2.5 -a 0`, their README's ICKD row), CE weight 1; their "ICKD+KL" row is `loss.kd_weight=1`
(KD temperature 4, `--kd_T 4`).

torchdistill's ChSimLoss, like the authors' ImageNet code it comes from, divides by C * N^2: its
value is this one divided by the batch size. The CIFAR weight 2.5 is tuned to the CIFAR code's
C * N. The authors' loss also creates a second embedding for the teacher that its forward never
uses (it stays at its initial weights); it is not created here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from kdresearch.config import validators
from kdresearch.losses.base import WeightedDistillation, number, temperature
from kdresearch.losses.kd import soft_target_kd
from kdresearch.losses.relations import computed_in_float32, normalised_gram, paired_stage
from kdresearch.models import stage_field


class ChannelEmbedding(nn.Sequential):
    """The authors' Embed: 1x1 conv (no bias) from the student's channels to the teacher's, then
    BatchNorm, with no activation after it (as theirs)."""

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__(OrderedDict(conv=nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False),
                                     bn=nn.BatchNorm2d(t_channels)))


@computed_in_float32
def inter_channel_correlation(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """1 / (C N) * ||G(F_s) - G(F_t)||_F^2, G the row-normalised C x C Gram matrix of each sample's
    flattened channels; `student_map` already embedded to the teacher's C channels."""
    n, channels = teacher_map.shape[:2]
    difference = normalised_gram(student_map.flatten(2)) - normalised_gram(teacher_map.flatten(2))
    return difference.pow(2).sum() / (channels * n)


class InterChannelCorrelation(WeightedDistillation):
    """ce_weight * CE + distill_weight * inter_channel_correlation(embed(student stage), teacher stage)
    (+ kd_weight * soft_target_kd when kd_weight > 0).

    `stage` indexes the models' `stages` (default -1, the last; negative counts from the last stage,
    resolved separately for each model). `bind` creates the embedding from the pair; it trains with
    the student, and its BatchNorm statistics are buffers, in `state_dict()` and checkpoints.
    Logged parts: "ce", "ickd", and "kd" when kd_weight > 0.
    """

    student_features = True
    part_name = "ickd"

    def __init__(self, stage: int = -1, ce_weight: float = 1.0, distill_weight: float = 2.5,
                 kd_weight: float = 0.0, T: float = 4.0):
        super().__init__(ce_weight, distill_weight)
        self.stage = validators.integer("loss.stage", stage, note="a stage index")
        self.kd_weight = number("loss.kd_weight", kd_weight)
        self.T = temperature("loss.T", T)
        self.student_stage = self.teacher_stage = None
        self.embedding: Optional[ChannelEmbedding] = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        self.student_stage, self.teacher_stage = paired_stage("ickd", self.stage, student, teacher)
        # The teacher's logits are read (and cached) only when the KD term is on; set before the
        # base check, which compares the class counts when logits are read.
        logits = ("logits",) if self.kd_weight > 0 else ()
        self.teacher_fields = (stage_field(self.teacher_stage), *logits)
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.embedding = ChannelEmbedding(student.stage_channels[self.student_stage],
                                          teacher.stage_channels[self.teacher_stage])

    def forward(self, student, teacher, labels, progress=None):
        total, parts = super().forward(student, teacher, labels, progress)
        if self.kd_weight > 0:
            kd = soft_target_kd(student.logits, teacher.logits, self.T)
            total = total + self.kd_weight * kd
            parts["kd"] = kd
        return total, parts

    def distillation_term(self, student, teacher, progress=None):
        return inter_channel_correlation(self.embedding(student.stages[self.student_stage]),
                                         teacher.stages[self.teacher_stage])
