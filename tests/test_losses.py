"""Each loss of kdresearch.losses against the PyTorch KD tutorial's own formula, written out
literally here, on random tensors; plus the losses' validation and model-compatibility checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.ce import CrossEntropy, MultiMargin
from kdresearch.losses.cosine import CosineHidden
from kdresearch.losses.kd import SoftTargetKD
from kdresearch.losses.regressor import RegressorMSE
from kdresearch.models import DeepNN, LightNN, ModelOutputs

N, C = 16, 10


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def labels_for(gen, n=N, classes=C):
    return torch.randint(0, classes, (n,), generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=rtol)


# --- cross-entropy ------------------------------------------------------------------------------

def test_cross_entropy_is_plain_ce(gen):
    logits, labels = randn(gen, N, C), labels_for(gen)
    loss = CrossEntropy()
    total, parts = loss(ModelOutputs(logits), None, labels)
    close(total, nn.CrossEntropyLoss()(logits, labels))
    assert set(parts) == {"ce"}
    close(parts["ce"], total)
    assert not loss.needs_teacher and not loss.student_features
    assert list(loss.parameters()) == []


# --- soft-target KD (the tutorial's train_knowledge_distillation) ----------------------------

def tutorial_kd(student_logits, teacher_logits, labels, T, soft_target_loss_weight=0.25, ce_loss_weight=0.75):
    """The tutorial's lines, verbatim."""
    soft_targets = nn.functional.softmax(teacher_logits / T, dim=-1)
    soft_prob = nn.functional.log_softmax(student_logits / T, dim=-1)
    soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T**2)
    label_loss = nn.CrossEntropyLoss()(student_logits, labels)
    loss = soft_target_loss_weight * soft_targets_loss + ce_loss_weight * label_loss
    return loss, soft_targets_loss, label_loss


@pytest.mark.parametrize("T", [1, 2, 4, 8, 0.5, 3.7])
def test_kd_matches_tutorial_formula(gen, T):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    expected_total, expected_kd, expected_ce = tutorial_kd(student, teacher, labels, T)

    loss = SoftTargetKD(T=T)
    total, parts = loss(ModelOutputs(student), ModelOutputs(teacher), labels)
    assert set(parts) == {"ce", "kd"}
    close(parts["kd"], expected_kd)
    close(parts["ce"], expected_ce)
    close(total, expected_total)
    # The default weights are the tutorial's 0.75 CE / 0.25 soft targets.
    close(total, 0.75 * expected_ce + 0.25 * expected_kd)


def test_kd_custom_weights(gen):
    student, teacher, labels = randn(gen, N, C), randn(gen, N, C), labels_for(gen)
    expected_total, _, _ = tutorial_kd(student, teacher, labels, T=4, soft_target_loss_weight=0.6, ce_loss_weight=0.4)
    total, _ = SoftTargetKD(T=4, ce_weight=0.4, distill_weight=0.6)(ModelOutputs(student), ModelOutputs(teacher), labels)
    close(total, expected_total)


def test_kd_gradient_matches_tutorial(gen):
    student, teacher, labels = randn(gen, N, C, scale=2), randn(gen, N, C, scale=2), labels_for(gen)
    mine = student.clone().requires_grad_(True)
    theirs = student.clone().requires_grad_(True)
    SoftTargetKD(T=2)(ModelOutputs(mine), ModelOutputs(teacher), labels)[0].backward()
    tutorial_kd(theirs, teacher, labels, 2)[0].backward()
    close(mine.grad, theirs.grad)


def test_kd_is_zero_when_student_equals_teacher(gen):
    logits, labels = randn(gen, N, C), labels_for(gen)
    _, parts = SoftTargetKD(T=2)(ModelOutputs(logits), ModelOutputs(logits.clone()), labels)
    assert abs(parts["kd"].item()) < 1e-6


def test_kd_stays_finite_at_low_temperature(gen):
    # softmax(t/T).log() underflows to log(0) = -inf here; the module's log_softmax form does not.
    student, teacher, labels = randn(gen, N, C, scale=50), randn(gen, N, C, scale=50), labels_for(gen)
    total, parts = SoftTargetKD(T=0.05)(ModelOutputs(student), ModelOutputs(teacher), labels)
    assert math.isfinite(total.item()) and math.isfinite(parts["kd"].item())
    assert parts["kd"].item() >= 0


def test_kd_declares_what_it_needs():
    loss = SoftTargetKD()
    assert loss.needs_teacher and loss.teacher_fields == ("logits",)
    assert not loss.student_features


# --- cosine (the tutorial's train_cosine_loss) --------------------------------------------------

def test_cosine_matches_tutorial_formula(gen):
    student_hidden = randn(gen, N, 1024)
    teacher_hidden = randn(gen, N, 2048).relu()  # post-ReLU features, like the real ones
    labels, logits = labels_for(gen), randn(gen, N, C)

    # The tutorial: ModifiedDeepNNCosine pools its 2048-d flattened output with avg_pool1d(., 2),
    # then CosineEmbeddingLoss with a target of ones.
    pooled = torch.nn.functional.avg_pool1d(teacher_hidden, 2)
    hidden_rep_loss = nn.CosineEmbeddingLoss()(student_hidden, pooled, target=torch.ones(N))
    label_loss = nn.CrossEntropyLoss()(logits, labels)
    expected = 0.25 * hidden_rep_loss + 0.75 * label_loss

    loss = CosineHidden()
    total, parts = loss(ModelOutputs(logits, hidden=student_hidden), ModelOutputs(None, hidden=teacher_hidden), labels)
    assert set(parts) == {"ce", "cosine"}
    close(parts["cosine"], hidden_rep_loss)
    close(parts["ce"], label_loss)
    close(total, expected)
    assert loss.needs_teacher and loss.teacher_fields == ("hidden",) and loss.student_features


def test_cosine_on_real_model_features(gen):
    torch.manual_seed(0)
    student, teacher = LightNN().eval(), DeepNN().eval()
    images, labels = randn(gen, 4, 3, 32, 32), labels_for(gen, 4)
    with torch.no_grad():
        s, t = student(images, with_features=True), teacher(images, with_features=True)
    expected = nn.CosineEmbeddingLoss()(s.hidden, F.avg_pool1d(t.hidden, 2), torch.ones(4))
    _, parts = CosineHidden()(s, t, labels)
    close(parts["cosine"], expected)


# --- regressor (the tutorial's hint loss) ------------------------------------------------------

def test_regressor_matches_tutorial_formula(gen):
    student_map, teacher_map = randn(gen, N, 16, 8, 8), randn(gen, N, 32, 8, 8)
    logits, labels = randn(gen, N, C), labels_for(gen)

    loss = RegressorMSE()
    loss.bind(LightNN(), DeepNN())  # sized from the pair: 16 -> 32, as the tutorial's
    # The tutorial's regressor, with the loss module's weights copied in.
    regressor = nn.Conv2d(16, 32, kernel_size=3, padding=1)
    regressor.load_state_dict(loss.regressor.state_dict())
    feature_loss = nn.MSELoss()(regressor(student_map), teacher_map)
    label_loss = nn.CrossEntropyLoss()(logits, labels)

    total, parts = loss(ModelOutputs(logits, stages=(None, student_map)), ModelOutputs(None, stages=(None, teacher_map)), labels)
    assert set(parts) == {"ce", "regressor"}
    close(parts["regressor"], feature_loss)
    close(parts["ce"], label_loss)
    close(total, 0.25 * feature_loss + 0.75 * label_loss)
    assert loss.needs_teacher and loss.teacher_fields == ("stage1",) and loss.student_features


def test_regressor_owns_a_trainable_conv(gen):
    loss = RegressorMSE()
    assert loss.needs_teacher and list(loss.parameters()) == []  # nothing before the pair is known
    loss.bind(LightNN(), DeepNN())
    conv = loss.regressor
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (16, 32, (3, 3), (1, 1))
    params = list(loss.parameters())
    assert {id(p) for p in params} == {id(conv.weight), id(conv.bias)}
    assert sum(p.numel() for p in params) == 32 * 16 * 9 + 32
    assert all(p.requires_grad for p in params)
    assert set(loss.state_dict()) == {"regressor.weight", "regressor.bias"}

    student_map = randn(gen, 4, 16, 8, 8)
    _, parts = loss(ModelOutputs(randn(gen, 4, C), stages=(student_map,)),
                    ModelOutputs(None, stages=(randn(gen, 4, 32, 8, 8),)), labels_for(gen, 4))
    parts["regressor"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# --- MultiMarginLoss ----------------------------------------------------------------------------

def literal_multimargin(x, y, p, margin, weight):
    """The docs' formula: per sample sum_{i != y} w[y] * max(0, margin - x[y] + x[i])^p / C, batch mean."""
    n, classes = x.shape
    total = 0.0
    for row in range(n):
        target = y[row].item()
        w = 1.0 if weight is None else weight[target]
        for i in range(classes):
            if i != target:
                total += w * max(0.0, margin - x[row, target].item() + x[row, i].item()) ** p / classes
    return total / n


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.5])
@pytest.mark.parametrize("weight", [None, [1, 1, 1, 1, 1, 1, 1, 1, 1, 2], [0.5, 2, 1, 0, 1, 3, 1, 1, 1, 1]])
def test_multimargin_matches_torch(gen, p, margin, weight):
    logits, labels = randn(gen, N, C), labels_for(gen)
    reference = nn.MultiMarginLoss(p=p, margin=margin,
                                   weight=None if weight is None else torch.tensor(weight, dtype=torch.float))
    loss = MultiMargin(p=p, margin=margin, weight=weight)
    loss.bind(LightNN(), None)
    total, parts = loss(ModelOutputs(logits), None, labels)
    assert set(parts) == {"multimargin"}
    close(total, reference(logits, labels))
    close(total, torch.tensor(literal_multimargin(logits, labels, p, margin, weight), dtype=torch.float))
    assert not loss.needs_teacher


def test_multimargin_rejects_bad_options():
    with pytest.raises(KDResearchError, match="loss.p=3"):
        MultiMargin(p=3)
    with pytest.raises(KDResearchError, match="loss.margin"):
        MultiMargin(margin=0)
    with pytest.raises(KDResearchError, match="loss.weight"):
        MultiMargin(weight=[1, -1, 1])
    with pytest.raises(KDResearchError, match="loss.weight has 3 entries but the model has 10 classes"):
        MultiMargin(weight=[1, 1, 1]).bind(LightNN(), None)


# --- validation of user-typed hyperparameters ---------------------------------------------------

@pytest.mark.parametrize("T, message", [
    (0, "T must be > 0, got 0"),
    (-1, "T must be > 0, got -1"),
    ("abc", "T must be a number, got 'abc'"),
    (True, "T must be a number, got True"),
    (float("nan"), "T must be finite"),
    (float("inf"), "T must be finite"),
])
def test_kd_rejects_bad_temperature(T, message):
    with pytest.raises(KDResearchError) as raised:
        SoftTargetKD(T=T)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("make", [
    lambda **kw: SoftTargetKD(T=2, **kw),
    lambda **kw: CosineHidden(**kw),
    lambda **kw: RegressorMSE(**kw),
], ids=["kd", "cosine", "regressor"])
@pytest.mark.parametrize("key, value, message", [
    ("ce_weight", -0.5, "loss.ce_weight must be >= 0, got -0.5"),
    ("distill_weight", -1, "loss.distill_weight must be >= 0, got -1"),
    ("distill_weight", "x", "loss.distill_weight must be a number, got 'x'"),
])
def test_weighted_losses_reject_bad_weights(make, key, value, message):
    with pytest.raises(KDResearchError) as raised:
        make(**{key: value})
    assert message in str(raised.value)


def test_zero_weights_are_allowed(gen):
    logits, teacher, labels = randn(gen, N, C), randn(gen, N, C), labels_for(gen)
    total, parts = SoftTargetKD(T=2, ce_weight=1.0, distill_weight=0.0)(ModelOutputs(logits), ModelOutputs(teacher), labels)
    close(total, parts["ce"])


# --- teacher / student compatibility ------------------------------------------------------------

def test_compatible_pairs_pass():
    student, teacher = LightNN(), DeepNN()
    for loss in (SoftTargetKD(), CosineHidden(), RegressorMSE()):
        loss.bind(student, teacher)
    CrossEntropy().bind(student, None)


def test_cosine_refuses_teacher_with_smaller_hidden():
    # DeepNN student (2048-d hidden) taught by a LightNN (1024-d): 1024 is no multiple of 2048.
    with pytest.raises(KDResearchError) as raised:
        CosineHidden().bind(DeepNN(), LightNN())
    message = str(raised.value)
    assert "loss=cosine" in message and "(1024) must be a multiple of the student's (2048)" in message
    assert "student DeepNN" in message and "teacher LightNN" in message
    assert "\n" not in message


def test_regressor_is_sized_from_any_pair():
    for student, teacher, channels in [(LightNN, LightNN, (16, 16)), (DeepNN, LightNN, (32, 16)),
                                       (DeepNN, DeepNN, (32, 32))]:
        loss = RegressorMSE()
        loss.bind(student(), teacher())
        assert (loss.regressor.in_channels, loss.regressor.out_channels) == channels


def test_regressor_refuses_maps_of_different_sizes():
    class Wide(LightNN):  # a LightNN whose last map were 16x16
        stage_sizes = (16, 16)

    with pytest.raises(KDResearchError) as raised:
        RegressorMSE().bind(Wide(), DeepNN())
    message = str(raised.value)
    assert "loss=regressor" in message and "16x16 vs 8x8" in message and "DeepNN" in message
    assert "\n" not in message


def test_kd_refuses_different_class_counts():
    with pytest.raises(KDResearchError, match=r"same classes \(100 vs 10\)"):
        SoftTargetKD().bind(LightNN(num_classes=10), DeepNN(num_classes=100))
