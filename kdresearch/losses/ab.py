"""Activation boundaries, AB (Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019), as the authors' CIFAR code
(github.com/bhheo/AB_distillation, cifar10_AB_distillation.py, models/distillation_module.py) and
RepDistiller, whose CIFAR-100 table results here are compared with (`distiller_zoo/AB.py`,
`models/util.py` Connector, `helper/pretrain.py`), compute and train it.

A neuron's activation boundary is where its pre-activation crosses 0. AB teaches the student to put
its boundaries where the teacher has them: the student's pre-activation stage S_j, through a
connector, should be above +m where the teacher's pre-activation T_j is positive (the neuron is on)
and below -m where it is not. With the margin m, element by element,

    alternative_l2(S, T) = sum (S + m)^2 * [S > -m and T <= 0] + (S - m)^2 * [S <= m and T > 0]

(the paper's differentiable stand-in for the count of neurons whose on/off state disagrees), and
over the K stage pairs, the deeper stage weighing twice its predecessor,

    ab = 3 / 1000 * sum_j 2^(j - K + 1) * alternative_l2(connector_j(S_j), T_j) / N

The 3/1000 is the authors' scale of that sum (their `loss_alter / 1000 * 3`, inside RepDistiller's
ABLoss): it sets the step size of the init stage, in which the term is the whole loss, so it is part
of the term here.

Training, as RepDistiller's CIFAR-100 recipe (`--distill abound -a 0 -b 1 --init_epochs 30`), in
two stages (`kdresearch.losses.init_stage`): for init_epochs epochs `ab` alone trains the student's
feature layers and the connectors; then cross-entropy alone (RepDistiller's second stage has no AB
term), hence distill_weight 0. Its 240 epochs follow the init stage, so its recipe here is
`epochs=270` with the learning-rate milestones shifted by 30 (180, 210, 240). The authors' CIFAR-10
code trains the second stage with KD instead (`loss=ab +loss@loss.kd=kd` does that).

Stages: every stage of both models before its final ReLU (`preact_stages`; RepDistiller's
`feat[1:-1]` with `preact=True`), stage j of the student with stage j of the teacher, so the two
need the same number of stages. Connectors, sized from the pair: none where the student's stage
already has the teacher's channels and size (the authors and RepDistiller pass it through as it
is), else RepDistiller's ConvReg without its ReLU: a convolution (1x1 at equal sizes; stride 2,
transposed, or unpadded for other sizes, `fitnet.connector_conv`) and BatchNorm. They belong to the
loss (trained with the student, in checkpoints).

Logged parts: "ce" and "ab", unweighted, in both stages.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdresearch.losses.base import number, pair_error
from kdresearch.losses.fitnet import HintConnector, connector_conv
from kdresearch.losses.init_stage import InitStageDistillation
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import preact_field

AUTHORS_SCALE = 3 / 1000  # the authors' scale of the summed alternative loss (module docstring)


def alternative_l2(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over all elements of the squared hinge on the wrong side of +-margin (module docstring)."""
    off = (source > -margin) & (target <= 0)
    on = (source <= margin) & (target > 0)
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


@computed_in_float32
def activation_boundary_transfer(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                                 margin: float = 1.0) -> torch.Tensor:
    """3/1000 * sum_j 2^(j - K + 1) * alternative_l2(S_j, T_j) / N over the K pairs (the student's
    maps already through their connectors)."""
    pairs = len(student_maps)
    n = student_maps[0].shape[0]
    terms = [2.0 ** (j - pairs + 1) * alternative_l2(s, t, margin) for j, (s, t) in
             enumerate(zip(student_maps, teacher_maps))]
    return AUTHORS_SCALE * torch.stack(terms).sum() / n


class ActivationBoundaries(InitStageDistillation):
    """AB alone for the first `init_epochs` epochs, then ce_weight * CE + distill_weight * AB; module
    docstring. `bind` creates one connector per stage pair (nn.Identity where the shapes agree)."""

    student_features = True
    part_name = "ab"

    def __init__(self, margin: float = 1.0, init_epochs: int = 30, ce_weight: float = 1.0,
                 distill_weight: float = 0.0):
        super().__init__(init_epochs, ce_weight, distill_weight)
        self.margin = number("loss.margin", margin)
        self.connectors = nn.ModuleList()

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        s_count, t_count = len(student.stage_channels), len(teacher.stage_channels)
        if s_count != t_count or s_count == 0:
            raise pair_error("ab", f"AB pairs stage j of the student with stage j of the teacher, so both need the "
                             f"same number of stages (the student has {s_count}, the teacher {t_count})",
                             student, teacher)
        connectors = []
        for j, (s_channels, s_size, t_channels, t_size) in enumerate(zip(
                student.stage_channels, student.stage_sizes, teacher.stage_channels, teacher.stage_sizes)):
            if (s_channels, s_size) == (t_channels, t_size):
                connectors.append(nn.Identity())
                continue
            conv = connector_conv(s_channels, s_size, t_channels, t_size)
            if conv is None:
                raise pair_error("ab", f"the student's stage {j} map ({s_size}x{s_size}) is smaller than the "
                                 f"teacher's ({t_size}x{t_size}) but not half its size; the connector handles "
                                 f"equal, 2x, half or larger student maps", student, teacher)
            connectors.append(HintConnector(conv, t_channels, relu=False))  # the target is a pre-activation
        self.connectors = nn.ModuleList(connectors)
        self.teacher_fields = tuple(preact_field(j) for j in range(t_count))

    def distillation_term(self, student, teacher, progress=None):
        connected = [connector(s) for connector, s in zip(self.connectors, student.preact_stages)]
        return activation_boundary_transfer(connected, teacher.preact_stages, self.margin)
