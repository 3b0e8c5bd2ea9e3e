"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2
(3x3 stem, three stages of 2n basic blocks at 32x32, 16x16 and 8x8, global average pooling, one
linear layer; depth = 6n + 2). The widths and names are those of the distillation benchmark suites:
RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020;
github.com/HobbitLong/RepDistiller, models/resnet.py) and mdistiller (Zhao et al., "Decoupled
Knowledge Distillation", CVPR 2022; github.com/megvii-research/mdistiller,
mdistiller/models/cifar/resnet.py). `resnetNx4` is the suites' 4x wider variant (stem 32, stages
64/128/256). Downsampling shortcuts are 1x1 convolutions + BN (the paper's option B), not the
paper's zero-padding option A.

`state_dict` keys equal the suites' (conv1, bn1, layer1.0.conv1, layer1.0.bn1, ...,
layer2.0.downsample.0/1, fc), so their checkpoints load unchanged. Initialisation is theirs too.

Stages: the outputs of layer1, layer2 and layer3 after each stage's last ReLU, i.e. the suites'
feat[1], feat[2], feat[3] (`is_feat=True` in RepDistiller, `feats["feats"][1:]` in mdistiller);
the stem (feat[0]) is not a stage. The embedding is the globally average-pooled layer3 output
(the suites' feat[-1] / `pooled_feat`).

Pre-activation stages: each stage's last residual sum before its ReLU (the suites' `preact=True`
feat[1..3]); `preact_norms` are those blocks' bn2, the suites' `get_bn_before_relu`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.models import ModelOutputs, Network, run_stage


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN `downsample`) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The residual sum is a fresh tensor, so the in-place ReLU never touches `x` (which may be
        # a stage output a loss still holds).
        return F.relu(self.residual_sum(x), inplace=True)

    def forward_keeping_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before = self.residual_sum(x)
        return F.relu(before), before


class ResNet(Network):
    """CIFAR ResNet of `depth` = 6n + 2 layers; `widths` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, arch: str = "resnet"):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {tuple(widths)}")
        blocks_per_stage = (depth - 2) // 6
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = widths[3]
        self.stage_channels = tuple(widths[1:])
        self.stage_sizes = (32, 16, 8)

        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride)]
        blocks += [BasicBlock(channels, channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        stages, preact = [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = run_stage(layer, x, preact if with_preact else None)
            stages.append(x)
        # Global pooling equals the suites' AvgPool2d(8) on the 8x8 map of a 32x32 input and
        # also works for other input sizes.
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutputs(logits=self.fc(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(layer[-1].bn2 for layer in (self.layer1, self.layer2, self.layer3))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, _NARROW, num_classes, arch="resnet8")


def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, _NARROW, num_classes, arch="resnet14")


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, _NARROW, num_classes, arch="resnet20")


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, _NARROW, num_classes, arch="resnet32")


def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, _NARROW, num_classes, arch="resnet44")


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, _NARROW, num_classes, arch="resnet56")


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, _NARROW, num_classes, arch="resnet110")


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, _WIDE, num_classes, arch="resnet8x4")


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, _WIDE, num_classes, arch="resnet32x4")
