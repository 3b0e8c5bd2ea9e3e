"""Correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for
Knowledge Distillation", ICCV 2019), as RepDistiller computes it on CIFAR-100
(`distiller_zoo/CC.py` Correlation, the code the paper's authors shared with RepDistiller's author,
with the `models/util.py` LinearEmbed heads of `train_student.py`; mdistiller has no CC).

Both models' embeddings pass through a linear head each (to feat_dim, 128), h_s and h_t, and with
delta_n = |h_s,n - h_t,n| (elementwise), consecutive samples of the batch are correlated:

    cc    = 1 / (N - 1) * sum_{n=1}^{N-1} < delta_n, delta_{n+1} >
    total = ce_weight * CE(student logits, labels) + distill_weight * cc

Both heads are trained with the student (RepDistiller puts both in its trainable list). Defaults
are RepDistiller's CIFAR-100 ones: weight 0.02 (`-b 0.02`), CE weight 1, feat_dim 128.

This is not the paper's formula, nor torchdistill's CCKDLoss, which compare the two models'
N x N sample-correlation matrices built with a Taylor-expanded Gaussian kernel
(|| C(h_s) - C(h_t) ||_2 / N^2). The authors' shared code, above, is what the suites' CIFAR-100
tables were produced with, so that is what is implemented here.

A batch of one sample has no consecutive pair: its term would be the mean of nothing (NaN in
RepDistiller's code, which a partial last batch of one sample would hit); here it is 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdresearch.config import validators
from kdresearch.losses.base import WeightedDistillation
from kdresearch.losses.relations import computed_in_float32


@computed_in_float32
def correlation_congruence(student_head: torch.Tensor, teacher_head: torch.Tensor) -> torch.Tensor:
    """mean over consecutive samples n, n+1 of <|h_s,n - h_t,n|, |h_s,n+1 - h_t,n+1|>."""
    delta = (student_head - teacher_head).abs()
    if delta.size(0) < 2:  # no consecutive pair
        return delta.new_zeros(())
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CorrelationCongruence(WeightedDistillation):
    """ce_weight * CE + distill_weight * correlation_congruence(head_s(student emb.), head_t(teacher emb.)).

    `bind` creates the two linear heads from the models' embedding sizes (student's first, then the
    teacher's, as RepDistiller); they are the loss's parameters, trained with the student.
    """

    student_features = True
    teacher_fields = ("embedding",)
    part_name = "cc"

    def __init__(self, feat_dim: int = 128, ce_weight: float = 1.0, distill_weight: float = 0.02):
        super().__init__(ce_weight, distill_weight)
        self.feat_dim = validators.integer("loss.feat_dim", feat_dim, at_least=1)
        self.head_student: Optional[nn.Linear] = None
        self.head_teacher: Optional[nn.Linear] = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.head_student = nn.Linear(student.embedding_dim, self.feat_dim)
        self.head_teacher = nn.Linear(teacher.embedding_dim, self.feat_dim)

    def distillation_term(self, student, teacher, progress=None):
        return correlation_congruence(self.head_student(student.embedding.flatten(1)),
                                      self.head_teacher(teacher.embedding.flatten(1)))
