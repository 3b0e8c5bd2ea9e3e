"""ShuffleNet (v1) for CIFAR (the suites' `ShuffleV1`: 3 groups, stages 240/480/960).

Architecture: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices", CVPR 2018, in the CIFAR variant of the distillation benchmark suites RepDistiller
(Tian et al., "Contrastive Representation Distillation", ICLR 2020;
github.com/HobbitLong/RepDistiller, models/ShuffleNetv1.py) and mdistiller (Zhao et al., "Decoupled
Knowledge Distillation", CVPR 2022; github.com/megvii-research/mdistiller,
mdistiller/models/cifar/ShuffleNetv1.py): a 1x1 stem conv (24 channels, stride 1, no max-pool),
three stages of 4, 8 and 4 bottleneck units (each stage starts with a stride-2 unit that
concatenates an average-pooled shortcut), global average pooling over the final 4x4 map and a
`linear` classifier. As in the paper, the first 1x1 group conv after the stem is not grouped.

`state_dict` keys equal the suites' (conv1, bn1, layer<k>.<i>.{conv1,bn1,conv2,bn2,conv3,bn3},
linear), so their checkpoints load unchanged. Initialisation is PyTorch's default, as theirs.

Stages: the outputs of layer1, layer2 and layer3 after each unit's final ReLU (16x16, 8x8, 4x4 for a
32x32 input), i.e. the suites' feat[1], feat[2], feat[3] (`is_feat=True` in RepDistiller,
`feats["feats"][1:]` in mdistiller); the stem is feat[0]. The embedding is the average-pooled layer3
output. Pre-activation stages: each layer's last unit before its final ReLU (the suites'
`preact=True` feat[1..3]). The suites name no BatchNorm before that ReLU (their
`get_bn_before_relu` refuses ShuffleNet), so `preact_norms` is None.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.models import ModelOutputs, Network, run_stage

STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups so the next group conv mixes all of them."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Group 1x1 conv - shuffle - 3x3 depthwise - group 1x1 conv, plus shortcut.

    A stride-2 unit concatenates a 3x3 average-pooled shortcut, so its branch produces only
    `out_channels` - `in_channels` channels (the caller passes that branch width)."""

    def __init__(self, in_channels: int, branch_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_channels = branch_channels // 4
        # The stem has only 24 channels: the first unit's 1x1 conv is dense (as in the paper).
        self.first_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, groups=mid_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)

    def before_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's output before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        return out + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cat / + give a fresh tensor: the in-place ReLU never touches `x`.
        return F.relu(self.before_relu(x), inplace=True)

    def forward_keeping_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before = self.before_relu(x)
        return F.relu(before), before


class ShuffleNetV1(Network):
    """CIFAR ShuffleNet v1; `stage_channels` and `blocks` per stage, `groups` of the 1x1 convs."""

    def __init__(self, stage_channels: Sequence[int] = (240, 480, 960), blocks: Sequence[int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100, arch: str = "ShuffleV1"):
        super().__init__()
        if len(stage_channels) != 3 or len(blocks) != 3:
            raise ValueError("ShuffleNetV1 here has exactly 3 stages")
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = stage_channels[-1]
        self.stage_channels = tuple(stage_channels)
        self.stage_sizes = (16, 8, 4)

        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        for index, (channels, num_blocks) in enumerate(zip(stage_channels, blocks), start=1):
            units = [ShuffleUnit(in_channels, channels - in_channels, stride=2, groups=groups)]
            units += [ShuffleUnit(channels, channels, stride=1, groups=groups) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_channels = channels
        self.linear = nn.Linear(in_channels, num_classes)

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        stages, preact = [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = run_stage(layer, x, preact if with_preact else None)
            stages.append(x)
        # Global pooling equals the suites' avg_pool2d(4) on the 4x4 map of a 32x32 input.
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutputs(logits=self.linear(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # noqa: N802 - the suites' config name
    return ShuffleNetV1(num_classes=num_classes)
