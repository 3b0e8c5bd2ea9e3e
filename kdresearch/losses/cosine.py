"""The PyTorch KD tutorial's cosine loss on the flattened last feature maps (`hidden`)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, pair_error


def cosine_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """mean_n (1 - cos(student_hidden_n, avg_pool1d(teacher_hidden_n, k))), k = teacher dim / student dim:
    CosineEmbeddingLoss with target +1 after the tutorial's pooling (2048 / 1024 = 2)."""
    pool = teacher_hidden.size(1) // student_hidden.size(1)
    if pool > 1:
        teacher_hidden = F.avg_pool1d(teacher_hidden, pool)
    similarity = F.cosine_similarity(student_hidden, teacher_hidden, dim=1, eps=1e-8)
    return (1 - similarity).mean()


class CosineHidden(WeightedDistillation):
    """ce_weight * CE + distill_weight * cosine_hidden(student hidden, teacher hidden).

    Works for any pair whose teacher hidden size is a multiple of the student's.
    """

    teacher_fields = ("hidden",)
    student_features = True
    part_name = "cosine"

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        s_dim, t_dim = student.hidden_dim, teacher.hidden_dim
        if t_dim % s_dim != 0:
            raise pair_error("cosine", f"the teacher's hidden size ({t_dim}) must be a multiple of the "
                             f"student's ({s_dim})", student, teacher)

    def distillation_term(self, student, teacher, progress=None):
        return cosine_hidden(student.hidden, teacher.hidden)
