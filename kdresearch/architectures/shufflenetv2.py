"""ShuffleNet V2 for CIFAR (the suites' `ShuffleV2`: net size 1x, stages 116/232/464).

Architecture: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018, in the CIFAR variant of the distillation benchmark suites RepDistiller (Tian et
al., "Contrastive Representation Distillation", ICLR 2020; github.com/HobbitLong/RepDistiller,
models/ShuffleNetv2.py) and mdistiller (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022;
github.com/megvii-research/mdistiller, mdistiller/models/cifar/ShuffleNetv2.py): a 1x1 stem conv
(24 channels, stride 1, no max-pool), three stages each made of one stride-2 down-sampling unit
followed by 3, 7 and 3 basic units (channel split, shuffle), a final 1x1 conv to 1024 channels
(`conv2`, `bn2`), global average pooling and a `linear` classifier.

`state_dict` keys equal the suites' (conv1, bn1, layer<k>.0.{conv1..conv5,bn1..bn5} for the
down-sampling unit, layer<k>.<i>.{conv1,bn1,conv2,bn2,conv3,bn3} for the basic units, conv2, bn2,
linear), so their checkpoints load unchanged. Initialisation is PyTorch's default, as theirs.

Stages: the outputs of layer1, layer2 and layer3 (16x16, 8x8, 4x4 for a 32x32 input), i.e. the
suites' feat[1], feat[2], feat[3] (`is_feat=True` in RepDistiller, `feats["feats"][1:]` in
mdistiller); the stem is feat[0]. Every channel of these maps is some unit's ReLU output (a basic
unit passes half its input through unchanged), so they are post-activation. The embedding is the
average-pooled relu(bn2(conv2(layer3 output))). Pre-activation stages: each layer's last basic unit
with its processed half taken before the ReLU (the suites' `preact=True` feat[1..3]), shuffled
like the stage so that channel c of both is the same channel (the suites leave their pre-activation
unshuffled, in another channel order than the stage). The suites name no BatchNorm before that ReLU
(their `get_bn_before_relu` refuses ShuffleNetV2), so `preact_norms` is None.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.models import ModelOutputs, Network, run_stage

STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of the two halves so the next unit's split mixes both branches."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicUnit(nn.Module):
    """Keep half the channels, run the other half through 1x1 - 3x3 depthwise - 1x1, concatenate."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def _processed_before_relu(self, processed: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(processed)), inplace=True)
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, processed = x.chunk(2, dim=1)
        out = F.relu(self._processed_before_relu(processed), inplace=True)
        return channel_shuffle(torch.cat([kept, out], 1))

    def forward_keeping_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, processed = x.chunk(2, dim=1)
        before = self._processed_before_relu(processed)
        return (channel_shuffle(torch.cat([kept, F.relu(before)], 1)),
                channel_shuffle(torch.cat([kept, before], 1)))


class DownUnit(nn.Module):
    """Two stride-2 branches (3x3 depthwise - 1x1 and 1x1 - 3x3 depthwise - 1x1), concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)), inplace=True)
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(Network):
    """CIFAR ShuffleNet V2; `stage_channels`, basic `blocks` per stage and the final conv width."""

    def __init__(self, stage_channels: Sequence[int] = (116, 232, 464), blocks: Sequence[int] = (3, 7, 3),
                 final_channels: int = 1024, num_classes: int = 100, arch: str = "ShuffleV2"):
        super().__init__()
        if len(stage_channels) != 3 or len(blocks) != 3:
            raise ValueError("ShuffleNetV2 here has exactly 3 stages")
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = final_channels
        self.stage_channels = tuple(stage_channels)
        self.stage_sizes = (16, 8, 4)

        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        for index, (channels, num_blocks) in enumerate(zip(stage_channels, blocks), start=1):
            units = [DownUnit(in_channels, channels)] + [BasicUnit(channels) for _ in range(num_blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, final_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(final_channels)
        self.linear = nn.Linear(final_channels, num_classes)

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        stages, preact = [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = run_stage(layer, x, preact if with_preact else None)
            stages.append(x)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        # Global pooling equals the suites' avg_pool2d(4) on the 4x4 map of a 32x32 input.
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutputs(logits=self.linear(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # noqa: N802 - the suites' config name
    return ShuffleNetV2(num_classes=num_classes)
