"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 = WRN-depth-width).

Architecture: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 stem conv, three
groups of n pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv) with widths 16k, 32k, 64k at 32x32,
16x16 and 8x8, a final BN-ReLU, global average pooling and one linear layer; depth = 6n + 4.
Names and details follow the distillation benchmark suites RepDistiller (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020; github.com/HobbitLong/RepDistiller,
models/wrn.py) and mdistiller (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022;
github.com/megvii-research/mdistiller, mdistiller/models/cifar/wrn.py): `state_dict` keys are
conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc, so their checkpoints
load unchanged. Dropout is left out: the suites' networks are built with dropRate 0.

Stages: the outputs of block1, block2 and block3 exactly as the suites' feat[1], feat[2], feat[3]
(`is_feat=True` in RepDistiller, `feats["feats"][1:]` in mdistiller). Because the blocks are
pre-activation, these are the residual sums (not passed through a ReLU); in particular the last
stage is block3's output *before* the final bn1 + ReLU. The embedding is the globally
average-pooled relu(bn1(block3 output)) (the suites' feat[-1] / `pooled_feat`).

Pre-activation stages: as in the suites (`preact=True` / `preact_feats`), each stage normalised by
the BatchNorm whose output the next ReLU acts on: block2's and block3's first bn1 for stages 1 and
2, the final bn1 for stage 3 (the suites' `get_bn_before_relu`, which `preact_norms` returns). They
are taken where the forward pass computes them, not by running those BatchNorms a second time (the
suites do, which in training mode updates their running statistics twice per step).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.architectures.initialisation import init_suite_weights
from kdresearch.models import ModelOutputs, Network


class WideBasicBlock(nn.Module):
    """Pre-activation block; a 1x1 `convShortcut` (the suites' name) when the width changes."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        # The suites test only the width (not the stride) here; in these networks every strided
        # block also changes the width, so the two agree.
        self.convShortcut: Optional[nn.Conv2d] = None
        if in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bn1 returns a fresh tensor, so activating it in place leaves `x` (maybe a stage output) intact.
        return self.from_activated(x, F.relu(self.bn1(x), inplace=True))

    def from_activated(self, x: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """The block's output given its input `x` and relu(bn1(x))."""
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        out = self.conv2(out)
        # Identity shortcuts carry the raw input, projections the activated one (as in the suites).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """A group of blocks, wrapped so the keys read `block<k>.layer.<i>` as in the suites."""

    def __init__(self, num_blocks: int, in_channels: int, channels: int, stride: int):
        super().__init__()
        blocks = [WideBasicBlock(in_channels, channels, stride)]
        blocks += [WideBasicBlock(channels, channels, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def forward_keeping_input_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the group's output, bn1(x) of its first block): the previous stage's pre-activation."""
        first = self.layer[0]
        normalised = first.bn1(x)
        x = first.from_activated(x, F.relu(normalised))  # out of place: `normalised` is kept
        for block in self.layer[1:]:
            x = block(x)
        return x, normalised


class WideResNet(Network):
    """WRN-`depth`-`widen_factor` for CIFAR (depth = 6n + 4)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, arch: str = "wrn"):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = widths[3]
        self.stage_channels = widths[1:]
        self.stage_sizes = (32, 16, 8)

        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(blocks_per_stage, widths[0], widths[1], stride=1)
        self.block2 = WideStage(blocks_per_stage, widths[1], widths[2], stride=2)
        self.block3 = WideStage(blocks_per_stage, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

        init_suite_weights(self)

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = self.conv1(x)
        stages, preact = [], []
        for index, block in enumerate((self.block1, self.block2, self.block3)):
            if with_preact and index > 0:
                x, previous = block.forward_keeping_input_preact(x)
                preact.append(previous)
            else:
                x = block(x)
            stages.append(x)
        normalised = self.bn1(x)
        preact.append(normalised)
        # bn1 returns a fresh tensor; out of place when it is kept as the last pre-activation stage.
        x = F.relu(normalised, inplace=not with_preact)
        # Global pooling equals the suites' avg_pool2d(8) for 32x32 inputs.
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutputs(logits=self.fc(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes, arch="wrn_16_1")


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes, arch="wrn_16_2")


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes, arch="wrn_40_1")


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes, arch="wrn_40_2")
