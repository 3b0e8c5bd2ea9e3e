"""Normalized knowledge distillation, NKD (Yang, Zeng, Yuan & Li, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels",
ICCV 2023), as the authors' code computes it (yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py`).

NKD splits KD's cross-entropy with the teacher into the target class and the non-target classes,
and normalises the non-target part so that its size no longer shrinks with the teacher's target
confidence (in KD it is scaled by 1 - p^t_y). With y the label, p = softmax(z) at temperature 1,
and p_hat = softmax over the classes c != y of z / T (the target column removed):

    target      = -1/N * sum_n p^t_ny * log p^s_ny                          (no temperature)
    non_target  = -T^2 / N * sum_n sum_{c != y} p_hat^t_nc * log p_hat^s_nc
    total       = ce_weight * CE(z_s, y) + target + gamma * non_target

Both distillation terms are cross-entropies with the teacher, as in the authors' code, not KLs:
their value includes the teacher's (constant) entropy, their gradients are the KL's. The target
term carries no weight of its own; gamma weighs the non-target term (the authors' `gamma`, the
paper's gamma), T is the authors' `temp` (the paper's lambda).

Defaults are the authors' CIFAR-100 setting (cls_KD `configs/distillers/cifar100/
res34_distill_res18_cifar.py`: temp 3.0, gamma 3.5, the student's CE with weight 1 beside it);
their ImageNet ResNet setting is T 1, gamma 1.5 (the class defaults there).

`standardize=True` z-scores both models' logits first (Sun et al., CVPR 2024; see
`kd.standardize_logits`), over all classes, before the target column is split off; the CE term
sees the raw logits. The authors publish no NKD recipe with it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import TrainingLoss, number, temperature
from kdresearch.losses.dkd import MASKED_LOGIT
from kdresearch.losses.kd import flag, standardize_logits


def nkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, non_target): the two cross-entropies with the teacher of the module docstring,
    the second already multiplied by T^2."""
    student, teacher = student_logits.float(), teacher_logits.float()
    target = F.one_hot(labels, student.size(1)).bool()

    student_log_probs = F.log_softmax(student, dim=1)
    teacher_probs = F.softmax(teacher, dim=1)
    target_term = -(teacher_probs[target] * student_log_probs[target]).mean()

    # Among the non-target classes only: the target logit pushed to MASKED_LOGIT (see dkd.py), so
    # the teacher's probability there is exactly 0 and contributes nothing.
    student_other = F.log_softmax(student.masked_fill(target, MASKED_LOGIT) / T, dim=1)
    teacher_other = F.softmax(teacher.masked_fill(target, MASKED_LOGIT) / T, dim=1)
    non_target = -T**2 * (teacher_other * student_other).sum(dim=1).mean()
    return target_term, non_target


class NKD(TrainingLoss):
    """ce_weight * CE + target + gamma * non_target; module docstring.

    Logged parts: "ce", "nkd_target", "nkd_non_target" (unweighted, the second T^2-scaled) and
    "nkd" (target + gamma * non_target, what enters the total).
    """

    needs_teacher = True
    teacher_fields = ("logits",)

    def __init__(self, T: float = 3.0, gamma: float = 3.5, ce_weight: float = 1.0, standardize: bool = False):
        super().__init__()
        self.T = temperature("loss.T", T)
        self.gamma = number("loss.gamma", gamma)
        self.ce_weight = number("loss.ce_weight", ce_weight)
        self.standardize = flag("loss.standardize", standardize)

    def loss_name(self) -> str:
        return "nkd"

    def forward(self, student, teacher, labels, progress=None):
        ce = F.cross_entropy(student.logits, labels)
        student_logits, teacher_logits = student.logits, teacher.logits
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        target, non_target = nkd_terms(student_logits, teacher_logits, labels, self.T)
        nkd = target + self.gamma * non_target
        total = self.ce_weight * ce + nkd
        return total, {"ce": ce, "nkd_target": target, "nkd_non_target": non_target, "nkd": nkd}
