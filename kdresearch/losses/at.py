"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017), as the CIFAR
benchmark suites (RepDistiller `distiller_zoo/AT.py`, mdistiller `distillers/AT.py`) compute it.

For a feature map F of shape (N, C, H, W) the attention map of each sample is

    a(F) = Q / ||Q||_2,   Q = flatten_{h,w}( mean_c |F_c|^p )   (a vector of H*W entries)

and the distillation term sums over the stage pairs (j) the student and teacher share

    attention_transfer = sum_j mean_{n, positions} (a(F_s^j) - a(F_t^j))^2

    total = ce_weight * CE(student logits, labels) + distill_weight * attention_transfer

Defaults are the suites': p = 2, weight 1000, CE weight 1. The paper writes the per-stage term as
beta/2 * || a_s - a_t ||_p; the authors' code and both suites use the mean of squares with weight
1000, which their published CIFAR numbers come from, so that is what is implemented here.

Stages: the suites take every stage after the stem (RepDistiller `feat[1:-1]`, mdistiller
`feats[1:]`), which is exactly our `stages` tuple, and pair them with `zip`: stage j of the student
with stage j of the teacher, from the first, dropping the deeper stages of the longer list when the
counts differ. That is followed here (rather than pairing from the last stage backwards) so that
results stay comparable with the suites' tables; for the same-family benchmark pairs the counts
agree anyway. When a pair's maps differ in spatial size, the larger feature map is average-pooled
(adaptive_avg_pool2d) to the smaller size before its attention map is taken, as both suites do.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, number, pair_error
from kdresearch.models import stage_field


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): mean over channels of |F|^p, flattened, L2-normalised per sample.

    Computed in float32: under fp16 autocast |F|^2 of an activation above ~256 would overflow.
    |F| rather than the suites' F.pow(p): the paper's definition; the same on post-ReLU features
    (and for any even p). F.normalize's eps keeps an all-zero map (a dead stage) at 0, not NaN.
    """
    q = f.float().abs().pow(p).mean(dim=1)
    return F.normalize(q.flatten(1), p=2.0, dim=1)


def pool_to_common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever map is larger (per spatial dimension) to the smaller size."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def attention_transfer(student_stages: Sequence[torch.Tensor], teacher_stages: Sequence[torch.Tensor],
                       p: float = 2.0) -> torch.Tensor:
    """sum over zipped stage pairs of mean((a(F_s) - a(F_t))^2), the larger map pooled first."""
    terms = []
    for f_s, f_t in zip(student_stages, teacher_stages):
        f_s, f_t = pool_to_common_size(f_s, f_t)
        terms.append((attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean())
    return torch.stack(terms).sum()


class AttentionTransfer(WeightedDistillation):
    """ce_weight * CE + distill_weight * attention_transfer(student stages, teacher stages, p).

    `bind` fixes how many stages are paired (the smaller of the two models' stage counts, from
    the first stage) and asks the teacher for exactly those stages. Owns no parameters.
    """

    student_features = True
    part_name = "at"

    def __init__(self, p: float = 2.0, ce_weight: float = 1.0, distill_weight: float = 1000.0):
        super().__init__(ce_weight, distill_weight)
        self.p = number("loss.p", p, positive=True)
        self.pairs = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.pairs = min(len(student.stage_channels), len(teacher.stage_channels))
        if self.pairs == 0:
            raise pair_error("at", "attention transfer needs at least one stage in each model", student, teacher)
        self.teacher_fields = tuple(stage_field(i) for i in range(self.pairs))

    def distillation_term(self, student, teacher, progress=None):
        return attention_transfer(student.stages[:self.pairs], teacher.stages[:self.pairs], self.p)
