"""The CIFAR benchmark networks (kdresearch.architectures): sizes, shape facts, feature outputs,
RepDistiller/mdistiller `state_dict` naming and their Hydra configs.

The key lists below were checked against the suites' model definitions (RepDistiller models/*.py,
mdistiller mdistiller/models/cifar/*.py); the exact parameter counts equal those of the suites'
networks built for 100 classes.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdresearch.models import ModelOutputs, Network, parameter_count

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"

# config name -> (module, embedding_dim, stage_channels, stage_sizes, parameters for 100 classes)
ARCHITECTURES = {
    "resnet8": ("resnet", 64, (16, 32, 64), (32, 16, 8), 83_892),
    "resnet14": ("resnet", 64, (16, 32, 64), (32, 16, 8), 181_108),
    "resnet20": ("resnet", 64, (16, 32, 64), (32, 16, 8), 278_324),
    "resnet32": ("resnet", 64, (16, 32, 64), (32, 16, 8), 472_756),
    "resnet44": ("resnet", 64, (16, 32, 64), (32, 16, 8), 667_188),
    "resnet56": ("resnet", 64, (16, 32, 64), (32, 16, 8), 861_620),
    "resnet110": ("resnet", 64, (16, 32, 64), (32, 16, 8), 1_736_564),
    "resnet8x4": ("resnet", 256, (64, 128, 256), (32, 16, 8), 1_233_540),
    "resnet32x4": ("resnet", 256, (64, 128, 256), (32, 16, 8), 7_433_860),
    "wrn_16_1": ("wrn", 64, (16, 32, 64), (32, 16, 8), 180_916),
    "wrn_16_2": ("wrn", 128, (32, 64, 128), (32, 16, 8), 703_284),
    "wrn_40_1": ("wrn", 64, (16, 32, 64), (32, 16, 8), 569_780),
    "wrn_40_2": ("wrn", 128, (32, 64, 128), (32, 16, 8), 2_255_156),
    "vgg8": ("vgg", 512, (128, 256, 512, 512), (16, 8, 4, 4), 3_965_028),
    "vgg11": ("vgg", 512, (128, 256, 512, 512), (16, 8, 4, 4), 9_277_284),
    "vgg13": ("vgg", 512, (128, 256, 512, 512), (16, 8, 4, 4), 9_462_180),
    "MobileNetV2": ("mobilenetv2", 1280, (12, 16, 48, 160), (16, 8, 4, 2), 812_836),
    "ShuffleV1": ("shufflenetv1", 960, (240, 480, 960), (16, 8, 4), 949_258),
    "ShuffleV2": ("shufflenetv2", 1024, (116, 232, 464), (16, 8, 4), 1_355_528),
}

# Millions of parameters for 100 classes as the papers' tables print them (CRD, Tian et al. 2020,
# and the papers that reuse its setup).
PUBLISHED_MILLIONS = {
    "resnet20": 0.28, "resnet56": 0.86, "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
}


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def make(name: str, num_classes: int = 100) -> Network:
    module = importlib.import_module(f"kdresearch.architectures.{ARCHITECTURES[name][0]}")
    return getattr(module, name)(num_classes=num_classes)


_cache: dict[str, Network] = {}


def model100(name: str) -> Network:
    """The 100-class model of `name`, built once and shared by the tests of this module."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = make(name)
    return _cache[name]


def bn(prefix: str) -> list[str]:
    """The five state_dict entries of a BatchNorm2d."""
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_count_for_100_classes(name):
    assert parameter_count(model100(name)) == ARCHITECTURES[name][4]


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_published_parameter_counts(name):
    millions = parameter_count(model100(name)) / 1e6
    if name == "vgg8":
        # 3,965,028 (the suites' vgg8_bn) is printed as 3.96 in the tables: truncated, not rounded.
        assert int(millions * 100) / 100 == PUBLISHED_MILLIONS[name]
        assert round(millions, 2) == 3.97
    else:
        assert round(millions, 2) == PUBLISHED_MILLIONS[name]


# --- contract: shape facts and outputs ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_declared_shape_facts(name):
    model = model100(name)
    _, embedding_dim, stage_channels, stage_sizes, _ = ARCHITECTURES[name]
    assert isinstance(model, Network)
    assert model.arch == name
    assert model.num_classes == 100
    assert model.embedding_dim == embedding_dim
    assert model.stage_channels == stage_channels and isinstance(model.stage_channels, tuple)
    assert model.stage_sizes == stage_sizes and isinstance(model.stage_sizes, tuple)
    assert model.describe().startswith(f"{name} (stages {stage_channels[0]}x{stage_sizes[0]}x{stage_sizes[0]}")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_outputs_match_declared_shapes(name):
    model = model100(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        out = model(x, with_features=True)
    assert isinstance(out, ModelOutputs)
    assert logits.shape == (2, 100)
    assert torch.equal(out.logits, logits)  # with_features changes nothing
    assert out.embedding.shape == (2, model.embedding_dim)
    last_linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.allclose(last_linear(out.embedding), logits)  # the embedding is the head's input
    assert [tuple(s.shape) for s in out.stages] == [
        (2, c, size, size) for c, size in zip(model.stage_channels, model.stage_sizes)]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_ten_classes(name):
    model = make(name, num_classes=10)
    assert model.num_classes == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_in_place_relus_leave_outputs_intact(name, monkeypatch):
    """No in-place op may overwrite a stage after it was handed out: the outputs equal those of the
    same network with every ReLU out of place. Training mode, so gradients flow through all; a
    16x16 input (every network here accepts it) keeps the backward pass cheap."""
    model = model100(name).train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x, with_features=True)
    # autograd raises here if an in-place op overwrote a tensor some backward needs
    (out.logits.sum() + out.embedding.sum() + sum(s.sum() for s in out.stages)).backward()
    model.zero_grad(set_to_none=True)

    model.load_state_dict(state)  # same BN running statistics as before the first pass
    monkeypatch.setattr(torch.nn.functional, "relu", lambda t, inplace=False: torch.relu(t))
    with torch.no_grad():
        reference = model(x, with_features=True)
    for got, expected in zip((out.logits, out.embedding, *out.stages),
                             (reference.logits, reference.embedding, *reference.stages)):
        assert torch.equal(got.detach(), expected)


# --- state_dict naming (the suites' checkpoints load with a strict load_state_dict) --------------


def resnet_block_keys(prefix: str, downsample: bool) -> list[str]:
    keys = [f"{prefix}.conv1.weight", *bn(f"{prefix}.bn1"), f"{prefix}.conv2.weight", *bn(f"{prefix}.bn2")]
    if downsample:
        keys += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
    return keys


def test_resnet8_keys():
    expected = [
        "conv1.weight", *bn("bn1"),
        "layer1.0.conv1.weight", *bn("layer1.0.bn1"), "layer1.0.conv2.weight", *bn("layer1.0.bn2"),
        "layer2.0.conv1.weight", *bn("layer2.0.bn1"), "layer2.0.conv2.weight", *bn("layer2.0.bn2"),
        "layer2.0.downsample.0.weight", *bn("layer2.0.downsample.1"),
        "layer3.0.conv1.weight", *bn("layer3.0.bn1"), "layer3.0.conv2.weight", *bn("layer3.0.bn2"),
        "layer3.0.downsample.0.weight", *bn("layer3.0.downsample.1"),
        "fc.weight", "fc.bias",
    ]
    assert list(model100("resnet8").state_dict()) == expected


def test_resnet_keys_of_the_wide_variant():
    # resnet8x4: the stem (32) differs from layer1 (64), so layer1.0 gets a downsample too.
    expected = ["conv1.weight", *bn("bn1")]
    expected += resnet_block_keys("layer1.0", True) + resnet_block_keys("layer2.0", True)
    expected += resnet_block_keys("layer3.0", True) + ["fc.weight", "fc.bias"]
    state = model100("resnet8x4").state_dict()
    assert list(state) == expected
    assert state["layer1.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert state["fc.weight"].shape == (100, 256)


def test_resnet56_keys():
    expected = ["conv1.weight", *bn("bn1")]
    for stage in (1, 2, 3):
        for block in range(9):
            expected += resnet_block_keys(f"layer{stage}.{block}", stage > 1 and block == 0)
    expected += ["fc.weight", "fc.bias"]
    assert list(model100("resnet56").state_dict()) == expected


def test_wrn_16_1_keys():
    expected = [
        "conv1.weight",
        # block1: 16 -> 16 channels, identity shortcuts only
        *bn("block1.layer.0.bn1"), "block1.layer.0.conv1.weight", *bn("block1.layer.0.bn2"),
        "block1.layer.0.conv2.weight",
        *bn("block1.layer.1.bn1"), "block1.layer.1.conv1.weight", *bn("block1.layer.1.bn2"),
        "block1.layer.1.conv2.weight",
        *bn("block2.layer.0.bn1"), "block2.layer.0.conv1.weight", *bn("block2.layer.0.bn2"),
        "block2.layer.0.conv2.weight", "block2.layer.0.convShortcut.weight",
        *bn("block2.layer.1.bn1"), "block2.layer.1.conv1.weight", *bn("block2.layer.1.bn2"),
        "block2.layer.1.conv2.weight",
        *bn("block3.layer.0.bn1"), "block3.layer.0.conv1.weight", *bn("block3.layer.0.bn2"),
        "block3.layer.0.conv2.weight", "block3.layer.0.convShortcut.weight",
        *bn("block3.layer.1.bn1"), "block3.layer.1.conv1.weight", *bn("block3.layer.1.bn2"),
        "block3.layer.1.conv2.weight",
        *bn("bn1"), "fc.weight", "fc.bias",
    ]
    assert list(model100("wrn_16_1").state_dict()) == expected


def test_wrn_widened_first_block_has_a_shortcut():
    state = model100("wrn_40_2").state_dict()
    assert state["block1.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
    assert [k for k in state if "convShortcut" in k] == [
        "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
        "block3.layer.0.convShortcut.weight"]
    assert len(state) == 227 and list(state)[-7:] == [*bn("bn1"), "fc.weight", "fc.bias"]


def test_vgg8_keys():
    expected = []
    for block in range(5):
        expected += [f"block{block}.0.weight", f"block{block}.0.bias", *bn(f"block{block}.1")]
    expected += ["classifier.weight", "classifier.bias"]
    assert list(model100("vgg8").state_dict()) == expected


def test_vgg13_keys():
    # two convs per block: conv (0), BN (1), ReLU (2), conv (3), BN (4); the block's last ReLU is
    # applied outside it, as in the suites
    expected = []
    for block in range(5):
        expected += [f"block{block}.0.weight", f"block{block}.0.bias", *bn(f"block{block}.1"),
                     f"block{block}.3.weight", f"block{block}.3.bias", *bn(f"block{block}.4")]
    expected += ["classifier.weight", "classifier.bias"]
    state = model100("vgg13").state_dict()
    assert list(state) == expected
    assert state["block4.3.weight"].shape == (512, 512, 3, 3)


def test_mobilenetv2_keys():
    expected = ["conv1.0.weight", *bn("conv1.1")]
    for group, num_blocks in enumerate((1, 2, 3, 4, 3, 3, 1)):
        for block in range(num_blocks):
            p = f"blocks.{group}.{block}.conv"
            expected += [f"{p}.0.weight", *bn(f"{p}.1"), f"{p}.3.weight", *bn(f"{p}.4"),
                         f"{p}.6.weight", *bn(f"{p}.7")]
    expected += ["conv2.0.weight", *bn("conv2.1"), "classifier.0.weight", "classifier.0.bias"]
    state = model100("MobileNetV2").state_dict()
    assert len(expected) == 320
    assert list(state) == expected
    assert list(state)[:8] == [
        "conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.1.running_mean",
        "conv1.1.running_var", "conv1.1.num_batches_tracked", "blocks.0.0.conv.0.weight",
        "blocks.0.0.conv.1.weight"]
    assert list(state)[-4:] == [
        "conv2.1.running_var", "conv2.1.num_batches_tracked", "classifier.0.weight", "classifier.0.bias"]
    shapes = {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
              "blocks.1.0.conv.0.weight": (48, 8, 1, 1), "blocks.1.0.conv.3.weight": (48, 1, 3, 3),
              "blocks.6.0.conv.6.weight": (160, 480, 1, 1), "conv2.0.weight": (1280, 160, 1, 1),
              "classifier.0.weight": (100, 1280)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_shufflenetv1_keys():
    def unit(p):
        return [f"{p}.conv1.weight", *bn(f"{p}.bn1"), f"{p}.conv2.weight", *bn(f"{p}.bn2"),
                f"{p}.conv3.weight", *bn(f"{p}.bn3")]

    expected = ["conv1.weight", *bn("bn1")]
    for stage, num_units in zip((1, 2, 3), (4, 8, 4)):
        for index in range(num_units):
            expected += unit(f"layer{stage}.{index}")
    expected += ["linear.weight", "linear.bias"]
    state = model100("ShuffleV1").state_dict()
    assert len(expected) == 296
    assert list(state) == expected
    assert list(state)[:7] == ["conv1.weight", *bn("bn1"), "layer1.0.conv1.weight"]
    assert list(state)[-3:] == ["layer3.3.bn3.num_batches_tracked", "linear.weight", "linear.bias"]
    shapes = {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),  # dense
              "layer1.0.conv3.weight": (216, 18, 1, 1), "layer1.1.conv1.weight": (60, 80, 1, 1),
              "layer2.0.conv1.weight": (60, 80, 1, 1), "layer3.3.conv3.weight": (960, 80, 1, 1),
              "linear.weight": (100, 960)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_shufflenetv2_keys():
    def down(p):
        keys = []
        for i in range(1, 6):
            keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
        return keys

    def basic(p):
        return [f"{p}.conv1.weight", *bn(f"{p}.bn1"), f"{p}.conv2.weight", *bn(f"{p}.bn2"),
                f"{p}.conv3.weight", *bn(f"{p}.bn3")]

    expected = ["conv1.weight", *bn("bn1")]
    for stage, num_units in zip((1, 2, 3), (3, 7, 3)):
        expected += down(f"layer{stage}.0")
        for index in range(1, num_units + 1):
            expected += basic(f"layer{stage}.{index}")
    expected += ["conv2.weight", *bn("bn2"), "linear.weight", "linear.bias"]
    state = model100("ShuffleV2").state_dict()
    assert len(expected) == 338
    assert list(state) == expected
    assert list(state)[-8:] == ["conv2.weight", *bn("bn2"), "linear.weight", "linear.bias"]
    shapes = {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv2.weight": (58, 24, 1, 1),
              "layer1.0.conv4.weight": (58, 1, 3, 3), "layer1.1.conv1.weight": (58, 58, 1, 1),
              "layer3.3.conv3.weight": (232, 232, 1, 1), "conv2.weight": (1024, 464, 1, 1),
              "linear.weight": (100, 1024)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_state_dict_round_trip_is_strict():
    """A saved state_dict loads strictly into a freshly built model of the same name."""
    for name in ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"):
        make(name).load_state_dict(model100(name).state_dict(), strict=True)


# --- Hydra configs ------------------------------------------------------------------------------


def test_every_architecture_has_a_config():
    assert set(ARCHITECTURES) <= {path.stem for path in CONF_MODEL.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(CONF_MODEL.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_config_instantiates(path):
    """Every model config builds (as trainer.build does) with `data.num_classes` substituted."""
    node = OmegaConf.load(path)
    cfg = OmegaConf.create({"data": {"num_classes": 7}, "model": node})
    params = OmegaConf.to_container(cfg.model, resolve=True)
    params.pop("name")  # the short name is for run names, not for the constructor
    model = instantiate(params)
    assert isinstance(model, Network)
    if OmegaConf.to_container(node)["num_classes"] == "${data.num_classes}":
        assert model.num_classes == 7
    if path.stem in ARCHITECTURES:
        assert node.name == path.stem and model.arch == path.stem and model.num_classes == 7
        assert parameter_count(model) == ARCHITECTURES[path.stem][4] - 93 * (model.embedding_dim + 1)
