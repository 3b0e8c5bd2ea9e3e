"""MobileNetV2 for CIFAR (the suites' `MobileNetV2`: expansion 6, width multiplier 0.5).

Architecture: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
in the CIFAR variant of the distillation benchmark suites RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020; github.com/HobbitLong/RepDistiller, models/mobilenetv2.py,
`mobilenetv2_T_w(T=6, W=0.5)` a.k.a. `mobile_half`) and mdistiller (Zhao et al., "Decoupled
Knowledge Distillation", CVPR 2022; github.com/megvii-research/mdistiller,
mdistiller/models/cifar/mobilenetv2.py, config name "MobileNetV2"), which took it from Jin et al.,
"Knowledge Distillation via Route Constrained Optimization", ICCV 2019. Unlike the ImageNet
network, the stem is a stride-2 3x3 conv and the stride pattern leaves a 2x2 map for a 32x32 input;
the last 1x1 conv keeps 1280 channels (not scaled down by the width multiplier), and the classifier
has no dropout.

`state_dict` keys equal the suites' (conv1.{0,1}, blocks.<group>.<block>.conv.{0,1,3,4,6,7},
conv2.{0,1}, classifier.0), so their checkpoints load unchanged. Initialisation is theirs too.

Stages: the outputs of block groups 1, 2, 4 and 6 (the last of each resolution: 16x16, 8x8, 4x4,
2x2), exactly the suites' feat[1] ... feat[4] (`is_feat=True` in RepDistiller,
`feats["feats"][1:]` in mdistiller); the stem is feat[0]. The inverted-residual blocks end with a
linear (BN, no ReLU) projection, so these maps are not passed through a ReLU: their pre-activation
stages are the stages themselves (the suites return the same maps with `preact=True`), and
`preact_norms` are each stage's last projection BN (the suites' `get_bn_before_relu`). The
embedding is the average-pooled output of the final 1x1 conv-BN-ReLU (1280 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.architectures.initialisation import init_suite_weights
from kdresearch.models import ModelOutputs, Network

# (expansion, output channels before width scaling, blocks, first stride) per block group; the
# expansion None means "the network's expansion" (the first group always uses 1).
_GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
_STAGE_GROUPS = (1, 2, 4, 6)  # the group whose output is a stage (last group of each resolution)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when shape is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        # One Sequential (indices 0..7, ReLUs at 2 and 5) so the keys read `conv.<i>` as in the suites.
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(Network):
    """CIFAR MobileNetV2; the defaults are the suites' `MobileNetV2` (T=6, W=0.5)."""

    def __init__(self, num_classes: int = 100, expansion: int = 6, width_mult: float = 0.5,
                 arch: str = "MobileNetV2"):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes

        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        channels, sizes, size = [], [], 16  # side after the stride-2 stem, for a 32x32 input
        for group_expansion, width, num_blocks, stride in _GROUPS:
            out_channels = int(width * width_mult)
            group = []
            for index in range(num_blocks):
                group.append(InvertedResidual(in_channels, out_channels, stride if index == 0 else 1,
                                              expansion if group_expansion is None else group_expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*group))
            size //= stride
            channels.append(out_channels)
            sizes.append(size)
        self.stage_channels = tuple(channels[g] for g in _STAGE_GROUPS)
        self.stage_sizes = tuple(sizes[g] for g in _STAGE_GROUPS)

        self.embedding_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, self.embedding_dim, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(self.embedding_dim, num_classes))

        init_suite_weights(self, linear_std=0.01)

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = self.conv1(x)
        stages = []
        for index, group in enumerate(self.blocks):
            x = group(x)
            if index in _STAGE_GROUPS:
                stages.append(x)
        # conv2's in-place ReLU acts on its own BN output, never on the last stage.
        x = self.conv2(x)
        # Global pooling equals the suites' AvgPool2d(2, ceil_mode=True) on the 2x2 map of a
        # 32x32 input.
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        stages = tuple(stages)
        return ModelOutputs(logits=self.classifier(embedding), embedding=embedding, stages=stages,
                            preact_stages=stages if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(self.blocks[group][-1].conv[-1] for group in _STAGE_GROUPS)
