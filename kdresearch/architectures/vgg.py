"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13).

Architecture: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, with BatchNorm after every conv, in the CIFAR variant of the distillation
benchmark suites RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020;
github.com/HobbitLong/RepDistiller, models/vgg.py) and mdistiller (Zhao et al., "Decoupled
Knowledge Distillation", CVPR 2022; github.com/megvii-research/mdistiller,
mdistiller/models/cifar/vgg.py): five conv blocks (`block0` ... `block4`, widths ending
64/128/256/512/512), max-pools between them, global average pooling and a single linear
`classifier` (no fully connected hidden layers). The suites' config names map to their `_bn`
builders: vgg8 = "S" (one conv per block), vgg11 = "A", vgg13 = "B". For a 32x32 input the max-pool
between block3 and block4 is skipped (the suites apply it only to 64x64 inputs), so block3 and
block4 both work at 4x4.

`state_dict` keys equal the suites' (block<k>.<i> numbered conv, BN, ReLU, conv, BN, ...; the
pools have no parameters; classifier), so their checkpoints load unchanged. Initialisation is
theirs too.

Stages: the outputs of block1 ... block4 after the ReLU and before the following pool, i.e. the
suites' feat[1] ... feat[4] (`is_feat=True` in RepDistiller, `feats["feats"][1:]` in
mdistiller); block0 is the stem (feat[0]). The embedding is the average-pooled block4 output.
Pre-activation stages: the same blocks' outputs before that ReLU, i.e. their last BN's output (the
suites' `preact=True` feat[1..4]); `preact_norms` are those BNs (the suites' `get_bn_before_relu`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdresearch.architectures.initialisation import init_suite_weights
from kdresearch.models import ModelOutputs, Network

# Output widths of the convs of block0 ... block4.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # The block ends at its last BN (as in the suites, which read that BN as the pre-activation);
    # the caller applies the last ReLU.
    return nn.Sequential(*layers[:-1])


class VGG(Network):
    """VGG-BN for CIFAR; `widths[k]` lists the conv widths of block k (five blocks)."""

    def __init__(self, widths: Sequence[Sequence[int]], num_classes: int = 100, arch: str = "vgg"):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"VGG needs conv widths for 5 blocks, got {len(widths)}")
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = widths[4][-1]
        self.stage_channels = tuple(block[-1] for block in widths[1:])
        self.stage_sizes = (16, 8, 4, 4)

        in_channels = 3
        for index, block_widths in enumerate(widths):
            setattr(self, f"block{index}", _conv_block(in_channels, block_widths))
            in_channels = block_widths[-1]
        self.classifier = nn.Linear(self.embedding_dim, num_classes)

        init_suite_weights(self, linear_std=0.01)

    def _stage_blocks(self) -> tuple[nn.Sequential, ...]:
        return self.block1, self.block2, self.block3, self.block4

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        pool_before_block4 = x.shape[2] == 64  # the suites' rule: keeps block4 at 4x4 for 64x64 inputs
        x = F.relu(self.block0(x), inplace=True)
        stages, preact = [], []
        for index, block in enumerate(self._stage_blocks(), start=1):
            if index < 4 or pool_before_block4:
                x = F.max_pool2d(x, kernel_size=2, stride=2)  # a fresh tensor: the stage before stays intact
            before = block(x)
            # The block ends with a BN, whose output is fresh, so the in-place ReLU is safe unless
            # that output is kept as the pre-activation stage.
            x = F.relu(before, inplace=not with_preact)
            stages.append(x)
            preact.append(before)
        embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ModelOutputs(logits=self.classifier(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(block[-1] for block in self._stage_blocks())


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg8"], num_classes, arch="vgg8")


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes, arch="vgg11")


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["vgg13"], num_classes, arch="vgg13")
