"""Losses on the labels alone: cross-entropy (teachers and the student-CE baseline) and
`torch.nn.MultiMarginLoss` (the multi-class hinge loss from torch's docs)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import TrainingLoss, number


class CrossEntropy(TrainingLoss):
    """total = CE(student logits, labels): the teacher and the student-CE baseline."""

    def forward(self, student, teacher, labels, progress=None):
        ce = F.cross_entropy(student.logits, labels)
        return ce, {"ce": ce}


class MultiMargin(TrainingLoss):
    """total = torch.nn.MultiMarginLoss(p, margin, weight)(student logits, labels).

    Per sample: sum over i != y of max(0, margin - x[y] + x[i])^p * weight[y] / num_classes.
    """

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Optional[Sequence[float]] = None):
        super().__init__()
        margin = number("loss.margin", margin, positive=True)
        weight_tensor = None
        if weight is not None:
            weight_tensor = torch.tensor([number("loss.weight[i]", w) for w in weight])
        try:
            self.criterion = nn.MultiMarginLoss(p=p, margin=margin, weight=weight_tensor)
        except ValueError as error:  # torch refuses p other than 1 or 2
            raise KDResearchError(f"loss=multimargin: {error} (got loss.p={p!r})") from None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        weight = self.criterion.weight
        if weight is not None and weight.numel() != student.num_classes:
            raise KDResearchError(
                f"loss.weight has {weight.numel()} entries but the model has {student.num_classes} classes"
            )

    def forward(self, student, teacher, labels, progress=None):
        hinge = self.criterion(student.logits, labels)
        return hinge, {"multimargin": hinge}
