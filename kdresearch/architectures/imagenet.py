"""ImageNet networks of the distillation suites: torchvision's ResNet-18/34/50 and MobileNetV2, and
mdistiller's MobileNetV1, written to this project's model contract (`kdresearch.models.Network`).

torchvision's networks (`resnet18`, `resnet34`, `resnet50`, `mobilenet_v2`) are built by
torchvision's own builders (its initialisation too) and their modules adopted as they are, so the
`state_dict` keys are exactly torchvision's, without a prefix: torchvision's weight files (e.g.
resnet34-b627a593.pth) load unchanged, and `torchvision_weights_file` finds them by their Weights
name (IMAGENET1K_V1, DEFAULT, ...) in torch's hub cache. MobileNetV1 is the one of mdistiller
(Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; github.com/megvii-research/mdistiller,
mdistiller/models/imagenet/mobilenetv1.py), the student of its ResNet-50 -> MobileNetV1 benchmark;
torchvision has none. Architecture: Howard et al., "MobileNets: Efficient Convolutional Neural
Networks for Mobile Vision Applications", 2017 (width 1.0): a stride-2 3x3 conv, 13 depthwise-
separable blocks, global pooling, one linear layer. Its keys are mdistiller's (model.<i>.<j>, fc).

Stages are the ends of the four resolution stages at 1/4, 1/8, 1/16 and 1/32 of the input side
(56, 28, 14, 7 at 224): the ResNets' layer1..layer4 outputs, MobileNetV1's blocks 3, 5, 11, 13
(mdistiller's feats), MobileNetV2's features 3, 6, 13, 17 (the last inverted residual of each
resolution, as in the CIFAR MobileNetV2; the final 1x1 conv is not a stage). The ResNets' and
MobileNetV1's stages end with a ReLU; `preact_stages` holds the same maps before it (mdistiller's
`preact_feats`, which its OFD and ReviewKD read), computed only with features (the plain forward
is the networks' own, in-place ReLUs included). MobileNetV2's inverted residuals end linearly, so
its pre-activation stages are its stages. `preact_norms` are the BatchNorms those maps come out of
(mdistiller's `get_bn_before_relu`: the last block's bn2 / bn3, MobileNetV1's pointwise BN,
MobileNetV2's projection BN). The embedding is the globally average-pooled last map.

Shape facts are for square inputs of side `image_size` (224 by default; the model configs take the
data's `image_size`, else 32). Every downsampling layer here (a stride-2 conv with "same" padding,
ResNet's 3x3 max-pool with padding 1) maps a side n to ceil(n / 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kdresearch.errors import KDResearchError
from kdresearch.models import ModelOutputs, Network

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def _halved(size: int, times: int = 1) -> int:
    """The side after `times` stride-2 layers (each maps n to ceil(n / 2))."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def _checked_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a whole number of pixels >= 1, got {image_size!r}")
    return image_size


def _adopt(network: Network, built: nn.Module) -> None:
    """Make `built`'s modules the network's own, under the same names and in the same order, so the
    network's state_dict is exactly `built`'s."""
    for name, child in built.named_children():
        network.add_module(name, child)


# --- torchvision ResNets ------------------------------------------------------------------------

def _residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock or Bottleneck up to its residual sum, i.e. its output before the
    final ReLU: that ReLU works in place, so the pre-activation map exists only here."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


class TorchvisionResNet(Network):
    """torchvision's `arch` (resnet18, resnet34 or resnet50) with its parameter names."""

    def __init__(self, arch: str, num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.image_size = _checked_size(image_size)
        _adopt(self, getattr(torchvision.models, arch)(weights=None, num_classes=num_classes))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        self.stage_channels = tuple(stage[-1].bn2.num_features if isinstance(stage[-1], BasicBlock)
                                    else stage[-1].bn3.num_features for stage in stages)
        self.stage_sizes = tuple(_halved(image_size, 2 + index) for index in range(4))  # stem conv + max-pool
        self.embedding_dim = self.fc.in_features

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return self.layer1, self.layer2, self.layer3, self.layer4

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, preact = [], []
        for stage in self._stages():
            if with_preact:
                for block in stage[:-1]:
                    x = block(x)
                before = _residual_sum(stage[-1], x)
                x = F.relu(before)  # not in place: `before` is kept
                preact.append(before)
            else:
                x = stage(x)
            stages.append(x)
        embedding = torch.flatten(self.avgpool(x), 1)
        return ModelOutputs(logits=self.fc(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(stage[-1].bn3 if isinstance(stage[-1], Bottleneck) else stage[-1].bn2 for stage in self._stages())


def resnet18(num_classes: int = 1000, image_size: int = 224) -> TorchvisionResNet:
    return TorchvisionResNet("resnet18", num_classes, image_size)


def resnet34(num_classes: int = 1000, image_size: int = 224) -> TorchvisionResNet:
    return TorchvisionResNet("resnet34", num_classes, image_size)


def resnet50(num_classes: int = 1000, image_size: int = 224) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", num_classes, image_size)


# --- torchvision MobileNetV2 --------------------------------------------------------------------

_MOBILENET_V2_STAGES = (3, 6, 13, 17)  # indices into `features`: the last block of each resolution


class TorchvisionMobileNetV2(Network):
    """torchvision's `mobilenet_v2` (width 1.0, dropout 0.2 before the classifier) with its
    parameter names."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        self.arch = "mobilenet_v2"
        self.num_classes = num_classes
        self.image_size = _checked_size(image_size)
        _adopt(self, torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes))
        # features[0] is the stride-2 stem, features[1:18] inverted residuals (each knows its stride)
        self.stage_channels = tuple(self.features[index].out_channels for index in _MOBILENET_V2_STAGES)
        self.stage_sizes = tuple(_halved(image_size, 1 + sum(block.stride == 2 for block in self.features[1:index + 1]))
                                 for index in _MOBILENET_V2_STAGES)
        self.embedding_dim = self.classifier[-1].in_features

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        stages = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _MOBILENET_V2_STAGES:
                stages.append(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        stages = tuple(stages)
        # The stages end with a linear projection (BN, no ReLU): their pre-activation is themselves.
        return ModelOutputs(logits=self.classifier(embedding), embedding=embedding, stages=stages,
                            preact_stages=stages if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(self.features[index].conv[-1] for index in _MOBILENET_V2_STAGES)


def mobilenet_v2(num_classes: int = 1000, image_size: int = 224) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(num_classes, image_size)


# --- mdistiller's MobileNetV1 -------------------------------------------------------------------

# (output channels, stride) of the stem conv and of each depthwise-separable block after it.
_MOBILENET_V1_LAYERS = ((32, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                        (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
_MOBILENET_V1_STAGES = (3, 5, 11, 13)  # indices into `model`: the last block of each resolution


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU (one Sequential, keys 0..5)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(Network):
    """mdistiller's ImageNet MobileNetV1 (4,231,976 parameters for 1000 classes). Its final
    AvgPool2d(7) is a global average pool here, which equals it at 224 and works at other sizes."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        self.arch = "mobilenet_v1"
        self.num_classes = num_classes
        self.image_size = _checked_size(image_size)
        layers, in_channels, strides = [], 3, []
        for index, (out_channels, stride) in enumerate(_MOBILENET_V1_LAYERS):
            make = _conv_bn_relu if index == 0 else _depthwise_separable
            layers.append(make(in_channels, out_channels, stride))
            in_channels = out_channels
            strides.append(stride)
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        self.stage_channels = tuple(_MOBILENET_V1_LAYERS[index][0] for index in _MOBILENET_V1_STAGES)
        self.stage_sizes = tuple(_halved(image_size, strides[:index + 1].count(2)) for index in _MOBILENET_V1_STAGES)
        self.embedding_dim = in_channels

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        stages, preact = [], []
        for index, block in enumerate(self.model):
            if index in _MOBILENET_V1_STAGES and with_preact:
                before = block[:-1](x)  # all but the block's in-place ReLU, so `before` is kept
                x = F.relu(before)
                preact.append(before)
            else:
                x = block(x)
            if index in _MOBILENET_V1_STAGES:
                stages.append(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return ModelOutputs(logits=self.fc(embedding), embedding=embedding, stages=tuple(stages),
                            preact_stages=tuple(preact) if with_preact else None)

    def preact_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return tuple(self.model[index][4] for index in _MOBILENET_V1_STAGES)


def mobilenet_v1(num_classes: int = 1000, image_size: int = 224) -> MobileNetV1:
    return MobileNetV1(num_classes, image_size)


# --- torchvision's weight files -----------------------------------------------------------------

def torchvision_weights_file(arch: str, weights: str) -> Path:
    """The file `teacher.weights` names: torchvision's weights for `arch` by their Weights enum
    member (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT), in torch's hub cache at
    torch.hub.get_dir()/checkpoints/<file name of the member's url>, where torchvision's own
    download puts it. Never downloads: when the file is not there, one line names it, its url and
    where to put it."""
    if arch not in TORCHVISION_ARCHS:
        raise KDResearchError(f"teacher.weights={weights}: torchvision has no weights for {arch} (it has them for "
                              f"{', '.join(TORCHVISION_ARCHS)}); name a file with teacher.checkpoint=FILE")
    enum = torchvision.models.get_model_weights(arch)
    if weights not in enum.__members__:
        raise KDResearchError(f"teacher.weights={weights}: torchvision's {arch} has no such weights "
                              f"(it has {', '.join(enum.__members__)})")
    url = enum[weights].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise KDResearchError(f"teacher.weights={weights}: torchvision's {arch} weights file {path.name} is not in "
                              f"torch's hub cache; download {url} and put it at {path} (nothing is "
                              f"downloaded here), or name a file with teacher.checkpoint=FILE")
    return path
