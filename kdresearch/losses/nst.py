"""Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", 2017), with the polynomial kernel, as the CIFAR benchmark suites compute it
(RepDistiller `distiller_zoo/NST.py`, mdistiller `distillers/NST.py`; torchdistill has no NST).

Each channel's map is one sample of that model's "neuron selectivity" distribution; NST matches the
student's distribution to the teacher's with the squared maximum mean discrepancy (MMD). For one
stage pair, each channel's map flattened over positions and L2-normalised (f^s_i: student channel
i, f^t_j: teacher channel j, of one sample; C_s, C_t channels), with k(a, b) = <a, b>^2 (the
paper's polynomial kernel, d = 2, c = 0):

    MMD^2 = mean_{i,i'} k(f^t_i, f^t_i') + mean_{j,j'} k(f^s_j, f^s_j') - 2 mean_{i,j} k(f^s_i, f^t_j)

each mean also over the batch, and the distillation term sums over the stage pairs

    nst   = sum_j MMD^2(stage j of the student, stage j of the teacher)
    total = ce_weight * CE(student logits, labels) + distill_weight * nst

The teacher-teacher mean carries no gradient; it is kept (the suites' full_loss) so that the term
is the MMD itself, >= 0 and 0 for equal distributions. Channel counts may differ (only maps are
compared with maps). Stages are paired as in attention transfer (`kdresearch.losses.at`): every
stage, zipped from the first, and the larger map of a pair average-pooled to the smaller size
first. Defaults are the suites' CIFAR-100 ones: weight 50, CE weight 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from kdresearch.losses.at import pool_to_common_size
from kdresearch.losses.base import WeightedDistillation, pair_error
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import stage_field


def polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over the batch and all channel pairs of <a_i, b_j>^2; a (N, C_a, P), b (N, C_b, P)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def selectivity_mmd(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the polynomial kernel between the two maps' L2-normalised channel maps."""
    student_map, teacher_map = pool_to_common_size(student_map, teacher_map)
    f_s = F.normalize(student_map.flatten(2), p=2.0, dim=2)
    f_t = F.normalize(teacher_map.flatten(2), p=2.0, dim=2)
    return (polynomial_kernel_mean(f_t, f_t).detach() + polynomial_kernel_mean(f_s, f_s)
            - 2 * polynomial_kernel_mean(f_s, f_t))


@computed_in_float32
def neuron_selectivity_transfer(student_stages: Sequence[torch.Tensor],
                                teacher_stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over zipped stage pairs of selectivity_mmd."""
    return torch.stack([selectivity_mmd(f_s, f_t) for f_s, f_t in zip(student_stages, teacher_stages)]).sum()


class NeuronSelectivityTransfer(WeightedDistillation):
    """ce_weight * CE + distill_weight * neuron_selectivity_transfer(student stages, teacher stages).

    `bind` fixes how many stages are paired (the smaller of the two stage counts, from the first)
    and asks the teacher for exactly those. Owns no parameters.
    """

    student_features = True
    part_name = "nst"

    def __init__(self, ce_weight: float = 1.0, distill_weight: float = 50.0):
        super().__init__(ce_weight, distill_weight)
        self.pairs = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.pairs = min(len(student.stage_channels), len(teacher.stage_channels))
        if self.pairs == 0:
            raise pair_error("nst", "neuron selectivity transfer needs at least one stage in each model",
                             student, teacher)
        self.teacher_fields = tuple(stage_field(i) for i in range(self.pairs))

    def distillation_term(self, student, teacher, progress=None):
        return neuron_selectivity_transfer(student.stages[:self.pairs], teacher.stages[:self.pairs])
