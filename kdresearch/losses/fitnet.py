"""FitNet hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), as the CIFAR
benchmark suites (RepDistiller `distiller_zoo/FitNet.py` with `models/util.py` ConvReg, mdistiller
`distillers/FitNet.py`) train it: in one stage, together with cross-entropy, not the paper's
separate hint pre-training.

    total = ce_weight * CE(student logits, labels)
          + distill_weight * MSE(relu(BN(conv(student stage i))), teacher stage i)

Defaults are the suites': hint weight 100, CE weight 1, and the hint is taken after the second
stage. The suites' feature lists count the stem as feat[0], so their `hint_layer=2` is the
output of the second stage, which is index 1 of our `stages` (the stem is not a stage here).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import WeightedDistillation, pair_error
from kdresearch.models import stage_field


def resolve_stage(stage: int, count: int):
    """`stage` as a non-negative index into `count` stages (negative counts from the last), or
    None when out of range. Non-negative because cached teacher outputs store "stage<i>" keys
    and a model's stage -1 and another's stage -1 are different positions."""
    index = stage + count if stage < 0 else stage
    return index if 0 <= index < count else None


def connector_conv(s_channels: int, s_size: int, t_channels: int, t_size: int):
    """The suites' ConvReg convolution that maps a (s_channels, s_size^2) map onto a
    (t_channels, t_size^2) one, or None for the sizes it does not handle (a student map smaller
    than the teacher's other than exactly half)."""
    if s_size == 2 * t_size:  # one stride-2 step down
        return nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    if 2 * s_size == t_size:  # one stride-2 step up: (s - 1) * 2 - 2 + 4 = 2 s
        return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    if s_size >= t_size:  # unpadded conv shrinks by kernel - 1; kernel 1 when the sizes agree
        return nn.Conv2d(s_channels, t_channels, kernel_size=1 + s_size - t_size)
    return None


class HintConnector(nn.Sequential):
    """conv -> BatchNorm -> ReLU, the suites' ConvReg with its default use_relu=True. The ReLU
    fits because the hint target (a teacher stage) is itself post-activation, so non-negative;
    `relu=False` (ConvReg's use_relu=False) for a pre-activation target, negative values included."""

    def __init__(self, conv: nn.Module, t_channels: int, relu: bool = True):
        layers = OrderedDict(conv=conv, bn=nn.BatchNorm2d(t_channels))
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class FitNet(WeightedDistillation):
    """ce_weight * CE + distill_weight * MSE(connector(student stage), teacher stage).

    `stage` indexes the models' `stages` (default 1, the suites' hint_layer 2; negative counts
    from the last stage, resolved separately for each model). The connector is sized from the pair
    in `bind` and belongs to the loss: it trains with the student through `loss.parameters()`, and
    its BatchNorm running statistics are buffers, so they are in `state_dict()` and checkpoints.
    """

    student_features = True
    part_name = "fitnet"

    def __init__(self, stage: int = 1, ce_weight: float = 1.0, distill_weight: float = 100.0):
        super().__init__(ce_weight, distill_weight)
        self.stage = validators.integer("loss.stage", stage, note="a stage index")
        self.student_stage = self.teacher_stage = None
        self.connector = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        s_count, t_count = len(student.stage_channels), len(teacher.stage_channels)
        s_index, t_index = resolve_stage(self.stage, s_count), resolve_stage(self.stage, t_count)
        if s_index is None or t_index is None:
            raise pair_error("fitnet", f"loss.stage={self.stage} is out of range (the student has {s_count} "
                             f"stages, the teacher {t_count})", student, teacher)
        s_channels, s_size = student.stage_channels[s_index], student.stage_sizes[s_index]
        t_channels, t_size = teacher.stage_channels[t_index], teacher.stage_sizes[t_index]
        conv = connector_conv(s_channels, s_size, t_channels, t_size)
        if conv is None:
            raise pair_error("fitnet", f"the student's stage {s_index} map ({s_size}x{s_size}) is smaller than "
                             f"the teacher's stage {t_index} map ({t_size}x{t_size}) but not half its size; "
                             f"the connector handles equal, 2x, half or larger student maps", student, teacher)
        self.student_stage, self.teacher_stage = s_index, t_index
        self.connector = HintConnector(conv, t_channels)
        self.teacher_fields = (stage_field(t_index),)

    def distillation_term(self, student, teacher, progress=None):
        hint = self.connector(student.stages[self.student_stage])
        target = teacher.stages[self.teacher_stage]
        if hint.shape != target.shape:
            # Sizes were checked in bind for 32x32 inputs; other input sizes can break the match,
            # and mse_loss would broadcast or fail with a less helpful message.
            raise KDResearchError(f"loss=fitnet: the connector's output {tuple(hint.shape)} does not match "
                                  f"the teacher's stage {self.teacher_stage} {tuple(target.shape)}; "
                                  f"the connector is sized for 32x32 inputs")
        return F.mse_loss(hint, target)
