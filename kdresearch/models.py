"""The model contract every network follows, and the tutorial's two networks (DeepNN, LightNN).

Contract (`Network`): `model(x)` returns logits; `model(x, with_features=True)` returns
`ModelOutputs` from the same forward pass: the logits, the pooled penultimate `embedding` (the
input of the last linear layer), the feature map after every stage (`stages`, post-activation),
for the tutorial nets the flattened conv output `hidden` that the cosine loss reads, and the
stages before their final ReLU (`preact_stages`, the suites' `preact=True` / `preact_feats`, which
OFD, ReviewKD and AB read). Every network here offers them, and computes them only when features
are asked for: the plain forward keeps its in-place ReLUs, while a forward with features applies
each stage's final ReLU out of place so the pre-activation map survives (values are the same).
Shape facts are class/instance attributes known before any forward pass, so a loss can size its
connectors and refuse a bad student/teacher pair before training starts:
`num_classes`, `embedding_dim`, `stage_channels` and `stage_sizes` (spatial side of each stage's
map for an `image_size` x `image_size` input: 32 for the tutorial nets and the CIFAR networks).
The pre-activation stages have exactly the stages' shapes, so the same facts describe them.
`preact_norms()` names the BatchNorm layer each pre-activation stage comes out of (the suites'
`get_bn_before_relu`), whose weight and bias OFD reads as the pre-activation's std and mean; None
for networks without one (the tutorial nets, the ShuffleNets, as in the suites).
The benchmark networks live in `kdresearch.architectures`.

The tutorial nets' layer definitions and `state_dict` keys are exactly the tutorial's, so a
checkpoint trained here loads into the tutorial's classes and vice versa. Their stages are the two
conv blocks (each ends with a max-pool); a block's pre-activation stage is its max-pooled last conv
output, before the ReLU (the two commute). The ReLUs work in place (the tutorial's do not): no
layer's backward needs a ReLU's input, and skipping one fresh activation tensor per ReLU makes a
DeepNN training step ~5-10 % faster on CPU. Results are the same.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ModelOutputs(NamedTuple):
    """What a forward pass with `with_features=True` hands to a loss. In cached teacher outputs only
    the fields the loss asked for are present (the others are None, unneeded stages too)."""

    logits: Optional[torch.Tensor] = None  # (N, num_classes)
    embedding: Optional[torch.Tensor] = None  # (N, embedding_dim): input of the last linear layer
    stages: Optional[tuple[Optional[torch.Tensor], ...]] = None  # per stage (N, C_i, H_i, W_i)
    hidden: Optional[torch.Tensor] = None  # the last stage flattened (N, hidden_dim); for the tutorial
    # nets this is their flattened conv output, the cosine loss's input
    preact_stages: Optional[tuple[Optional[torch.Tensor], ...]] = None  # the stages before their final
    # ReLU (the suites' `preact_feats`), same shapes as `stages`

    @property
    def feature_map(self) -> Optional[torch.Tensor]:
        """The last stage's map (the tutorial regressor's input)."""
        return self.stages[-1] if self.stages else None


# Field names a loss may ask of the teacher: "logits", "embedding", "hidden", "stage<i>" or
# "preact_stage<i>" (i counts from 0; negative counts from the last stage, e.g. "stage-1").
_STAGE_PREFIXES = {"stage": "stages", "preact_stage": "preact_stages"}  # field prefix -> ModelOutputs field


def stage_field(index: int) -> str:
    return f"stage{index}"


def preact_field(index: int) -> str:
    """The field of stage `index` before its final ReLU."""
    return f"preact_stage{index}"


def _stage_of(field: str) -> Optional[tuple[str, int]]:
    """("stages" or "preact_stages", index) for a stage field, None for the others."""
    for prefix, name in _STAGE_PREFIXES.items():
        if field.startswith(prefix) and field[len(prefix):].lstrip("-").isdigit():
            return name, int(field[len(prefix):])
    return None


def field_stage_index(field: str) -> Optional[int]:
    """The stage a "stage<i>" or "preact_stage<i>" field holds (both have that stage's shape), else None."""
    stage = _stage_of(field)
    return None if stage is None else stage[1]


def select_fields(outputs: ModelOutputs, fields: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named fields of `outputs` as a flat dict (what the teacher-output cache stores)."""
    selected = {}
    for field in fields:
        stage = _stage_of(field)
        selected[field] = getattr(outputs, field) if stage is None else getattr(outputs, stage[0])[stage[1]]
    return selected


def assemble_outputs(fields: dict[str, torch.Tensor], num_stages: int) -> ModelOutputs:
    """Inverse of `select_fields`: a ModelOutputs holding just these fields (others None)."""
    stages: dict[str, list[Optional[torch.Tensor]]] = {}
    plain = {}
    for field, value in fields.items():
        stage = _stage_of(field)
        if stage is None:
            plain[field] = value
        else:
            stages.setdefault(stage[0], [None] * num_stages)[stage[1]] = value
    stages.setdefault("stages", [None] * num_stages)
    return ModelOutputs(**{name: tuple(values) for name, values in stages.items()}, **plain)


def run_stage(blocks: nn.Sequential, x: torch.Tensor, preact: Optional[list]) -> torch.Tensor:
    """A stage of blocks; with a `preact` list, its last block runs `forward_keeping_preact` (which
    applies the final ReLU out of place) and the map before that ReLU is appended to `preact`."""
    if preact is None:
        return blocks(x)
    for block in blocks[:-1]:
        x = block(x)
    x, before = blocks[-1].forward_keeping_preact(x)
    preact.append(before)
    return x


class Network(nn.Module):
    """Base of every model: subclasses set the shape facts and implement `outputs(x)`."""

    num_classes: int
    embedding_dim: int
    stage_channels: tuple[int, ...]
    stage_sizes: tuple[int, ...]  # for image_size x image_size inputs
    image_size: int = 32  # the input side the shape facts are for

    def outputs(self, x: torch.Tensor, with_preact: bool = False) -> ModelOutputs:
        """The forward pass; `preact_stages` only `with_preact` (it costs out-of-place ReLUs)."""
        raise NotImplementedError

    def preact_norms(self) -> Optional[tuple[nn.BatchNorm2d, ...]]:
        """The BatchNorm each pre-activation stage comes out of, one per stage (module docstring);
        None where the network has none."""
        return None

    @property
    def hidden_dim(self) -> int:
        """Size of the flattened last stage (the cosine loss's `hidden`)."""
        return self.stage_channels[-1] * self.stage_sizes[-1] ** 2

    def forward(self, x: torch.Tensor, with_features: bool = False):
        out = self.outputs(x, with_preact=with_features)
        if not with_features:
            return out.logits
        if out.hidden is None:  # a view, free: every model offers the cosine loss its input
            out = out._replace(hidden=torch.flatten(out.stages[-1], 1))
        return out

    def describe(self) -> str:
        """One-line shape summary for error messages, e.g. 'resnet8x4 (stages 64x32x32, 128x16x16, ...)'."""
        stages = ", ".join(f"{c}x{s}x{s}" for c, s in zip(self.stage_channels, self.stage_sizes))
        name = model_name(self)
        return f"{name} (stages {stages}; embedding {self.embedding_dim}; {self.num_classes} classes)"


class _ConvClassifier(Network):
    """Shared forward of both tutorial networks: `features` -> flatten -> `classifier`."""

    features: nn.Sequential
    classifier: nn.Sequential

    def outputs(self, x, with_preact=False):
        stages, preact = [], []
        layers = list(self.features)
        position = 0
        while position < len(layers):
            layer = layers[position]
            following = layers[position + 1] if position + 1 < len(layers) else None
            if isinstance(layer, nn.ReLU) and isinstance(following, nn.MaxPool2d):
                # Each conv block ends with ReLU then max-pool. Both are monotone, so pooling first
                # gives bit-identical values and gradients with a quarter of the ReLU's work
                # (LightNN's training step: 22 -> 14 ms on 2 CPU cores, batch 128).
                pooled = following(x)
                if with_preact:
                    preact.append(pooled)
                    x = F.relu(pooled)  # out of place: `pooled` is kept
                else:
                    x = layer(pooled)
                stages.append(x)
                position += 2
            else:
                x = layer(x)
                position += 1
        hidden = torch.flatten(x, 1)
        embedding = self.classifier[:-1](hidden)
        return ModelOutputs(self.classifier[-1](embedding), embedding, tuple(stages), hidden,
                            tuple(preact) if with_preact else None)


class DeepNN(_ConvClassifier):
    """The tutorial's teacher: 4 conv layers, 1,186,986 parameters for 10 classes."""

    embedding_dim = 512
    stage_channels = (64, 32)
    stage_sizes = (16, 8)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2048, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(_ConvClassifier):
    """The tutorial's student: 2 conv layers, 267,738 parameters for 10 classes."""

    embedding_dim = 256
    stage_channels = (16, 16)
    stage_sizes = (16, 8)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(1024, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )


def model_name(model: nn.Module) -> str:
    """The architecture's name as configs spell it (`arch`, e.g. resnet8x4), else the class name."""
    return getattr(model, "arch", type(model).__name__)


def first_layer(model: nn.Module) -> nn.Conv2d:
    """The first convolution in definition order: every model here starts with one."""
    return next(module for module in model.modules() if isinstance(module, nn.Conv2d))


def first_layer_norm(model: nn.Module) -> float:
    """Norm of the first conv's weight: the tutorial's check that two students start identical."""
    return torch.linalg.vector_norm(first_layer(model).weight.detach()).item()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
