"""Weighted transformed teacher matching, WTTM (Zheng & Yang, "Knowledge Distillation Based on
Transformed Teacher Matching", ICLR 2024), as the authors' code computes it (zkxufo/TTM
`distiller_zoo/wttm.py`).

TTM drops the temperature on the student's side: the student's plain softmax is matched to a
power transform of the teacher's probabilities. With p = softmax(z) at temperature 1 and the
power gamma = 1 / T:

    p_gamma     = p^t ** gamma / U,   U = sum_c (p^t_c) ** gamma     (= softmax(z_t / T))
    TTM         = 1/N * sum_n KL(p_gamma_n || p^s_n)
    WTTM        = 1/N * sum_n U_n * KL(p_gamma_n || p^s_n)
    total       = ce_weight * CE(z_s, y) + distill_weight * WTTM

U (the power sum, between 1 for a one-hot teacher and C^(1 - gamma) for a uniform one) is the
sample-adaptive weight: samples on which the teacher is less confident weigh more. It is computed
from log-probabilities here (log U = logsumexp(gamma * log p^t)), the same value as the authors'
`pow(softmax(z_t), l).sum()` but finite where a probability underflows. There is no T^2 factor
(the authors' code has none; their weights absorb it).

The key is `T`, as the paper reports it (its appendix A.4 lists T and the weight per pair); the
authors' code takes gamma = 1 / T as `--ttm_l`. Defaults: T 5 (gamma 0.2) and weight 4, the
WTTM setting of the authors' README (`--ttm_l 0.2 -a 4`, where WTTM is added beside CRD), CE
weight 1 (their `-r` default). Per-pair values from the paper override them: `loss.T=...
loss.distill_weight=...`.

`standardize=True` z-scores both models' logits first (Sun et al., CVPR 2024; see
`kd.standardize_logits`): the teacher's transform becomes softmax(z-scored z_t / T), and the
student's z-scored logits enter its softmax at temperature 1, the side TTM leaves unscaled. The CE
term sees the raw logits. The authors publish no WTTM recipe with it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, temperature
from kdresearch.losses.kd import flag, standardize_logits


def wttm_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """1/N * sum_n U_n * KL(p^t_n ** (1/T) / U_n || softmax(z_s)_n), U_n = sum_c (p^t_nc) ** (1/T)."""
    powered = F.log_softmax(teacher_logits.float(), dim=1) / T  # log of p^t ** gamma
    log_power_sum = torch.logsumexp(powered, dim=1, keepdim=True)  # log U
    transformed = powered - log_power_sum  # log of the transformed teacher, normalised
    student_log_probs = F.log_softmax(student_logits.float(), dim=1)
    kl = (transformed.exp() * (transformed - student_log_probs)).sum(dim=1)
    return (log_power_sum.squeeze(1).exp() * kl).mean()


class WTTM(WeightedDistillation):
    """ce_weight * CE + distill_weight * wttm_term(student, teacher, T); module docstring."""

    teacher_fields = ("logits",)
    part_name = "wttm"

    def __init__(self, T: float = 5.0, ce_weight: float = 1.0, distill_weight: float = 4.0,
                 standardize: bool = False):
        super().__init__(ce_weight, distill_weight)
        self.T = temperature("loss.T", T)
        self.standardize = flag("loss.standardize", standardize)

    def distillation_term(self, student, teacher, progress=None):
        student_logits, teacher_logits = student.logits, teacher.logits
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        return wttm_term(student_logits, teacher_logits, self.T)
