"""Soft-target knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network", 2015), as the PyTorch KD tutorial computes it."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, number


def soft_target_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 / N * sum_n sum_c softmax(t_n/T)_c * (log softmax(t_n/T)_c - log softmax(s_n/T)_c).

    The teacher's log-probabilities come from log_softmax rather than softmax().log(): the same
    value, but it stays finite when a probability underflows to 0 at low T.
    """
    teacher_log_probs = F.log_softmax(teacher_logits / T, dim=-1)
    student_log_probs = F.log_softmax(student_logits / T, dim=-1)
    kl = torch.sum(teacher_log_probs.exp() * (teacher_log_probs - student_log_probs))
    return kl / student_logits.size(0) * T**2


class SoftTargetKD(WeightedDistillation):
    """ce_weight * CE + distill_weight * soft_target_kd(student, teacher, T).

    Defaults are the tutorial's (T 2, CE 0.75, KD 0.25); the CIFAR-100 benchmark recipe uses T 4,
    CE 0.1, KD 0.9.
    """

    teacher_fields = ("logits",)
    part_name = "kd"

    def __init__(self, T: float = 2.0, ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__(ce_weight, distill_weight)
        self.T = number("T", T, positive=True)

    def distillation_term(self, student, teacher, progress=None):
        return soft_target_kd(student.logits, teacher.logits, self.T)
