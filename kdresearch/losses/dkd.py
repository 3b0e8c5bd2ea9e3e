"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
Distillation", CVPR 2022), as the authors' mdistiller (`mdistiller/distillers/DKD.py`) computes it.

DKD splits the KD loss of each sample into a target-class part and a non-target part and weighs
them independently. With p = softmax(z / T) for the student (s) and teacher (t), y the label:

    b       = (p_y, 1 - p_y)                           binary target / non-target distribution
    p_hat   = softmax over the classes c != y of z / T  distribution among the non-target classes
    TCKD    = T^2 / N * sum_n KL(b^t_n || b^s_n)
    NCKD    = T^2 / N * sum_n KL(p_hat^t_n || p_hat^s_n)
    total   = ce_weight * CE(z_s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

Both terms carry the T^2 factor and are summed over the batch then divided by N (mdistiller:
`F.kl_div(..., size_average=False) * T**2 / batch`). Per sample, KL(p^t || p^s) =
KL(b^t || b^s) + (1 - p^t_y) * KL(p_hat^t || p_hat^s): classic KD is DKD with alpha = 1 and beta
tied to the teacher's non-target mass, which the paper argues suppresses NCKD on confident samples.

The warm-up factor uses the 1-based epoch (mdistiller's trainer counts epochs from 1, so the
first epoch already gets 1/warmup); `warmup: 0` means no warm-up. It changes once per epoch, not per
step, as in mdistiller.

Defaults are mdistiller's CIFAR-100 DKD defaults (`mdistiller/engine/cfg.py`: CE_WEIGHT 1.0,
ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20), which `configs/cifar100/dkd/res32x4_res8x4.yaml` uses as
they are; other pairs override beta (resnet56/resnet20 2.0; vgg13/vgg8 and wrn_40_2/wrn_16_2 6.0).

`standardize=True` z-scores the logits first (Sun et al., CVPR 2024; see `kd.standardize_logits`);
the CE term sees the raw logits. Their recipe for DKD (`tools/train.py` of
logit-standardization-KD) multiplies alpha (and beta) by their KD weight 9 and keeps DKD's T 4.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress, TrainingLoss, number, temperature
from kdresearch.losses.kd import flag, standardize_logits

# What the target logit is replaced with before the non-target softmax. The paper's code subtracts
# 1000 from z_y / T; a fill of -1e9 does the same job at any logit scale (1000 stops being enough
# once |z| / T nears 1000, e.g. logits of 50 at T 0.05), and stays finite, so the teacher's
# probability there is exactly 0 and its KL contribution 0 * (finite) = 0 with finite gradients.
# Finite in float32 and bfloat16 alike; the terms are computed in float32 anyway.
MASKED_LOGIT = -1e9


def _kl_sum(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """sum over every entry of p_t * (log p_t - log p_s), with p_t = exp(log p_t)."""
    return torch.sum(teacher_log_probs.exp() * (teacher_log_probs - student_log_probs))


def _binary_log_probs(scaled_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 2): log p_y and log(1 - p_y) of softmax(scaled_logits), from logsumexps, so they stay
    finite when a probability underflows (mdistiller takes log of summed probabilities instead)."""
    log_norm = torch.logsumexp(scaled_logits, dim=1)
    log_target = scaled_logits.masked_fill(~target, float("-inf")).logsumexp(dim=1)
    log_other = scaled_logits.masked_fill(target, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target - log_norm, log_other - log_norm], dim=1)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2 / N * sum over the batch of its KL(teacher || student)."""
    n = student_logits.size(0)
    student = student_logits.float() / T
    teacher = teacher_logits.float() / T
    target = F.one_hot(labels, student.size(1)).bool()

    tckd = _kl_sum(_binary_log_probs(teacher, target), _binary_log_probs(student, target))

    # Among the non-target classes only: the target logit pushed to MASKED_LOGIT before the softmax.
    teacher_other = F.log_softmax(teacher.masked_fill(target, MASKED_LOGIT), dim=1)
    student_other = F.log_softmax(student.masked_fill(target, MASKED_LOGIT), dim=1)
    nckd = _kl_sum(teacher_other, student_other)

    scale = T**2 / n
    return tckd * scale, nckd * scale


def warmup_factor(epoch: int, warmup: float) -> float:
    """min(epoch / warmup, 1) for the 1-based epoch; 1 when warmup is 0 (no warm-up)."""
    return 1.0 if warmup == 0 else min(epoch / warmup, 1.0)


class DKD(TrainingLoss):
    """ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD); module docstring.

    Logged parts: "ce", "tckd", "nckd" (unweighted, T^2-scaled) and "dkd" (the warmed-up weighted
    sum that enters the total). Needs `progress` (the epoch) for the warm-up.
    """

    needs_teacher = True
    teacher_fields = ("logits",)

    def __init__(self, T: float = 4.0, alpha: float = 1.0, beta: float = 8.0, warmup: float = 20,
                 ce_weight: float = 1.0, standardize: bool = False):
        super().__init__()
        self.T = temperature("loss.T", T)
        self.alpha = number("loss.alpha", alpha)
        self.beta = number("loss.beta", beta)
        self.warmup = number("loss.warmup", warmup)
        self.ce_weight = number("loss.ce_weight", ce_weight)
        self.standardize = flag("loss.standardize", standardize)

    def loss_name(self) -> str:
        return "dkd"

    def forward(self, student, teacher, labels, progress: Optional[Progress] = None):
        if progress is None:
            raise KDResearchError("loss=dkd needs the training progress (its warm-up reads the epoch): "
                                  "call it as loss(student, teacher, labels, progress)")
        ce = F.cross_entropy(student.logits, labels)
        student_logits, teacher_logits = student.logits, teacher.logits
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, self.T)
        dkd = warmup_factor(progress.epoch, self.warmup) * (self.alpha * tckd + self.beta * nckd)
        total = self.ce_weight * ce + dkd
        return total, {"ce": ce, "tckd": tckd, "nckd": nckd, "dkd": dkd}
