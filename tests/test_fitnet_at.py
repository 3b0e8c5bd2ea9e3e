"""FitNet hints and attention transfer against plain implementations of their formulas written out
here (explicit BatchNorm arithmetic, explicit loops), their sizing from the model pair, their
refusals, and one short training job each through `train.py`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, check_ok, experiment_runs, mlflow_client, train_in_process
from loss_checks import one_line
from torch import nn
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.at import AttentionTransfer, attention_map, attention_transfer
from kdresearch.losses.fitnet import FitNet
from kdresearch.models import DeepNN, LightNN, ModelOutputs, Network

N, C = 8, 10


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def labels_for(gen, n=N):
    return torch.randint(0, C, (n,), generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    """Compared in float64: the plain references below compute in float64 or Python floats."""
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


def net(name: str, channels, sizes, classes: int = C) -> Network:
    """A Network with shape facts only: `bind` never runs a forward pass."""
    cls = type(name, (Network,), {"stage_channels": tuple(channels), "stage_sizes": tuple(sizes),
                                  "embedding_dim": 64, "num_classes": classes})
    return cls()


def stages_for(gen, model: Network, n=N, relu=True):
    maps = tuple(randn(gen, n, c, s, s) for c, s in zip(model.stage_channels, model.stage_sizes))
    return tuple(m.relu() for m in maps) if relu else maps


# --- FitNet -------------------------------------------------------------------------------------

def randomise_bn(bn: nn.BatchNorm2d, gen):
    """Non-trivial affine parameters and running statistics, so the plain formula is really tested."""
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * randn(gen, bn.num_features))
        bn.bias.copy_(0.5 * randn(gen, bn.num_features))
        bn.running_mean.copy_(0.3 * randn(gen, bn.num_features))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))


def plain_hint(x, conv_kind, weight, bias, bn_weight, bn_bias, mean=None, var=None, eps=1e-5):
    """The suites' ConvReg written out: conv, BatchNorm (batch statistics, biased variance, when
    mean/var are None; else the running ones), ReLU."""
    if conv_kind == "down":
        y = F.conv2d(x, weight, bias, stride=2, padding=1)
    elif conv_kind == "up":
        y = F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    else:
        y = F.conv2d(x, weight, bias)
    if mean is None:
        mean = y.mean(dim=(0, 2, 3))
        var = ((y - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    y = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    y = y * bn_weight[None, :, None, None] + bn_bias[None, :, None, None]
    return torch.clamp(y, min=0)


@pytest.mark.parametrize("s_size, t_size, kind", [(8, 8, "same"), (16, 8, "down"), (4, 8, "up"), (10, 8, "same")],
                         ids=["equal", "student-2x", "student-half", "student-larger"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fitnet_matches_plain_formula(gen, s_size, t_size, kind, mode):
    student, teacher = net("S", (6, 12), (2 * s_size, s_size)), net("T", (9, 20), (2 * t_size, t_size))
    loss = FitNet()
    loss.bind(student, teacher)
    randomise_bn(loss.connector.bn, gen)
    loss.train(mode == "train")
    conv, bn = loss.connector.conv, loss.connector.bn
    params = [t.detach().clone() for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)]

    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    logits, labels = randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=t_stages), labels)

    stats = {} if mode == "train" else {"mean": params[4], "var": params[5]}
    hint = plain_hint(s_stages[1], kind, *params[:4], **stats)
    expected = ((hint - t_stages[1]) ** 2).sum() / t_stages[1].numel()
    ce = nn.CrossEntropyLoss()(logits, labels)
    assert set(parts) == {"ce", "fitnet"}
    close(parts["fitnet"], expected, atol=1e-5)
    close(parts["ce"], ce)
    close(total, 1.0 * ce + 100.0 * expected, atol=1e-4)
    if mode == "train":  # the batch moved the running statistics (momentum 0.1, unbiased variance)
        y = conv(s_stages[1]).detach()
        close(bn.running_mean, 0.9 * params[4] + 0.1 * y.mean(dim=(0, 2, 3)))
        close(bn.running_var, 0.9 * params[5] + 0.1 * y.var(dim=(0, 2, 3), unbiased=True))


def test_fitnet_on_real_models(gen):
    torch.manual_seed(0)
    student, teacher = LightNN().eval(), DeepNN().eval()
    loss = FitNet()
    loss.bind(student, teacher)
    images, labels = randn(gen, 4, 3, 32, 32), labels_for(gen, 4)
    with torch.no_grad():
        s, t = student(images, with_features=True), teacher(images, with_features=True)
    total, parts = loss(s, t, labels)
    assert math.isfinite(total.item()) and parts["fitnet"].item() > 0


@pytest.mark.parametrize("s_size, t_size, conv_type, kernel, stride, padding", [
    (8, 8, nn.Conv2d, 1, 1, 0),
    (16, 8, nn.Conv2d, 3, 2, 1),
    (4, 8, nn.ConvTranspose2d, 4, 2, 1),
    (12, 8, nn.Conv2d, 5, 1, 0),
    (2, 1, nn.Conv2d, 3, 2, 1),
])
def test_fitnet_bind_sizes_the_connector(gen, s_size, t_size, conv_type, kernel, stride, padding):
    student, teacher = net("S", (6, 12, 24), (32, s_size, 4)), net("T", (9, 20, 40), (32, t_size, 4))
    loss = FitNet()
    loss.bind(student, teacher)
    conv = loss.connector.conv
    assert type(conv) is conv_type
    assert (conv.in_channels, conv.out_channels) == (12, 20)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((kernel, kernel), (stride, stride), (padding, padding))
    assert loss.connector.bn.num_features == 20 and isinstance(loss.connector.relu, nn.ReLU)
    assert loss.connector(randn(gen, 2, 12, s_size, s_size)).shape == (2, 20, t_size, t_size)
    assert loss.teacher_fields == ("stage1",)


def test_fitnet_connector_trains_and_is_in_state_dict(gen):
    loss = FitNet()
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}  # nothing before the pair
    student, teacher = LightNN(), DeepNN()
    loss.bind(student, teacher)
    conv, bn = loss.connector.conv, loss.connector.bn
    assert {id(p) for p in loss.parameters()} == {id(conv.weight), id(conv.bias), id(bn.weight), id(bn.bias)}
    assert all(p.requires_grad for p in loss.parameters())
    assert set(loss.state_dict()) == {
        "connector.conv.weight", "connector.conv.bias", "connector.bn.weight", "connector.bn.bias",
        "connector.bn.running_mean", "connector.bn.running_var", "connector.bn.num_batches_tracked"}

    s_stages = tuple(s.requires_grad_(True) for s in stages_for(gen, student))
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=s_stages),
                    ModelOutputs(None, stages=stages_for(gen, teacher)), labels_for(gen))
    parts["fitnet"].backward()
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s_stages[1].grad is not None and s_stages[1].grad.abs().sum() > 0  # reaches the student too
    assert s_stages[0].grad is None
    assert int(bn.num_batches_tracked) == 1

    # A fresh loss bound to the same pair loads the checkpointed state exactly.
    again = FitNet()
    again.bind(student, teacher)
    again.load_state_dict(loss.state_dict())
    close(again.connector.bn.running_mean, bn.running_mean)


def test_fitnet_declares_the_teacher_stage():
    loss = FitNet()
    assert loss.needs_teacher and loss.student_features
    loss.bind(LightNN(), DeepNN())
    assert loss.teacher_fields == ("stage1",)
    assert (loss.ce_weight, loss.distill_weight) == (1.0, 100.0)

    loss = FitNet(stage=0)
    loss.bind(LightNN(), DeepNN())
    assert loss.teacher_fields == ("stage0",)

    # Negative indices resolve per model, and the teacher field is non-negative.
    loss = FitNet(stage=-1)
    loss.bind(net("S", (8, 16, 32), (32, 16, 8)), net("T", (16, 32), (16, 8)))
    assert loss.teacher_fields == ("stage1",) and (loss.student_stage, loss.teacher_stage) == (2, 1)


@pytest.mark.parametrize("stage", [2, -3])
def test_fitnet_refuses_a_stage_out_of_range(stage):
    with pytest.raises(KDResearchError) as raised:
        FitNet(stage=stage).bind(LightNN(), DeepNN())
    message = one_line(raised)
    assert f"loss=fitnet: loss.stage={stage} is out of range" in message
    assert "student LightNN" in message and "teacher DeepNN" in message


def test_fitnet_refuses_a_stage_only_the_student_has():
    with pytest.raises(KDResearchError) as raised:
        FitNet(stage=2).bind(net("Deeper", (8, 16, 32), (32, 16, 8)), DeepNN())
    message = one_line(raised)
    assert "the student has 3 stages, the teacher 2" in message
    assert "student Deeper (stages 8x32x32" in message and "teacher DeepNN (stages 64x16x16" in message


@pytest.mark.parametrize("s_size, t_size", [(8, 32), (6, 8)])
def test_fitnet_refuses_maps_it_cannot_connect(s_size, t_size):
    with pytest.raises(KDResearchError) as raised:
        FitNet().bind(net("Small", (8, 16), (16, s_size)), net("Big", (16, 32), (32, t_size)))
    message = one_line(raised)
    assert f"({s_size}x{s_size}) is smaller than the teacher's stage 1 map ({t_size}x{t_size})" in message
    assert "student Small" in message and "teacher Big" in message


@pytest.mark.parametrize("stage", ["x", 1.5, True, None])
def test_fitnet_rejects_a_bad_stage(stage):
    with pytest.raises(KDResearchError, match="loss.stage must be an integer"):
        FitNet(stage=stage)


def test_fitnet_rejects_bad_weights():
    with pytest.raises(KDResearchError, match="loss.distill_weight must be >= 0"):
        FitNet(distill_weight=-1)


# --- attention transfer -------------------------------------------------------------------------

def plain_attention(f, p):
    """a(F) per sample, with loops: q[h*W + w] = sum_c |F[c,h,w]|^p / C, then q / ||q||_2."""
    n, c, h, w = f.shape
    out = torch.zeros(n, h * w, dtype=torch.float64)
    for i in range(n):
        q = torch.zeros(h * w, dtype=torch.float64)
        for y in range(h):
            for x in range(w):
                q[y * w + x] = sum(abs(float(f[i, k, y, x])) ** p for k in range(c)) / c
        out[i] = q / math.sqrt(float((q ** 2).sum()))
    return out


def block_mean(f, size):
    """Average non-overlapping blocks down to `size` (the pooling the suites do, for integer factors)."""
    n, c, h, w = f.shape
    k = h // size
    out = torch.zeros(n, c, size, size, dtype=f.dtype)
    for y in range(size):
        for x in range(size):
            out[:, :, y, x] = f[:, :, y * k:(y + 1) * k, x * k:(x + 1) * k].mean(dim=(2, 3))
    return out


def plain_at(student_stages, teacher_stages, p):
    total = 0.0
    for f_s, f_t in zip(student_stages, teacher_stages):
        size = min(f_s.shape[2], f_t.shape[2])
        f_s, f_t = block_mean(f_s, size), block_mean(f_t, size)
        a_s, a_t = plain_attention(f_s, p), plain_attention(f_t, p)
        total += float(((a_s - a_t) ** 2).sum()) / a_s.numel()
    return total


def test_attention_map_matches_loops(gen):
    f = randn(gen, 3, 5, 4, 6)
    for p in (1, 2, 3):
        close(attention_map(f, p), plain_attention(f, p))


@pytest.mark.parametrize("p", [2, 1, 3])
def test_at_matches_plain_formula(gen, p):
    student, teacher = net("S", (4, 6, 8), (8, 4, 2)), net("T", (5, 7, 9), (8, 4, 2))
    s_stages, t_stages = stages_for(gen, student, relu=False), stages_for(gen, teacher, relu=False)
    logits, labels = randn(gen, N, C), labels_for(gen)
    expected = plain_at(s_stages, t_stages, p)
    close(attention_transfer(s_stages, t_stages, p), expected)

    loss = AttentionTransfer(p=p)
    loss.bind(student, teacher)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=t_stages), labels)
    ce = nn.CrossEntropyLoss()(logits, labels)
    assert set(parts) == {"ce", "at"}
    close(parts["at"], expected)
    close(parts["ce"], ce)
    close(total, float(ce) + 1000 * expected, atol=1e-4, rtol=1e-5)


def test_at_pools_the_larger_map(gen):
    # Student maps 2x (and 4x) the teacher's in one pair, half in another: the larger is pooled.
    student, teacher = net("S", (4, 6, 8), (16, 4, 2)), net("T", (5, 7, 9), (8, 8, 2))
    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    loss = AttentionTransfer()
    loss.bind(student, teacher)
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=s_stages), ModelOutputs(None, stages=t_stages), labels_for(gen))
    close(parts["at"], plain_at(s_stages, t_stages, 2))


def test_at_pairs_stages_from_the_first_when_counts_differ(gen):
    student, teacher = net("S", (4, 6, 8), (8, 4, 2)), net("T", (5, 7), (8, 4))
    loss = AttentionTransfer()
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0", "stage1")
    s_stages = stages_for(gen, student)
    t_stages = stages_for(gen, teacher)
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=s_stages), ModelOutputs(None, stages=t_stages), labels_for(gen))
    close(parts["at"], plain_at(s_stages[:2], t_stages, 2))

    # Teacher deeper than the student: its extra stages are neither asked for nor read (a cached
    # teacher hands None for them).
    loss = AttentionTransfer()
    loss.bind(teacher, student)
    assert loss.teacher_fields == ("stage0", "stage1")
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=t_stages),
                    ModelOutputs(None, stages=s_stages[:2] + (None,)), labels_for(gen))
    close(parts["at"], plain_at(t_stages, s_stages[:2], 2))


def test_at_on_real_models(gen):
    torch.manual_seed(0)
    student, teacher = LightNN().eval(), DeepNN().eval()
    loss = AttentionTransfer()
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0", "stage1")
    images, labels = randn(gen, 2, 3, 32, 32), labels_for(gen, 2)
    with torch.no_grad():
        s, t = student(images, with_features=True), teacher(images, with_features=True)
    _, parts = loss(s, t, labels)
    close(parts["at"], plain_at(s.stages, t.stages, 2), atol=1e-6, rtol=1e-4)


def test_at_is_zero_for_equal_maps_and_sends_gradients_to_the_student(gen):
    model = net("M", (4, 6), (8, 4))
    loss = AttentionTransfer()
    loss.bind(model, model)
    maps = stages_for(gen, model)
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=maps), ModelOutputs(None, stages=maps), labels_for(gen))
    assert abs(parts["at"].item()) < 1e-12
    # Scaling a map does not change its attention (it is normalised).
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=tuple(3 * m for m in maps)),
                    ModelOutputs(None, stages=maps), labels_for(gen))
    assert abs(parts["at"].item()) < 1e-10

    s_stages = tuple(m.requires_grad_(True) for m in stages_for(gen, model))
    _, parts = loss(ModelOutputs(randn(gen, N, C), stages=s_stages), ModelOutputs(None, stages=maps), labels_for(gen))
    parts["at"].backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in s_stages)
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}


def test_at_stays_finite_in_half_precision_and_on_dead_maps(gen):
    big = (300 * randn(gen, 2, 4, 4, 4).abs()).half()  # |F|^2 > 65504 would overflow in float16
    assert torch.isfinite(attention_map(big)).all()
    zero = torch.zeros(2, 4, 4, 4)  # a dead (all-zero) stage: 0, not NaN
    assert torch.equal(attention_map(zero), torch.zeros(2, 16))


def test_at_declares_what_it_needs():
    loss = AttentionTransfer()
    assert loss.needs_teacher and loss.student_features
    assert (loss.p, loss.ce_weight, loss.distill_weight) == (2.0, 1.0, 1000.0)


def test_at_refuses_a_model_without_stages():
    with pytest.raises(KDResearchError) as raised:
        AttentionTransfer().bind(net("Flat", (), ()), DeepNN())
    message = one_line(raised)
    assert message.startswith("loss=at: ") and "student Flat" in message and "teacher DeepNN" in message


@pytest.mark.parametrize("p, message", [(0, "loss.p must be > 0, got 0"), ("x", "loss.p must be a number")])
def test_at_rejects_a_bad_p(p, message):
    with pytest.raises(KDResearchError, match=message):
        AttentionTransfer(p=p)


# --- end to end ---------------------------------------------------------------------------------

def test_fitnet_and_at_train_end_to_end(tmp_path):
    """One short job each: the first trains the (1-epoch) teacher, the second finds and reuses it."""
    store = tmp_path / "store"
    for loss in ("fitnet", "at"):
        check_ok(train_in_process(store, *FAST, "teacher.epochs=1", f"loss={loss}"))
    runs = {run.data.tags.get("loss"): run for run in experiment_runs(mlflow_client(store))}
    assert set(runs) == {"ce", "fitnet", "at"}  # the teacher ran once
    for loss in ("fitnet", "at"):
        run = runs[loss]
        assert run.info.status == "FINISHED"
        assert {"train/loss", "train/ce", f"train/{loss}", "test/acc"} <= set(run.data.metrics)
        assert math.isfinite(run.data.metrics[f"train/{loss}"])
