"""The pre-activation contract and the methods that read it (AB, OFD, ReviewKD).

- Every network offers `preact_stages` with features (never on the plain forward): the stages'
  declared shapes, negative values kept (no in-place ReLU overwrites them), each family's relation
  to its stages, and `preact_norms` naming the BatchNorm each comes out of; the teacher cache
  carries them.
- AB against torchdistill's `AltActTransferLoss` (torchdistill 1.1.5), ReviewKD's HCL and ABF
  against torchdistill's `HierarchicalContextLoss` and `AttentionBasedFusion`, OFD (which
  torchdistill lacks) against the paper's formula written out here element by element, with the
  margin as the authors' `get_margin_from_BN` computes it; values and gradients on fixed tensors.
- What each method sizes from the pair (the authors' per-pair tables for ReviewKD), its stages
  (AB's init stage, ReviewKD's warm-up), its refusals, its config's defaults.
- Each as a job on a zoo pair (resnet20 -> resnet8, synthetic data, teacher outputs cached) that
  trains and logs its parts; with -m slow, each resumes bit-exactly from its epoch-1 checkpoint.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from conftest import (assert_resumed_exactly, compose_config, compose_job, experiment_runs, interrupted_after_epoch_1,
                      mlflow_client, train_in_process)
from loss_checks import assert_builds_defaults, one_line
from torch import nn
from torch.nn import functional as F

from kdresearch.config.validation import check_config
from kdresearch.errors import KDResearchError
from kdresearch.losses.ab import ActivationBoundaries, activation_boundary_transfer
from kdresearch.losses.base import Progress
from kdresearch.losses.ofd import OverhaulDistillation, margin_from_norm, overhaul_distillation
from kdresearch.losses.reviewkd import AttentionBasedFusion, ReviewKD, hierarchical_context_loss
from kdresearch.models import ModelOutputs, Network, assemble_outputs, select_fields
from kdresearch.teacher.outputs import sample_shapes
from kdresearch.training.job import run_job

pytestmark = pytest.mark.usefixtures("one_compute_thread")

N, C = 6, 10

# config name -> module of kdresearch.architectures (None: the tutorial nets of kdresearch.models)
ZOO = {"resnet8": "resnet", "resnet20": "resnet", "resnet8x4": "resnet", "resnet32x4": "resnet",
       "wrn_16_1": "wrn", "wrn_16_2": "wrn", "wrn_40_2": "wrn", "vgg8": "vgg", "vgg13": "vgg",
       "MobileNetV2": "mobilenetv2", "ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2",
       "DeepNN": None, "LightNN": None}
RELU_ENDED = {"resnet", "vgg", "shufflenetv1", "shufflenetv2", None}  # stage = relu(pre-activation stage)
WITHOUT_NORMS = {"ShuffleV1", "ShuffleV2", "DeepNN", "LightNN"}  # the suites name no BN before their ReLUs


def make(name: str, num_classes: int = C) -> Network:
    module = ZOO[name]
    source = importlib.import_module(f"kdresearch.architectures.{module}" if module else "kdresearch.models")
    return getattr(source, name)(num_classes=num_classes)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


@pytest.fixture(scope="module")
def td():
    """torchdistill's mid-level losses and auxiliary modules (the dev extra's references)."""
    from torchdistill.losses import mid_level
    from torchdistill.models import wrapper

    return mid_level, wrapper


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def same_value_and_grads(ours, reference, inputs, atol=1e-6, rtol=1e-5):
    """ours(*a) and reference(*b) on equal copies of `inputs`: equal values and equal gradients with
    respect to the first input (the student's maps), which must not be all zero."""
    a, b = leaves(*inputs), leaves(*inputs)
    mine, theirs = ours(*a), reference(*b)
    close(mine, theirs, atol=atol, rtol=rtol)
    mine_grad, their_grad = torch.autograd.grad(mine, a[0]), torch.autograd.grad(theirs, b[0])
    assert mine_grad[0].abs().sum() > 0  # the comparison is not vacuous
    close(mine_grad[0], their_grad[0], atol=atol, rtol=rtol)


def net(name: str, channels, sizes, embedding=12, norms: bool = False, gen=None) -> Network:
    """A Network with shape facts only (`bind` never runs a forward pass); with `norms`, BatchNorms
    of random weight (some negative) and bias as its `preact_norms`."""
    batch_norms = None
    if norms:
        batch_norms = tuple(nn.BatchNorm2d(c) for c in channels)
        with torch.no_grad():
            for norm in batch_norms:
                norm.weight.copy_(randn(gen, norm.num_features))
                norm.bias.copy_(randn(gen, norm.num_features))
    cls = type(name, (Network,), {"stage_channels": tuple(channels), "stage_sizes": tuple(sizes),
                                  "embedding_dim": embedding, "num_classes": C,
                                  "preact_norms": lambda self: batch_norms})
    return cls()


def progress(epoch, epochs=40):
    return Progress(epoch=epoch, step=1, epochs=epochs, steps_per_epoch=1)


# --- the contract: pre-activation stages ---------------------------------------------------------

@pytest.mark.parametrize("name", list(ZOO))
def test_preact_stages_come_with_features_in_the_declared_shapes(name, gen):
    model = make(name).eval()
    x = randn(gen, 2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, with_features=True)
        assert model.outputs(x).preact_stages is None  # the plain forward computes none
    declared = [(2, c, s, s) for c, s in zip(model.stage_channels, model.stage_sizes)]
    assert [tuple(p.shape) for p in out.preact_stages] == declared
    assert all(bool((p < 0).any()) for p in out.preact_stages)  # negative values kept
    if name == "MobileNetV2":  # linear bottlenecks: no ReLU ends a stage
        assert all(p is s for p, s in zip(out.preact_stages, out.stages))
    elif ZOO[name] in RELU_ENDED:
        for pre, stage in zip(out.preact_stages, out.stages):
            assert not torch.equal(pre, stage) and torch.equal(F.relu(pre), stage)
    else:  # WRN: the next BN-ReLU's input, i.e. the BN applied to the (pre-activation block's) stage
        for pre, stage, norm in zip(out.preact_stages, out.stages, model.preact_norms()):
            assert not torch.equal(pre, stage) and torch.equal(pre, norm(stage))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                  "DeepNN", "LightNN"])
def test_no_in_place_op_overwrites_a_preact_stage(name, monkeypatch, gen):
    """In training mode, every output of a forward with features (pre-activation stages included)
    equals that of the same network with every ReLU out of place, and the backward pass through all
    of them works (autograd raises if an in-place op overwrote a tensor it needs). 16x16 inputs keep
    it cheap where the network accepts them (the tutorial nets' linear layers need 32x32)."""
    model = make(name).train()
    side = 32 if ZOO[name] is None else 16
    x = randn(gen, 2, 3, side, side)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)  # the tutorial nets' dropout draws the same mask in both passes
    out = model(x, with_features=True)
    (out.logits.sum() + sum(s.sum() for s in out.stages) + sum(p.sum() for p in out.preact_stages)).backward()

    model.load_state_dict(state)  # the same BN running statistics as before the first pass
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: torch.relu(t))
    torch.manual_seed(1)
    with torch.no_grad():
        reference = model(x, with_features=True)
    for got, expected in zip((out.logits, *out.stages, *out.preact_stages),
                             (reference.logits, *reference.stages, *reference.preact_stages)):
        assert torch.equal(got.detach(), expected)


@pytest.mark.parametrize("name", list(ZOO))
def test_preact_norms_are_the_networks_batchnorms_before_each_stage_relu(name, gen):
    model = make(name).eval()
    norms = model.preact_norms()
    if name in WITHOUT_NORMS:
        assert norms is None
        return
    own = {id(module) for module in model.modules()}
    assert all(isinstance(norm, nn.BatchNorm2d) and id(norm) in own for norm in norms)
    assert tuple(norm.num_features for norm in norms) == model.stage_channels
    if ZOO[name] in ("vgg", "wrn"):  # their pre-activation stage is that BN's output itself
        seen = {}
        hooks = [norm.register_forward_hook(lambda m, i, o, j=j: seen.setdefault(j, o.clone()))
                 for j, norm in enumerate(norms)]
        with torch.no_grad():
            out = model(randn(gen, 2, 3, 32, 32), with_features=True)
        for hook in hooks:
            hook.remove()
        assert all(torch.equal(seen[j], pre) for j, pre in enumerate(out.preact_stages))


@pytest.mark.parametrize("build_imagenet", ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"])
def test_imagenet_networks_name_their_norms_too(build_imagenet):
    from kdresearch.architectures import imagenet

    model = getattr(imagenet, build_imagenet)(num_classes=C, image_size=32).eval()
    assert tuple(norm.num_features for norm in model.preact_norms()) == model.stage_channels
    assert model.outputs(torch.zeros(1, 3, 32, 32)).preact_stages is None


def test_the_teacher_cache_carries_preact_stages(gen):
    teacher = make("resnet8").eval()
    fields = ("preact_stage2", "stage1", "embedding")
    with torch.no_grad():
        out = teacher(randn(gen, 2, 3, 32, 32), with_features=True)
    stored = select_fields(out, fields)
    assert torch.equal(stored["preact_stage2"], out.preact_stages[2])
    assert sample_shapes(teacher, fields) == {"preact_stage2": (64, 8, 8), "stage1": (32, 16, 16), "embedding": (64,)}
    back = assemble_outputs(stored, num_stages=3)
    assert back.preact_stages[:2] == (None, None) and torch.equal(back.preact_stages[2], out.preact_stages[2])
    assert back.stages[0] is None and torch.equal(back.stages[1], out.stages[1])


# --- AB --------------------------------------------------------------------------------------------

def test_ab_equals_torchdistill_with_the_authors_stage_weights_and_scale(gen, td):
    mid_level, _ = td
    shapes = ((4, 8, 8), (6, 4, 4), (8, 2, 2))
    student = [randn(gen, N, *shape, scale=1.5) for shape in shapes]
    teacher = [randn(gen, N, *shape) for shape in shapes]
    k = len(shapes)
    pairs = {f"pair{j}": {"student": {"io": "output", "path": f"s{j}"}, "teacher": {"io": "output", "path": f"t{j}"},
                          "weight": 2.0 ** (j - k + 1)} for j in range(k)}
    reference = mid_level.AltActTransferLoss(pairs, margin=0.7, reduction="mean")

    def theirs(*maps):
        return 3 / 1000 * reference({f"s{j}": {"output": m} for j, m in enumerate(maps[:k])},
                                    {f"t{j}": {"output": m} for j, m in enumerate(maps[k:])})

    ours = lambda *maps: activation_boundary_transfer(maps[:k], maps[k:], margin=0.7)  # noqa: E731
    for j in range(k):  # each stage's gradient, not only the first one's
        order = [j, *[i for i in range(2 * k) if i != j]]
        same_value_and_grads(lambda *m: ours(*[m[order.index(i)] for i in range(2 * k)]),
                             lambda *m: theirs(*[m[order.index(i)] for i in range(2 * k)]),
                             [(student + teacher)[i] for i in order])


def test_ab_connectors_are_sized_from_the_pair():
    loss = ActivationBoundaries()
    loss.bind(make("resnet8x4"), make("resnet32x4"))  # same shapes: passed through, as the authors do
    assert all(isinstance(c, nn.Identity) for c in loss.connectors) and list(loss.parameters()) == []
    assert loss.teacher_fields == ("preact_stage0", "preact_stage1", "preact_stage2")
    loss.bind(make("ShuffleV1"), make("resnet32x4"))  # half the size: a transposed conv up, then BN
    assert [(type(c.conv).__name__, c.conv.in_channels, c.conv.out_channels, c.bn.num_features)
            for c in loss.connectors] == [("ConvTranspose2d", 240, 64, 64), ("ConvTranspose2d", 480, 128, 128),
                                          ("ConvTranspose2d", 960, 256, 256)]
    assert {"connectors.2.conv.weight", "connectors.2.bn.running_mean"} <= set(loss.state_dict())


def test_ab_trains_the_features_alone_in_its_init_stage_then_the_classifier(gen):
    student, teacher = net("S", (4, 6), (8, 4)), net("T", (4, 6), (8, 4))
    loss = ActivationBoundaries(init_epochs=2, ce_weight=0.5, distill_weight=3.0)
    loss.bind(student, teacher)
    s_pre = tuple(randn(gen, N, c, s, s).requires_grad_(True) for c, s in ((4, 8), (6, 4)))
    t_pre = tuple(randn(gen, N, c, s, s) for c, s in ((4, 8), (6, 4)))
    logits, labels = randn(gen, N, C).requires_grad_(True), torch.arange(N) % C
    expected = activation_boundary_transfer(s_pre, t_pre)
    for epoch in (1, 2):
        total, parts = loss(ModelOutputs(logits, preact_stages=s_pre), ModelOutputs(preact_stages=t_pre), labels,
                            progress(epoch, epochs=4))
        assert set(parts) == {"ce", "ab"}
        close(total, expected)
        assert torch.autograd.grad(total, logits, allow_unused=True) == (None,)  # the classifier untouched
    total, parts = loss(ModelOutputs(logits, preact_stages=s_pre), ModelOutputs(preact_stages=t_pre), labels,
                        progress(3, epochs=4))
    close(total, 0.5 * F.cross_entropy(logits, labels) + 3.0 * expected)


@pytest.mark.parametrize("student, teacher, problem", [
    (net("Three", (4, 6, 8), (8, 4, 2)), net("Two", (4, 6), (8, 4)),
     "both need the same number of stages (the student has 3, the teacher 2)"),
    (net("Tiny", (4, 6), (2, 1)), net("Big", (4, 6), (8, 4)),
     "the student's stage 0 map (2x2) is smaller than the teacher's (8x8) but not half its size"),
])
def test_ab_refuses_a_pair_it_cannot_serve_in_one_line(student, teacher, problem):
    with pytest.raises(KDResearchError) as raised:
        ActivationBoundaries().bind(student, teacher)
    message = one_line(raised)
    assert message.startswith("loss=ab: ") and problem in message and f"teacher {teacher.describe()}" in message


def test_ab_init_stage_that_fills_the_job_is_refused_before_it_starts():
    with pytest.raises(KDResearchError) as raised:
        check_config(compose_config("debug=tiny", "data=synthetic", "loss=ab"))
    assert one_line(raised) == ("loss=ab: loss.init_epochs=30 leaves none of the 1 epochs to train the classifier; "
                                "set epochs above 30 or lower loss.init_epochs")


# --- OFD -------------------------------------------------------------------------------------------

def authors_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The authors' get_margin_from_BN, channel by channel in Python floats (norm.cdf as erf)."""
    margins = []
    for s, m in zip(weight.tolist(), bias.tolist()):
        s = abs(s)
        cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
        if cdf > 0.001:
            margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            margins.append(-3 * s)
    return torch.tensor(margins)


def plain_ofd(student_maps, teacher_maps, margins):
    """The paper's partial L2, element by element: positive teacher values are matched; below
    them, down to the margin, only a student value above the teacher's costs; below the margin,
    only one above the margin. Stage j weighs 1 / 2^(K-1-j); the sum is divided by N."""
    k, n = len(student_maps), student_maps[0].shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for j, (s_map, t_map, margin) in enumerate(zip(student_maps, teacher_maps, margins)):
        s_flat, t_flat = s_map.double().flatten(), t_map.detach().double().flatten()
        channel = torch.arange(s_map[0].numel()).repeat(n) // (s_map.shape[2] * s_map.shape[3])
        for index in range(s_flat.numel()):
            s, t, m = s_flat[index], float(t_flat[index]), float(margin[channel[index]])
            if t > 0:
                cost = (s - t) ** 2
            elif t > m:
                cost = (s - t) ** 2 if s > t else 0.0 * s
            else:
                cost = (s - m) ** 2 if s > m else 0.0 * s
            total = total + cost / 2 ** (k - 1 - j)
    return total / n


def test_ofd_margin_is_the_authors_expected_negative_response(gen):
    weight = torch.cat([randn(gen, 20), torch.tensor([-0.5, 2.0, 1e-3])])  # a negative weight: |weight| is the std
    bias = torch.cat([randn(gen, 20, scale=2), torch.tensor([0.3, 7.0, -4.0])])  # 7.0: below 0.001 negative mass
    ours = margin_from_norm(weight, bias)
    close(ours, authors_margin(weight, bias), atol=1e-6)
    assert ours[-2] == pytest.approx(-6.0) and bool((ours < 0).all())
    close(margin_from_norm(torch.zeros(2), torch.tensor([-1.5, 2.0])), [-1.5, 0.0])  # a switched-off channel


def test_ofd_equals_the_papers_partial_l2_written_out(gen):
    shapes = ((3, 4, 4), (5, 2, 2))
    margins = [authors_margin(randn(gen, c), randn(gen, c)) for c, _, _ in shapes]
    student = [randn(gen, 3, *shape) for shape in shapes]
    teacher = [randn(gen, 3, *shape) - 0.3 for shape in shapes]  # every case: positive, above and below the margin
    same_value_and_grads(lambda s0, s1, *t: overhaul_distillation((s0, s1), t, margins),
                         lambda s0, s1, *t: plain_ofd((s0, s1), t, margins), (*student, *teacher))
    same_value_and_grads(lambda s1, s0, *t: overhaul_distillation((s0, s1), t, margins),
                         lambda s1, s0, *t: plain_ofd((s0, s1), t, margins), (student[1], student[0], *teacher))


def test_ofd_pairs_the_last_stages_pools_the_teacher_and_reads_its_norms_at_each_step(gen):
    student = net("S", (4, 6), (8, 4))
    teacher = net("T", (5, 7, 9), (16, 8, 8), norms=True, gen=gen)
    loss = OverhaulDistillation(ce_weight=0.5, distill_weight=0.01)
    loss.bind(student, teacher)
    assert (loss.student_stages, loss.teacher_stages) == ((0, 1), (1, 2))
    assert loss.teacher_fields == ("preact_stage1", "preact_stage2")
    assert [(c[0].in_channels, c[0].out_channels, c[0].kernel_size, c[0].bias, c[1].num_features)
            for c in loss.connectors] == [(4, 7, (1, 1), None, 7), (6, 9, (1, 1), None, 9)]
    assert not any(name.startswith("_teacher") for name in loss.state_dict())  # the teacher's norms stay its own

    s_pre = (randn(gen, N, 4, 8, 8), randn(gen, N, 6, 4, 4))
    t_pre = (None, randn(gen, N, 7, 8, 8), randn(gen, N, 9, 8, 8))
    logits, labels = randn(gen, N, C), torch.arange(N) % C
    norms = teacher.preact_norms()

    def expected():
        connected = [loss.connectors[0](s_pre[0]), loss.connectors[1](s_pre[1])]
        targets = [t_pre[1], F.adaptive_avg_pool2d(t_pre[2], (4, 4))]
        return plain_ofd(connected, targets, [authors_margin(norms[1].weight, norms[1].bias),
                                              authors_margin(norms[2].weight, norms[2].bias)])

    total, parts = loss(ModelOutputs(logits, preact_stages=s_pre), ModelOutputs(preact_stages=t_pre), labels)
    assert set(parts) == {"ce", "ofd"}
    close(parts["ofd"], expected(), rtol=1e-5, atol=1e-4)
    close(total, 0.5 * F.cross_entropy(logits, labels) + 0.01 * expected(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the teacher's trained weights arrive after bind: the margins follow them
        norms[2].bias.add_(1.0)
    close(loss(ModelOutputs(logits, preact_stages=s_pre), ModelOutputs(preact_stages=t_pre), labels)[1]["ofd"],
          expected(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("student, teacher, problem", [
    ("resnet8", "ShuffleV1", "OFD reads its margins from the BatchNorm before each teacher stage's ReLU, and the "
                             "teacher has none"),
    ("LightNN", "DeepNN", "the teacher has none"),
])
def test_ofd_refuses_a_teacher_without_norms_in_one_line(student, teacher, problem):
    student, teacher = make(student), make(teacher)
    with pytest.raises(KDResearchError) as raised:
        OverhaulDistillation().bind(student, teacher)
    message = one_line(raised)
    assert message.startswith("loss=ofd: ") and problem in message and f"teacher {teacher.describe()}" in message


# --- ReviewKD --------------------------------------------------------------------------------------

def test_hcl_equals_torchdistill_at_every_level_size(gen, td):
    mid_level, _ = td
    reference = mid_level.HierarchicalContextLoss(student_module_path="s", student_module_io="output",
                                                  teacher_module_path="t", teacher_module_io="output")
    shapes = ((3, 8, 8), (4, 4, 4), (5, 2, 2), (6, 1, 1))

    def theirs(*maps):
        return sum(reference({"s": {"output": (s, None)}}, {"t": {"output": t}})
                   for s, t in zip(maps[:4], maps[4:]))

    student = [randn(gen, N, *shape) for shape in shapes]
    teacher = [randn(gen, N, *shape) for shape in shapes]
    for j in range(4):
        order = [j, *[i for i in range(8) if i != j]]
        same_value_and_grads(lambda *m: hierarchical_context_loss([m[order.index(i)] for i in range(4)],
                                                                  [m[order.index(i)] for i in range(4, 8)]),
                             lambda *m: theirs(*[m[order.index(i)] for i in range(8)]),
                             [(student + teacher)[i] for i in order])


def test_abf_fuses_as_torchdistill_and_resizes_to_the_teacher(gen, td):
    _, wrapper = td
    ours = AttentionBasedFusion(6, 5, 7, fuse=True)
    theirs = wrapper.AttentionBasedFusion(6, 5, 7, uses_attention=True)
    theirs.load_state_dict({key.replace("att_conv", "attention_conv"): value
                            for key, value in ours.state_dict().items()})
    x, residual = randn(gen, N, 6, 4, 4), randn(gen, N, 5, 2, 2)
    out, fused = ours(x, residual, (4, 4))
    their_out, their_fused = theirs(x, residual, 4)
    close(out, their_out, atol=1e-5)
    close(fused, their_fused, atol=1e-5)
    out, fused = ours(x, residual, (8, 8))  # the teacher's map is larger: the fused map is resized up to it
    assert out.shape == (N, 7, 8, 8)
    close(fused, F.interpolate(their_fused, (8, 8), mode="nearest"), atol=1e-5)


# The authors' build_review_kd tables (in_channels, out_channels, middle width = min(512, last in_channels)).
AUTHORS_TABLES = {
    ("resnet8x4", "resnet32x4"): ([64, 128, 256, 256], [64, 128, 256, 256], 256),
    ("ShuffleV1", "wrn_40_2"): ([240, 480, 960, 960], [32, 64, 128, 128], 512),
    ("ShuffleV2", "resnet32x4"): ([116, 232, 464, 1024], [64, 128, 256, 256], 512),
    ("wrn_16_2", "wrn_40_2"): ([32, 64, 128, 128], [32, 64, 128, 128], 128),
    ("MobileNetV2", "vgg13"): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], 512),
}


@pytest.mark.parametrize("pair", list(AUTHORS_TABLES), ids="-".join)
def test_reviewkd_fusions_are_sized_as_the_authors_tables(pair):
    loss = ReviewKD()
    loss.bind(make(pair[0]), make(pair[1]))
    in_channels, out_channels, mid = AUTHORS_TABLES[pair]
    assert [f.conv1[0].in_channels for f in loss.fusions] == in_channels
    assert [f.conv2[0].out_channels for f in loss.fusions] == out_channels
    assert {f.conv1[0].out_channels for f in loss.fusions} == {mid}
    assert [f.att_conv is not None for f in loss.fusions] == [True] * (len(in_channels) - 1) + [False]
    assert loss.teacher_fields == (*(f"preact_stage{j}" for j in range(len(in_channels) - 1)), "embedding")


def test_reviewkd_warms_up_from_zero_in_the_first_epoch(gen):
    student, teacher = net("S", (4, 6), (8, 4), embedding=10), net("T", (5, 7), (8, 8), embedding=9)
    loss = ReviewKD(warmup=4, ce_weight=0.5, distill_weight=2.0)
    loss.bind(student, teacher)
    s_out = ModelOutputs(randn(gen, N, C), randn(gen, N, 10), stages=(randn(gen, N, 4, 8, 8), randn(gen, N, 6, 4, 4)))
    t_out = ModelOutputs(embedding=randn(gen, N, 9), preact_stages=(randn(gen, N, 5, 8, 8), randn(gen, N, 7, 8, 8)))
    labels = torch.arange(N) % C
    levels = loss.reviewed((*s_out.stages, s_out.embedding[:, :, None, None]),
                           (*t_out.preact_stages, t_out.embedding[:, :, None, None]))
    assert [tuple(level.shape) for level in levels] == [(N, 5, 8, 8), (N, 7, 8, 8), (N, 9, 1, 1)]
    hcl = hierarchical_context_loss(levels, (*t_out.preact_stages, t_out.embedding[:, :, None, None]))
    ce = F.cross_entropy(s_out.logits, labels)
    for epoch, ramp in ((1, 0.0), (3, 0.5), (5, 1.0), (30, 1.0)):
        total, parts = loss(s_out, t_out, labels, progress(epoch))
        assert set(parts) == {"ce", "reviewkd"}
        close(parts["reviewkd"], hcl)
        close(total, 0.5 * ce + ramp * 2.0 * hcl, atol=1e-5)
    with pytest.raises(KDResearchError, match="loss=reviewkd needs the training progress"):
        loss(s_out, t_out, labels)


def test_reviewkd_refuses_different_stage_counts_in_one_line():
    student, teacher = make("resnet8"), make("vgg8")
    with pytest.raises(KDResearchError) as raised:
        ReviewKD().bind(student, teacher)
    assert one_line(raised).startswith("loss=reviewkd: ReviewKD fuses the student's stage j into the teacher's "
                                       "stage j, so both need the same number of stages (the student has 3, the "
                                       "teacher 4); student resnet8 (stages 16x32x32")


# --- configs and jobs ------------------------------------------------------------------------------

DEFAULTS = {  # conf/loss/<name>.yaml -> the class and the authors' CIFAR-100 defaults it must build
    "ab": (ActivationBoundaries, {"margin": 1.0, "init_epochs": 30, "ce_weight": 1.0, "distill_weight": 0.0}),
    "ofd": (OverhaulDistillation, {"ce_weight": 1.0, "distill_weight": 0.001}),
    "reviewkd": (ReviewKD, {"warmup": 20, "max_mid_channels": 512, "ce_weight": 1.0, "distill_weight": 5.0}),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_config_file_builds_the_defaults(name):
    assert_builds_defaults(name, *DEFAULTS[name])


@pytest.mark.parametrize("preset, weight", [("cifar100_res32x4_res8x4", 5.0), ("cifar100_res56_res20", 0.6),
                                            ("cifar100_res32x4_shuv2", 8.0)])
def test_pair_presets_carry_the_authors_reviewkd_weight(preset, weight):
    assert compose_config(f"experiment={preset}", "loss=reviewkd").loss.distill_weight == weight


@pytest.mark.parametrize("cls, options, message", [
    (ActivationBoundaries, {"margin": -1}, "loss.margin must be >= 0"),
    (ActivationBoundaries, {"init_epochs": 1.5}, "loss.init_epochs must be an integer >= 0"),
    (OverhaulDistillation, {"distill_weight": "x"}, "loss.distill_weight must be a number"),
    (ReviewKD, {"warmup": -2}, "loss.warmup must be >= 0"),
    (ReviewKD, {"max_mid_channels": 0}, "loss.max_mid_channels must be an integer >= 1"),
])
def test_bad_options_are_refused(cls, options, message):
    with pytest.raises(KDResearchError, match=message):
        cls(**options)


JOB = ["debug=tiny", "data.limit_train=128", "data.limit_test=64", "model=resnet8", "teacher=resnet20",
       "device=cpu", "epochs=2", "batch_size=64", "teacher.batch_size=64", "optimizer=sgd", "optimizer.lr=0.05"]
JOBS = {  # loss overrides -> the part it logs (AB: epoch 1 its init stage; ReviewKD: full weight in epoch 2)
    "ab": ["loss=ab", "loss.init_epochs=1"],
    "ofd": ["loss=ofd"],
    "reviewkd": ["loss=reviewkd", "loss.warmup=1"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preact-methods")  # one store: the teacher is trained once, then reused


@pytest.mark.parametrize("name", list(JOBS))
def test_method_trains_on_a_zoo_pair_and_logs_its_parts(store, name):
    job = train_in_process(store, *JOB, *JOBS[name])
    assert job.returncode == 0, job.output[-3000:]
    client = mlflow_client(store)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["loss"] == name
    assert run.data.tags["teacher_cache"] == "used"  # the teacher's pre-activation stages came from the cache
    metrics = run.data.metrics
    assert all(math.isfinite(metrics[f"train/{part}"]) for part in ("ce", name, "loss"))
    assert 0 <= metrics["test/acc"] <= 100
    teachers = [r for r in experiment_runs(client) if r.info.run_name.startswith("resnet20")]
    assert len(teachers) == 1  # every method reused the one teacher


@pytest.mark.parametrize("overrides, message", [
    (["loss=ofd", "teacher=ShuffleV1"], "loss=ofd: OFD reads its margins from the BatchNorm before each teacher "
                                        "stage's ReLU, and the teacher has none; student resnet8"),
    (["loss=reviewkd", "teacher=vgg8"], "loss=reviewkd: ReviewKD fuses the student's stage j into the teacher's "
                                        "stage j, so both need the same number of stages"),
    (["loss=ab", "loss.init_epochs=1", "teacher=vgg8"], "loss=ab: AB pairs stage j of the student with stage j of "
                                                        "the teacher, so both need the same number of stages"),
])
def test_a_pair_the_method_cannot_serve_is_refused_before_training(store, overrides, message):
    client = mlflow_client(store)
    before = {r.info.run_id for r in experiment_runs(client)}
    job = train_in_process(store, *JOB, *overrides, run_dir=store / "refused")
    assert job.returncode == 1 and f"error: {message}" in job.output
    assert {r.info.run_id for r in experiment_runs(client)} == before  # no run: neither a teacher nor a student
    assert not (store / "refused").exists()


@pytest.mark.slow  # two jobs per method: the default run checks each method's values, training and refusals
@pytest.mark.parametrize("name", list(JOBS))
def test_method_resumes_exactly_from_its_epoch_1_checkpoint(store, name):
    job = run_job(compose_job(store, *JOB, *JOBS[name]), store / f"{name}-uninterrupted")
    client = mlflow_client(store)
    interrupted = store / f"{name}-interrupted"
    interrupted_after_epoch_1(client, job, interrupted)
    resumed = run_job(compose_job(store, *JOB, *JOBS[name], f"resume={interrupted}"), store / f"{name}-unused")
    assert_resumed_exactly(job.checkpoint, resumed.checkpoint)
