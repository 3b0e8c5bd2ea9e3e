"""Flow of solution procedure (Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
Optimization, Network Minimization and Transfer Learning", CVPR 2017), as RepDistiller trains it on
CIFAR-100 (`distiller_zoo/FSP.py`, its `helper/pretrain.py` init stage and `train_student.py`;
mdistiller has no FSP).

The FSP matrix of two consecutive feature maps of one model says how the first flows into the
second: for maps A (N, C_a, H, W) and B (N, C_b, H, W), the larger of the two first average-pooled
to the smaller size,

    G(A, B)_n,j,i = 1 / (H W) * sum_{h,w} B_n,j,h,w * A_n,i,h,w          (N, C_b, C_a)
    fsp = sum_k mean((G(S_k, S_k+1) - G(T_k, T_k+1))^2)                  over consecutive stages k

The student learns the teacher's flow in two stages, as in the paper and RepDistiller
(`kdresearch.losses.init_stage`):
- epochs 1 .. init_epochs: the loss is `fsp` alone; the classifier gets no gradient (it is not in
  the term) and stays as initialised, as RepDistiller's init stage trains only the feature layers;
- later epochs: ce_weight * CE + distill_weight * fsp. RepDistiller's second stage is CE alone
  (its FSP term there is 0, whatever `-b` says), hence distill_weight 0 by default.

Defaults are RepDistiller's: init_epochs 30 (its `--init_epochs`), CE weight 1, distill_weight 0.
Its 240 epochs come after the init stage, so its recipe here is `epochs=270` with the learning-rate
milestones shifted by 30 (180, 210, 240); its init stage has an optimizer of its own, while here one
optimizer (and its momentum) carries on from the first stage into the second. `init_epochs=0` with
distill_weight > 0 trains FSP together with CE from the start instead.

Matrices are formed between consecutive entries of our `stages`; RepDistiller's feature list also
starts with the stem's output, so it has one more matrix (stem -> first stage) than is formed here.
FSP compares channel by channel, so the two models need the same number of stages and the same
channels at each; other pairs are refused. torchdistill's FSPLoss (its ImageNet recipe) differs:
it max-pools and sums the L2 norms of the matrices' differences over one axis, divided by N.

Logged parts: "ce" and "fsp", unweighted, in both stages.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kdresearch.losses.at import pool_to_common_size
from kdresearch.losses.base import pair_error
from kdresearch.losses.init_stage import InitStageDistillation
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import stage_field


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N, C_second, C_first): the mean over positions of second_j * first_i, after pooling the
    larger map to the smaller size."""
    first, second = pool_to_common_size(first, second)
    positions = first.shape[2] * first.shape[3]
    return second.flatten(2) @ first.flatten(2).transpose(1, 2) / positions


@computed_in_float32
def flow_of_solution_procedure(student_stages: Sequence[torch.Tensor],
                               teacher_stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over consecutive stage pairs k of mean((G(S_k, S_k+1) - G(T_k, T_k+1))^2)."""
    terms = [(fsp_matrix(student_stages[k], student_stages[k + 1])
              - fsp_matrix(teacher_stages[k], teacher_stages[k + 1])).pow(2).mean()
             for k in range(len(student_stages) - 1)]
    return torch.stack(terms).sum()


class FlowOfSolutionProcedure(InitStageDistillation):
    """FSP alone for the first `init_epochs` epochs, then ce_weight * CE + distill_weight * FSP;
    module docstring. Owns no parameters."""

    student_features = True
    part_name = "fsp"

    def __init__(self, init_epochs: int = 30, ce_weight: float = 1.0, distill_weight: float = 0.0):
        super().__init__(init_epochs, ce_weight, distill_weight)

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        s_channels, t_channels = tuple(student.stage_channels), tuple(teacher.stage_channels)
        if len(s_channels) < 2:
            raise pair_error("fsp", "FSP matrices need at least two stages", student, teacher)
        if s_channels != t_channels:
            raise pair_error("fsp", f"FSP compares the matrices channel by channel, so both models need the "
                             f"same stage channels ({s_channels} vs {t_channels})", student, teacher)
        self.teacher_fields = tuple(stage_field(i) for i in range(len(t_channels)))

    def distillation_term(self, student, teacher, progress=None):
        return flow_of_solution_procedure(student.stages, teacher.stages)
