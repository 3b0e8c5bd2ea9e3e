"""The tutorial's DeepNN / LightNN: sizes, seeded initialisation, feature outputs and state_dict naming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdresearch.models import (
    DeepNN,
    LightNN,
    ModelOutputs,
    first_layer_norm,
    parameter_count,
)


# The tutorial's classes, verbatim (their forward is not needed: only layers and naming).
class TutorialDeepNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2048, 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes)
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class TutorialLightNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(1024, 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes)
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


PAIRS = [(DeepNN, TutorialDeepNN), (LightNN, TutorialLightNN)]
IDS = ["deep", "light"]


def test_parameter_counts():
    assert parameter_count(DeepNN()) == 1_186_986
    assert parameter_count(LightNN()) == 267_738


def test_first_layer_norm_at_seed_42_is_the_tutorials():
    torch.manual_seed(42)
    light = LightNN(num_classes=10)
    assert round(first_layer_norm(light), 4) == 2.3274
    # and equals torch.norm of features[0].weight, as the tutorial prints it
    assert first_layer_norm(light) == pytest.approx(torch.norm(light.features[0].weight).item())
    # Two students built after the same seed start identical (the tutorial's check).
    torch.manual_seed(42)
    assert first_layer_norm(LightNN(num_classes=10)) == first_layer_norm(light)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=IDS)
def test_seeded_init_equals_tutorial_class(ours, theirs):
    torch.manual_seed(42)
    mine = ours(num_classes=10)
    torch.manual_seed(42)
    tutorial = theirs(num_classes=10)
    for (key, a), (other, b) in zip(mine.state_dict().items(), tutorial.state_dict().items()):
        assert key == other
        assert torch.equal(a, b), key


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=IDS)
def test_state_dict_keys_and_shapes_equal_tutorials(ours, theirs):
    mine, tutorial = ours().state_dict(), theirs().state_dict()
    assert list(mine) == list(tutorial)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in tutorial.items()}
    # Checkpoints move both ways between the tutorial's classes and ours.
    ours().load_state_dict(tutorial)
    theirs().load_state_dict(mine)


def test_state_dict_key_names():
    assert list(LightNN().state_dict()) == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
    ]
    assert list(DeepNN().state_dict()) == [
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
        "features.5.weight", "features.5.bias", "features.7.weight", "features.7.bias",
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
    ]


@pytest.mark.parametrize("model_class, hidden, channels", [(DeepNN, 2048, 32), (LightNN, 1024, 16)], ids=IDS)
def test_with_features_shapes_and_same_logits(model_class, hidden, channels):
    torch.manual_seed(0)
    model = model_class().eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        out = model(images, with_features=True)
    assert isinstance(out, ModelOutputs)
    assert plain.shape == out.logits.shape == (5, 10)
    assert out.hidden.shape == (5, hidden)
    assert out.feature_map.shape == (5, channels, 8, 8)
    assert torch.equal(plain, out.logits)
    assert torch.equal(out.hidden, out.feature_map.flatten(1))
    # Every conv block is a stage; the declared shape facts agree with the real outputs.
    assert [tuple(stage.shape[1:]) for stage in out.stages] == [
        (c, s, s) for c, s in zip(model.stage_channels, model.stage_sizes)]
    assert out.stages[-1] is out.feature_map
    assert out.embedding.shape == (5, model.embedding_dim)
    assert torch.equal(out.logits, model.classifier[-1](out.embedding))
    assert (model.hidden_dim, model.stage_channels[-1], model.stage_sizes[-1]) == (hidden, channels, 8)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=IDS)
def test_logits_equal_tutorial_forward(ours, theirs):
    tutorial = theirs().eval()
    mine = ours().eval()
    mine.load_state_dict(tutorial.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(images), tutorial(images), rtol=0, atol=0)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=IDS)
def test_in_place_relus_give_the_tutorials_gradients(ours, theirs):
    # kdresearch's ReLUs work in place for speed; training must not notice.
    tutorial = theirs().train()
    mine = ours().train()
    mine.load_state_dict(tutorial.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (tutorial, mine):
        torch.manual_seed(0)  # the same dropout mask in both
        nn.functional.cross_entropy(model(images), labels).backward()
    for (name, theirs_param), mine_param in zip(tutorial.named_parameters(), mine.parameters()):
        torch.testing.assert_close(mine_param.grad, theirs_param.grad, rtol=0, atol=0, msg=name)


def test_num_classes():
    assert DeepNN(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert LightNN(num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("model_class", [LightNN, DeepNN])
def test_tutorial_networks_pool_before_relu_is_the_same_function(model_class):
    """outputs() pools before the ReLU that precedes each max-pool (faster); values and
    gradients equal the literal layer order's bit for bit."""
    torch.manual_seed(0)
    fast, literal = model_class(), model_class()
    literal.load_state_dict(fast.state_dict())
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)  # the same dropout masks
    out = fast(images, with_features=True)
    torch.manual_seed(1)
    reference = literal.classifier(torch.flatten(literal.features(images), 1))
    assert torch.equal(out.logits, reference)
    out.logits.square().sum().backward()
    reference.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), literal.parameters()):
        assert torch.equal(a.grad, b.grad), name
    pooled = [torch.flatten(literal.features[:index + 1](images), 1) for index, layer in enumerate(literal.features)
              if isinstance(layer, torch.nn.MaxPool2d)]
    assert all(torch.equal(torch.flatten(stage, 1), ref) for stage, ref in zip(out.stages, pooled))
