"""Overhaul of feature distillation, OFD (Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul
of Feature Distillation", ICCV 2019), as the authors' CIFAR-100 code
(github.com/clovaai/overhaul-distillation, CIFAR-100/distiller.py and train_with_distillation.py)
and mdistiller (`distillers/OFD.py`, whose CIFAR-100 table results here are compared with) compute it.

OFD distils the teacher's stages before their final ReLU (`preact_stages`), where the information
the ReLU would discard is still there, and does not ask the student to copy the negative values
exactly: below the teacher's margin any student value is as good as the margin. For the teacher's
pre-activation T (one stage), the student's S through a connector, and m_c the margin of channel c,

    target         = max(T, m_c)
    partial_l2     = sum over elements of (S - target)^2 * [S > target or target > 0]
    ofd            = sum_j partial_l2(connector_j(S_j), T_j, m^j) / 2^(K - 1 - j) / N   (K pairs)
    total          = ce_weight * CE + distill_weight * ofd

so a positive teacher value is matched exactly, and a negative one only from above. The margin is
the expectation of the teacher's negative responses, modelled per channel as the Gaussian whose std
and mean are the weight and bias of the BatchNorm before the ReLU (`Network.preact_norms`, the
suites' `get_bn_before_relu`; |weight| as the std):

    m_c = mean - std * phi(mean / std) / Phi(-mean / std)     where Phi(-mean / std) > 0.001
    m_c = -3 std                                               otherwise (almost no negative mass)

(phi, Phi: the standard normal density and distribution function). The margins are read from the
teacher's BatchNorms at every step (a few hundred numbers): `bind` runs before the teacher's trained
weights are loaded, and the frozen teacher gives the same margins at every step.

The connector is a 1x1 conv (no bias) and BatchNorm mapping the student's channels onto the
teacher's, initialised as the authors do (conv normal(0, sqrt(2 / out_channels)), BN 1 and 0); one
per stage pair, trained with the student (`loss.parameters()`, in checkpoints). Stage pairs are the
last min(K_s, K_t) stages of each model, the shallower model's all (mdistiller's `_align_list`);
where a pair's maps differ in size the teacher's is average-pooled (adaptive_avg_pool2d) to the
student's, as mdistiller does. A teacher without `preact_norms` (the tutorial nets, the ShuffleNets:
the suites refuse them too) is refused in `bind`.

Defaults are the authors' CIFAR-100 ones: every stage, CE weight 1, distill_weight 1/1000 (their
`loss_distill.sum() / batch_size / 1000`; mdistiller's FEAT_WEIGHT 0.001 with its mean over the
batch), connector kernel 1. Their own runs train 200 epochs at lr 0.1 (batch 128, Nesterov SGD,
lr / 10 at 100 and 150); mdistiller's table uses its common 240-epoch recipe (lr 0.05, batch 64,
milestones 150/180/210). The authors' training loop leaves the teacher in training mode, so its
BatchNorms normalise with batch statistics and their running averages drift during distillation;
mdistiller's OFD does the same (its `train()` override leaves out `teacher.eval()`). Here the teacher
is frozen in eval mode, as for every method. The margins come from the BatchNorms of the teacher's
paired stages; mdistiller zips the teacher's norms from its first stage onwards with the aligned
last stages, which differs only when the teacher has more stages than the student.

Logged parts: "ce" and "ofd" (unweighted).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import WeightedDistillation, pair_error
from kdresearch.losses.fitnet import HintConnector
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import preact_field

# Below this share of negative mass (Phi(-mean / std)) the authors take -3 std as the margin.
NEGATIVE_MASS_FLOOR = 0.001


@torch.no_grad()
def margin_from_norm(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(bias, |weight|^2), or -3 |weight| where x < 0 has
    probability <= 0.001 (module docstring). In float64 as the authors' per-channel Python floats,
    returned as float32. A zero weight (a channel its BN switched off) counts as a tiny std, which
    gives the limits: the bias when it is negative, 0 otherwise."""
    # On the BN's own device (a copy to the CPU would wait for the GPU at every step), except on MPS,
    # which has no float64; the margins are per channel, tiny.
    where = torch.device("cpu") if weight.device.type == "mps" else weight.device
    std = weight.detach().to(where, torch.float64).abs().clamp_min(1e-12)
    mean = bias.detach().to(where, torch.float64)
    ratio = mean / std
    negative_mass = torch.special.ndtr(-ratio)
    density = torch.exp(-ratio.pow(2) / 2) / math.sqrt(2 * math.pi)
    # Where the negative mass is tiny the division may overflow; `where` picks -3 std there.
    expected_negative = mean - std * density / negative_mass.clamp_min(NEGATIVE_MASS_FLOOR)
    margin = torch.where(negative_mass > NEGATIVE_MASS_FLOOR, expected_negative, -3 * std)
    return margin.float().to(weight.device)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """sum of (S - max(T, m))^2 where S > max(T, m) or max(T, m) > 0; `margin` broadcasts per channel."""
    target = torch.maximum(target, margin.view(1, -1, 1, 1).to(target.dtype))
    return ((source - target).pow(2) * ((source > target) | (target > 0))).sum()


@computed_in_float32
def overhaul_distillation(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                          margins: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_j partial_l2(S_j, T_j, m_j) / 2^(K - 1 - j) / N over the K pairs: the student's maps
    already through their connectors, the teacher's at the student's size."""
    pairs = len(student_maps)
    terms = [partial_l2(s, t, m) / 2 ** (pairs - 1 - j)
             for j, (s, t, m) in enumerate(zip(student_maps, teacher_maps, margins))]
    return torch.stack(terms).sum() / student_maps[0].shape[0]


def ofd_connector(s_channels: int, t_channels: int) -> HintConnector:
    """1x1 conv (no bias) -> BatchNorm (weight 1, bias 0: torch's default, the authors' too), no ReLU
    (the target is a pre-activation), initialised as the authors' `build_feature_connector`."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))  # fan_out = 1 * 1 * t_channels
    return HintConnector(conv, t_channels, relu=False)


class OverhaulDistillation(WeightedDistillation):
    """ce_weight * CE + distill_weight * OFD; module docstring. `bind` pairs the stages, creates one
    connector per pair and keeps the teacher's BatchNorms (not as submodules: they stay the
    teacher's, frozen, and out of this loss's parameters and state) to read the margins from."""

    student_features = True
    part_name = "ofd"

    def __init__(self, ce_weight: float = 1.0, distill_weight: float = 0.001):
        super().__init__(ce_weight, distill_weight)
        self.connectors = nn.ModuleList()
        self.student_stages: tuple[int, ...] = ()
        self.teacher_stages: tuple[int, ...] = ()
        self._teacher_norms: tuple[nn.BatchNorm2d, ...] = ()  # a tuple: nn.Module does not register it

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        norms = teacher.preact_norms()
        if norms is None:
            raise pair_error("ofd", "OFD reads its margins from the BatchNorm before each teacher stage's ReLU, "
                             "and the teacher has none", student, teacher)
        pairs = min(len(student.stage_channels), len(teacher.stage_channels))
        if pairs == 0:
            raise pair_error("ofd", "OFD needs at least one stage in each model", student, teacher)
        s_count, t_count = len(student.stage_channels), len(teacher.stage_channels)
        self.student_stages = tuple(range(s_count - pairs, s_count))
        self.teacher_stages = tuple(range(t_count - pairs, t_count))
        self.connectors = nn.ModuleList(
            ofd_connector(student.stage_channels[s], teacher.stage_channels[t])
            for s, t in zip(self.student_stages, self.teacher_stages))
        self._teacher_norms = tuple(norms[t] for t in self.teacher_stages)
        self.teacher_fields = tuple(preact_field(t) for t in self.teacher_stages)

    def margins(self) -> list[torch.Tensor]:
        """Each paired teacher stage's per-channel margin, from its BatchNorm's current weights."""
        if not self._teacher_norms:
            raise KDResearchError("loss=ofd reads its margins from the teacher's BatchNorms: bind it to the "
                                  "pair first (the trainer does)")
        return [margin_from_norm(norm.weight, norm.bias) for norm in self._teacher_norms]

    def distillation_term(self, student, teacher, progress=None):
        connected = [connector(student.preact_stages[s]) for connector, s in zip(self.connectors, self.student_stages)]
        targets = [teacher.preact_stages[t] for t in self.teacher_stages]
        # The teacher's map at the student's size (mdistiller); pooling a same-size map is skipped.
        targets = [t if t.shape[2:] == s.shape[2:] else F.adaptive_avg_pool2d(t, s.shape[2:])
                   for s, t in zip(connected, targets)]
        return overhaul_distillation(connected, targets, self.margins())
