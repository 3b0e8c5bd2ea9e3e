"""Similarity-preserving knowledge distillation (Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019), as the CIFAR benchmark suites compute it (RepDistiller
`distiller_zoo/SP.py`, mdistiller `distillers/SP.py`, both verified by the paper's author).

The student learns which samples of the batch the teacher finds alike. For one stage's maps
F (N, C, H, W), flattened to Q (N, C*H*W):

    G(F) = row_normalise(Q Q^T)                                  (N, N), each row L2-normalised
    similarity_preserving = 1 / N^2 * || G(F_t) - G(F_s) ||_F^2

    total = ce_weight * CE(student logits, labels) + distill_weight * similarity_preserving

Only sample-to-sample similarities are compared, so the two maps may differ in channels and size:
any pair of models can be served at the default stage (a `stage` one model lacks is refused).
Defaults are the suites' CIFAR-100 ones: the last stage (RepDistiller `feat[-2]`, mdistiller
`feats[-1]`: both the last stage's map), weight 3000, CE weight 1. The paper sums the term over
several layer pairs; the suites' tables, which results here are compared with, use the last stage
alone.

torchdistill's SPKDLoss (reduction='batchmean') differs in one place: it calls `normalize(G, 1)`,
whose second argument is the norm's order p, so its rows are divided by their L1 norm, not the L2
norm of the paper and the suites.
"""

from __future__ import annotations

import torch

from kdresearch.config import validators
from kdresearch.losses.base import WeightedDistillation
from kdresearch.losses.relations import computed_in_float32, normalised_gram, paired_stage
from kdresearch.models import stage_field


@computed_in_float32
def similarity_preserving(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """1/N^2 * ||G(F_t) - G(F_s)||_F^2, G the row-normalised N x N Gram matrix of the flattened maps."""
    n = student_map.size(0)
    difference = normalised_gram(teacher_map.flatten(1)) - normalised_gram(student_map.flatten(1))
    return difference.pow(2).sum() / (n * n)


class SimilarityPreserving(WeightedDistillation):
    """ce_weight * CE + distill_weight * similarity_preserving(student stage, teacher stage).

    `stage` indexes the models' `stages` (default -1, the last; negative counts from the last stage,
    resolved separately for each model). Owns no parameters.
    """

    student_features = True
    part_name = "sp"

    def __init__(self, stage: int = -1, ce_weight: float = 1.0, distill_weight: float = 3000.0):
        super().__init__(ce_weight, distill_weight)
        self.stage = validators.integer("loss.stage", stage, note="a stage index")
        self.student_stage = self.teacher_stage = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.student_stage, self.teacher_stage = paired_stage("sp", self.stage, student, teacher)
        self.teacher_fields = (stage_field(self.teacher_stage),)

    def distillation_term(self, student, teacher, progress=None):
        return similarity_preserving(student.stages[self.student_stage], teacher.stages[self.teacher_stage])
