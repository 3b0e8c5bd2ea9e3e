"""Soft-target knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network", 2015), as the PyTorch KD tutorial computes it, with the optional logit
standardisation of Sun et al. ("Logit Standardization in Knowledge Distillation", CVPR 2024).

Logit standardisation (`standardize=True`) z-scores each sample's logits, the student's and the
teacher's separately, before they are divided by T:

    standardize(z) = (z - mean_c z) / (std_c z + 1e-7)

`std` is the sample standard deviation over the classes (divisor C - 1) and 1e-7 is added to it,
as the paper's code does (`normalize` in logit-standardization-KD's `mdistiller/distillers/KD.py`:
`logit.std(dim=-1)`, torch's unbiased default). The paper's equations write the population std
(divisor C); the two differ by a constant factor sqrt(C / (C - 1)) (1.005 for 100 classes), i.e.
by a tiny change of T. After z-scoring, the loss no longer depends on each model's logit scale or
offset, only on the pattern within a sample: the student need not match the teacher's magnitude.

Only the z-scoring is added here; the project's KD formula (T^2 / N * sum KL, weights
ce_weight / distill_weight) is unchanged. The paper's CIFAR-100 recipe (README of
sunshangquan/logit-standardization-KD: `--logit-stand --base-temp 2 --kd-weight 9`) uses a base
temperature of 2 (3 for some pairs) and a KD weight of 9, with the T^2 factor kept; with this
module that is `loss=kd loss.standardize=true T=2 kd_weights.ce=1 kd_weights.distill=9` (CE
weight 1 from that repository's `mdistiller/engine/cfg.py`; mdistiller's own KD default is 0.1).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# `flag`: the losses' name for the true/false validator (the losses with `standardize` import it from here).
from kdresearch.config.validators import switch as flag
from kdresearch.losses.base import WeightedDistillation, temperature

# The paper's code adds this to the standard deviation: a sample whose logits are all equal (std 0)
# standardises to zeros instead of 0/0.
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """(z - mean_c z) / (std_c z + 1e-7) for each row (sample), std with divisor C - 1.

    Computed in float32: under bf16 autocast the logits arrive in bf16, whose 8-bit mantissa
    would make the mean/std (and the KL that follows) noticeably coarse.
    """
    logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased (C - 1), as the paper's code
    return (logits - mean) / (std + STANDARDIZE_EPS)


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
    CE 0.1, KD 0.9. `standardize=True` z-scores both models' logits first (module docstring); the
    CE term always sees the raw logits, as in the paper's code. T lies in (0, 100]: beyond, the
    term is its large-T limit plus rounding noise, and exactly 0 from about T = 1e8
    (kdresearch.losses.base.MAX_TEMPERATURE).
    """

    teacher_fields = ("logits",)
    part_name = "kd"

    def __init__(self, T: float = 2.0, ce_weight: float = 0.75, distill_weight: float = 0.25,
                 standardize: bool = False):
        super().__init__(ce_weight, distill_weight)
        self.T = temperature("T", T)
        self.standardize = flag("loss.standardize", standardize)

    def distillation_term(self, student, teacher, progress=None):
        student_logits, teacher_logits = student.logits, teacher.logits
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        return soft_target_kd(student_logits, teacher_logits, self.T)
