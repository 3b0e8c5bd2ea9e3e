"""Variational information distillation, VID (Ahn, Hu, Damianou, Lawrence & Dai, "Variational
Information Distillation for Knowledge Transfer", CVPR 2019), as the CIFAR benchmark suites
compute it (RepDistiller `distiller_zoo/VID.py`, mdistiller `distillers/VID.py`, both from the
authors' code).

VID maximises a variational lower bound on the mutual information between a teacher stage and the
student stage paired with it: the teacher's map is modelled as a Gaussian whose mean a small
regressor predicts from the student's map and whose variance is learned per teacher channel
(heteroscedastic over channels, shared over positions and samples). Per stage pair j:

    mu          = regressor_j(F_s^j)             conv1x1 (C_s -> C_t), ReLU, conv1x1, ReLU, conv1x1
    sigma^2_c   = softplus(alpha_c) + eps        one learned alpha per teacher channel
    vid_j       = mean_{n, c, h, w} 1/2 * ((mu - F_t^j)^2 / sigma^2_c + log sigma^2_c)
    total       = ce_weight * CE + distill_weight * sum_j vid_j

(the Gaussian's negative log-likelihood without its constant log(2 pi) / 2). When the two maps of
a pair differ in size, the larger is average-pooled (adaptive_avg_pool2d) to the smaller before
the regressor, as both suites do. The regressor's convolutions have no bias and its middle width
is the teacher's channel count (the suites' `VIDLoss(s, t, t)`).

alpha starts at softplus^-1(init_var - eps), so sigma^2 starts at init_var. The regressors and the
alphas are parameters of this loss, trained with the student's optimizer (and its weight decay),
as RepDistiller does (its `trainable_list` holds the VID modules). mdistiller keeps its alphas in a
plain Python list, which its optimizer never sees, so there the variance stays at init_var; that
is not followed.

Defaults are the suites' (init_var 5.0, eps 1e-5, both weights 1: RepDistiller `-b 1` with its
`VIDLoss` defaults, mdistiller `engine/cfg.py` VID). Stages are the stage outputs after the stem,
zipped from the first (RepDistiller `feat[1:-1]`, mdistiller `feats[1:]`): our `stages`.
"""

from __future__ import annotations

import math
import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.losses.at import pool_to_common_size
from kdresearch.losses.base import WeightedDistillation, number, pair_error
from kdresearch.models import stage_field


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDRegressor(nn.Sequential):
    """The suites' mean predictor: conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1, no biases."""

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__(_conv1x1(s_channels, t_channels), nn.ReLU(), _conv1x1(t_channels, t_channels), nn.ReLU(),
                         _conv1x1(t_channels, t_channels))


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """mean of 1/2 * ((mean - target)^2 / var + log var), var = softplus(alpha) + eps per channel.

    In float32: under autocast the regressor's output is bf16/fp16. softplus is torch's stable
    log(1 + exp(alpha)) (the suites' formula, which overflows for alpha above ~88).
    """
    variance = (F.softplus(alpha.float()) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean.float() - target.float()).pow(2) / variance + variance.log())).mean()


def inverse_softplus(value: float) -> float:
    """x with softplus(x) = value (> 0)."""
    return math.log(math.expm1(value))


class VID(WeightedDistillation):
    """ce_weight * CE + distill_weight * sum over stage pairs of the Gaussian NLL; module docstring.

    `bind` pairs the stages from the first (as many as the shallower model has) and creates one
    regressor and one alpha vector per pair, sized from the pair; they are in `state_dict()` (so in
    checkpoints) and in `parameters()` (trained with the student).
    """

    student_features = True
    part_name = "vid"

    def __init__(self, init_var: float = 5.0, eps: float = 1e-5, ce_weight: float = 1.0,
                 distill_weight: float = 1.0):
        super().__init__(ce_weight, distill_weight)
        self.eps = number("loss.eps", eps, positive=True)
        self.init_var = validators.number("loss.init_var", init_var, above=self.eps, note="the variance floor loss.eps")
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        pairs = min(len(student.stage_channels), len(teacher.stage_channels))
        if pairs == 0:
            raise pair_error("vid", "VID needs at least one stage in each model", student, teacher)
        start = inverse_softplus(self.init_var - self.eps)
        channels = list(zip(student.stage_channels[:pairs], teacher.stage_channels[:pairs]))
        self.regressors = nn.ModuleList(VIDRegressor(s, t) for s, t in channels)
        self.alphas = nn.ParameterList(nn.Parameter(torch.full((t,), start)) for _, t in channels)
        self.teacher_fields = tuple(stage_field(i) for i in range(pairs))

    def distillation_term(self, student, teacher, progress=None):
        terms = []
        for regressor, alpha, f_s, f_t in zip(self.regressors, self.alphas, student.stages, teacher.stages):
            f_s, f_t = pool_to_common_size(f_s, f_t)
            terms.append(gaussian_nll(regressor(f_s), f_t, alpha, self.eps))
        return torch.stack(terms).sum()
