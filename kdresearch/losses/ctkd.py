"""Curriculum temperature knowledge distillation (Li, Li, Yang, Cheng, Yang & Zhang, "Curriculum
Temperature for Knowledge Distillation", AAAI 2023), its global-temperature form as the authors'
code computes it (zhengli97/CTKD: `models/temp_global.py` Global_T, `helper/loops.py`
train_distill, `train_student.py` CosineDecay).

The KD temperature is learned: a parameter theta (initialised to 1) gives

    T = T_min + T_range * sigmoid(theta)                      (the authors' t_start 1, t_end 20)

and the loss is soft-target KD at that T (`kd.soft_target_kd`, T^2 / N * sum KL):

    total = ce_weight * CE(student, labels) + distill_weight * soft_target_kd(student, teacher, T)

theta is trained with the student's optimizer, but through a gradient reversal: its gradient is
multiplied by -strength(epoch), so the temperature moves to make distillation harder (the
adversarial step) while the student learns to make it easier. The strength follows a cosine
curriculum over the 1-based epoch e, from `reversal_from` to `reversal_to` over `reversal_epochs`:

    strength(e) = from + (to - from) * (1 - cos(pi * min(e, L) / L)) / 2

(the authors' CosineDecay with decay_max 0, decay_min -1, decay_loops 10 is this with 0 -> 1 over
L = 10; their gradient reversal multiplies by that λ = -strength.) The strength changes once per
epoch, as there. theta is in the loss's state_dict, so in checkpoints.

Defaults are the authors' CIFAR-100 script (`scripts/run_cifar_distill.sh`: `-r 0.1 -a 0.9`,
t_start 1, t_end 20, cosine decay 0 -> -1 over 10 epochs; batch 64, lr 0.05).
`standardize=True` z-scores the logits first (Sun et al., CVPR 2024; see `kd.standardize_logits`);
the CE term sees the raw logits. Logged parts: "ce", "ctkd" (the KD term at the learned T) and
"temperature" (the learned T).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import MAX_TEMPERATURE, Progress, WeightedDistillation, number
from kdresearch.losses.kd import flag, soft_target_kd, standardize_logits


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (negative: reversed)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """x in the forward pass; its gradient times -strength in the backward pass."""
    return _ScaledGradient.apply(x, -strength)


def reversal_strength(epoch: int, start: float, end: float, epochs: float) -> float:
    """The cosine curriculum from `start` (epoch 0) to `end` (from epoch `epochs` on)."""
    done = min(max(epoch, 0), epochs) / epochs
    return start + (end - start) * (1 - math.cos(math.pi * done)) / 2


class CTKD(WeightedDistillation):
    """ce_weight * CE + distill_weight * soft_target_kd at a learned temperature (module docstring)."""

    teacher_fields = ("logits",)
    part_name = "ctkd"

    def __init__(self, T_min: float = 1.0, T_range: float = 20.0, reversal_from: float = 0.0,
                 reversal_to: float = 1.0, reversal_epochs: int = 10, ce_weight: float = 0.1,
                 distill_weight: float = 0.9, standardize: bool = False):
        super().__init__(ce_weight, distill_weight)
        self.T_min = number("loss.T_min", T_min, positive=True)
        self.T_range = number("loss.T_range", T_range)
        if self.T_min + self.T_range > MAX_TEMPERATURE:
            raise KDResearchError(f"loss.T_min + loss.T_range must be at most {MAX_TEMPERATURE} (the largest "
                                  f"temperature), got {self.T_min:g} + {self.T_range:g}")
        self.reversal_from = number("loss.reversal_from", reversal_from)
        self.reversal_to = number("loss.reversal_to", reversal_to)
        self.reversal_epochs = validators.integer("loss.reversal_epochs", reversal_epochs, at_least=1)
        self.standardize = flag("loss.standardize", standardize)
        self.temperature_logit = nn.Parameter(torch.ones(1))  # theta, the authors' Global_T initial value

    def temperature(self, epoch: int) -> torch.Tensor:
        """T (a 0-d tensor) for this epoch's reversal strength: its gradient reaches theta reversed."""
        strength = reversal_strength(epoch, self.reversal_from, self.reversal_to, self.reversal_epochs)
        theta = reverse_gradient(self.temperature_logit, strength)[0]
        return self.T_min + self.T_range * torch.sigmoid(theta)

    def forward(self, student, teacher, labels, progress: Optional[Progress] = None):
        if progress is None:
            raise KDResearchError("loss=ctkd needs the training progress (its curriculum reads the epoch): "
                                  "call it as loss(student, teacher, labels, progress)")
        ce = nn.functional.cross_entropy(student.logits, labels)
        student_logits, teacher_logits = student.logits.float(), teacher.logits.float()
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        T = self.temperature(progress.epoch)
        term = soft_target_kd(student_logits, teacher_logits, T)
        total = self.ce_weight * ce + self.distill_weight * term
        return total, {"ce": ce, "ctkd": term, "temperature": T.detach()}
