"""The feature methods (SP, PKT, RKD, CC, NST, ICKD, FSP): each term's value and gradients
against torchdistill's loss class where its formula is the suites' (SP, PKT, RKD; ICKD up to its
documented batch-size factor), else against a plain implementation of the authors' formula written
out here (SP, CC, NST, ICKD, FSP); their sizing from the model pair and their refusals; and each as a job on
a zoo pair (resnet20 -> resnet8, synthetic data) that trains, logs its parts and resumes exactly."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_resumed_exactly, compose_job, interrupted_after_epoch_1, mlflow_client
from loss_checks import assert_builds_defaults, assert_pair_refused, one_line
from torch.nn import functional as F

from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress
from kdresearch.losses.cc import CorrelationCongruence, correlation_congruence
from kdresearch.losses.fsp import FlowOfSolutionProcedure, flow_of_solution_procedure, fsp_matrix
from kdresearch.losses.ickd import InterChannelCorrelation, inter_channel_correlation
from kdresearch.losses.nst import NeuronSelectivityTransfer, neuron_selectivity_transfer
from kdresearch.losses.pkt import ProbabilisticKnowledgeTransfer, probabilistic_transfer
from kdresearch.losses.rkd import RelationalKD, rkd_terms
from kdresearch.losses.sp import SimilarityPreserving, similarity_preserving
from kdresearch.models import ModelOutputs, Network
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import run_job
from kdresearch.training.loop import seed_everything

pytestmark = pytest.mark.usefixtures("one_compute_thread")

N, C = 8, 10


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


@pytest.fixture(scope="module")
def td():
    """torchdistill's mid-level losses (the dev extra's reference implementations), imported only by
    the tests that compare against them."""
    from torchdistill.losses import mid_level

    return mid_level


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def labels_for(gen, n=N):
    return torch.randint(0, C, (n,), generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


def net(name: str, channels=(4, 6, 8), sizes=(8, 4, 2), embedding=12, classes=C) -> Network:
    """A Network with shape facts only: `bind` never runs a forward pass."""
    cls = type(name, (Network,), {"stage_channels": tuple(channels), "stage_sizes": tuple(sizes),
                                  "embedding_dim": embedding, "num_classes": classes})
    return cls()


def stages_for(gen, model: Network, n=N):
    return tuple(randn(gen, n, c, s, s).relu() for c, s in zip(model.stage_channels, model.stage_sizes))


def leaves(*tensors):
    """Fresh leaf copies that collect gradients, one set per implementation being compared."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


def same_value_and_grads(ours, reference, inputs, atol=1e-6, rtol=1e-5):
    """ours(*a) and reference(*b) on equal copies a, b of `inputs` (the student's first): equal values
    and gradients with respect to every input (None where neither sends one, e.g. to the teacher)."""
    a, b = leaves(*inputs), leaves(*inputs)
    mine, theirs = ours(*a), reference(*b)
    close(mine, theirs, atol=atol, rtol=rtol)
    mine_grads, their_grads = grads_of(mine, a), grads_of(theirs, b)
    assert mine_grads[0] is not None and mine_grads[0].abs().sum() > 0  # the comparison is not vacuous
    for g_mine, g_theirs in zip(mine_grads, their_grads):
        assert (g_mine is None) == (g_theirs is None)
        if g_mine is not None:
            close(g_mine, g_theirs, atol=atol, rtol=rtol)


# --- SP ------------------------------------------------------------------------------------------

def plain_sp(f_s, f_t, p=2):
    """The suites' similarity_loss written out: G[i, j] = <q_i, q_j> / ||(<q_i, q_k>)_k||_p (rows
    normalised; p = 2 in the suites), loss = sum (G_t - G_s)^2 / N^2."""
    n = f_s.shape[0]

    def gram(f):
        q = f.flatten(1)
        g = torch.stack([torch.stack([(q[i] * q[j]).sum() for j in range(n)]) for i in range(n)])
        return g / g.abs().pow(p).sum(dim=1, keepdim=True).pow(1 / p)

    return (gram(f_t) - gram(f_s)).pow(2).sum() / (n * n)


@pytest.mark.parametrize("s_shape, t_shape", [((6, 4, 4), (10, 2, 2)), ((8, 4, 4), (8, 4, 4))])
def test_sp_equals_the_suites_formula_and_torchdistill_with_its_l1_rows(gen, td, s_shape, t_shape):
    f_s, f_t = randn(gen, N, *s_shape), randn(gen, N, *t_shape).relu()
    same_value_and_grads(similarity_preserving, plain_sp, (f_s, f_t))
    # torchdistill's SPKDLoss is the same but for normalize(G, 1): rows divided by their L1 norm.
    reference = td.SPKDLoss(student_output_path="s", teacher_output_path="t", reduction="batchmean")
    same_value_and_grads(lambda s, t: plain_sp(s, t, p=1),
                         lambda s, t: reference({"s": {"output": s}}, {"t": {"output": t}}), (f_s, f_t))
    assert not torch.isclose(similarity_preserving(f_s, f_t), reference({"s": {"output": f_s}}, {"t": {"output": f_t}}))


def test_sp_loss_reads_the_chosen_stage(gen):
    student, teacher = net("S", (4, 6, 8), (8, 4, 2)), net("T", (5, 7), (8, 4))
    loss = SimilarityPreserving()
    loss.bind(student, teacher)
    assert (loss.student_stage, loss.teacher_stage, loss.teacher_fields) == (2, 1, ("stage1",))
    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    logits, labels = randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=(None, t_stages[1])), labels)
    assert set(parts) == {"ce", "sp"}
    close(parts["sp"], similarity_preserving(s_stages[2], t_stages[1]))
    close(total, F.cross_entropy(logits, labels) + 3000 * parts["sp"], atol=1e-5)

    loss = SimilarityPreserving(stage=0)
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0",)
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}


def test_sp_is_zero_for_maps_that_relate_samples_alike(gen):
    f = randn(gen, N, 4, 3, 3)
    assert similarity_preserving(f, 5 * f).abs() < 1e-12  # each row of G is normalised: scale drops out


# --- PKT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_dim, t_dim", [(12, 12), (8, 20)])
def test_pkt_equals_torchdistill(gen, td, s_dim, t_dim):
    e_s, e_t = randn(gen, N, s_dim), randn(gen, N, t_dim).relu()
    reference = td.PKTLoss("fc", "input", "fc", "input")
    same_value_and_grads(probabilistic_transfer,
                         lambda s, t: reference({"fc": {"input": s}}, {"fc": {"input": t}}), (e_s, e_t))


def test_pkt_loss_on_embeddings(gen):
    loss = ProbabilisticKnowledgeTransfer()
    loss.bind(net("S", embedding=8), net("T", embedding=20))
    assert loss.teacher_fields == ("embedding",) and (loss.ce_weight, loss.distill_weight) == (1.0, 30000.0)
    e_s, e_t, logits, labels = randn(gen, N, 8), randn(gen, N, 20), randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, embedding=e_s), ModelOutputs(embedding=e_t), labels)
    assert set(parts) == {"ce", "pkt"} and parts["pkt"] > 0
    close(total, F.cross_entropy(logits, labels) + 30000 * probabilistic_transfer(e_s, e_t), atol=1e-4)
    assert probabilistic_transfer(e_t, 3 * e_t).abs() < 1e-6  # only cosine similarities count


# --- RKD -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_dim, t_dim", [(12, 12), (8, 20)])
def test_rkd_equals_torchdistill(gen, td, s_dim, t_dim):
    e_s, e_t = randn(gen, N, s_dim), randn(gen, N, t_dim)

    def reference(distance_weight, angle_weight):
        rkd = td.RKDLoss("s", "t", dist_factor=distance_weight, angle_factor=angle_weight, reduction="mean")
        return lambda s, t: rkd({"s": {"output": s}}, {"t": {"output": t}})

    same_value_and_grads(lambda s, t: rkd_terms(s, t)[0], reference(1.0, 0.0), (e_s, e_t))
    same_value_and_grads(lambda s, t: rkd_terms(s, t)[1], reference(0.0, 1.0), (e_s, e_t))
    loss = RelationalKD()
    loss.bind(net("S", embedding=s_dim), net("T", embedding=t_dim))

    def ours(s, t):
        return loss(ModelOutputs(torch.zeros(N, C), embedding=s), ModelOutputs(embedding=t), labels_for(gen))[1]["rkd"]

    same_value_and_grads(ours, reference(25.0, 50.0), (e_s, e_t))


def test_rkd_loss_parts(gen):
    loss = RelationalKD(distance_weight=2.0, angle_weight=3.0, distill_weight=0.5)
    loss.bind(net("S"), net("T"))
    assert loss.teacher_fields == ("embedding",)
    e_s, e_t, logits, labels = randn(gen, N, 12), randn(gen, N, 12), randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, embedding=e_s), ModelOutputs(embedding=e_t), labels)
    assert set(parts) == {"ce", "rkd_distance", "rkd_angle", "rkd"}
    distance, angle = rkd_terms(e_s, e_t)
    close(parts["rkd_distance"], distance)
    close(parts["rkd_angle"], angle)
    close(parts["rkd"], 2 * distance + 3 * angle)
    close(total, F.cross_entropy(logits, labels) + 0.5 * (2 * distance + 3 * angle))
    # Relations only: a scaled, shifted copy of the teacher's embedding has the same geometry.
    distance, angle = rkd_terms(3 * e_t + 1, e_t)
    assert distance < 1e-6 and angle < 1e-6


# --- CC ------------------------------------------------------------------------------------------

def plain_cc(h_s, h_t):
    """RepDistiller's Correlation written out: mean over n of sum_k |d_n,k| * |d_n+1,k|, d = h_s - h_t."""
    n, k = h_s.shape
    total = 0.0
    for i in range(n - 1):
        total = total + sum(abs(h_s[i, j] - h_t[i, j]) * abs(h_s[i + 1, j] - h_t[i + 1, j]) for j in range(k))
    return total / (n - 1)


def test_cc_equals_the_authors_formula(gen):
    h_s, h_t = randn(gen, N, 6), randn(gen, N, 6)
    same_value_and_grads(correlation_congruence, plain_cc, (h_s, h_t))


def test_cc_heads_are_sized_from_the_pair_and_trained(gen):
    torch.manual_seed(0)
    loss = CorrelationCongruence(feat_dim=5)
    assert list(loss.parameters()) == []
    loss.bind(net("S", embedding=8), net("T", embedding=20))
    assert (loss.head_student.in_features, loss.head_student.out_features) == (8, 5)
    assert (loss.head_teacher.in_features, loss.head_teacher.out_features) == (20, 5)
    assert set(loss.state_dict()) == {"head_student.weight", "head_student.bias", "head_teacher.weight",
                                      "head_teacher.bias"}
    e_s, e_t, logits, labels = randn(gen, N, 8), randn(gen, N, 20), randn(gen, N, C), labels_for(gen)
    heads = [loss.head_student.weight, loss.head_student.bias, loss.head_teacher.weight, loss.head_teacher.bias]

    def ours(s, t):
        return loss(ModelOutputs(logits, embedding=s), ModelOutputs(embedding=t), labels)[1]["cc"]

    def reference(s, t, w_s, b_s, w_t, b_t):
        return plain_cc(s @ w_s.t() + b_s, t @ w_t.t() + b_t)

    # The heads' gradients too: compare against the plain formula on copies of their weights.
    a, b = leaves(e_s, e_t), leaves(e_s, e_t, *heads)
    mine, theirs = ours(*a), reference(*b)
    close(mine, theirs)
    mine.backward()
    theirs.backward()
    for param, copy in zip(heads, b[2:]):
        close(param.grad, copy.grad)
    close(a[0].grad, b[0].grad)
    total, parts = loss(ModelOutputs(logits, embedding=e_s), ModelOutputs(embedding=e_t), labels)
    assert set(parts) == {"ce", "cc"}
    close(total, F.cross_entropy(logits, labels) + 0.02 * parts["cc"])


# --- NST -----------------------------------------------------------------------------------------

def plain_nst_stage(f_s, f_t):
    """The suites' nst_loss written out with loops: pool the larger map (integer factors), normalise
    each channel's flattened map, poly kernel <a, b>^2, MMD^2 = mean k(t,t) + mean k(s,s) - 2 mean k(s,t)."""
    size = min(f_s.shape[2], f_t.shape[2])
    f_s, f_t = F.avg_pool2d(f_s, f_s.shape[2] // size), F.avg_pool2d(f_t, f_t.shape[2] // size)

    def channels(f):
        flat = f.flatten(2)
        return flat / flat.pow(2).sum(dim=2, keepdim=True).sqrt()

    def kernel_mean(a, b):
        values = [(a[n, i] * b[n, j]).sum() ** 2 for n in range(a.shape[0])
                  for i in range(a.shape[1]) for j in range(b.shape[1])]
        return sum(values) / len(values)

    a, b = channels(f_s), channels(f_t)
    return kernel_mean(b, b).detach() + kernel_mean(a, a) - 2 * kernel_mean(a, b)


def test_nst_equals_the_authors_formula(gen):
    student, teacher = net("S", (3, 4), (8, 2)), net("T", (5, 2), (4, 4))
    s_stages, t_stages = stages_for(gen, student, n=3), stages_for(gen, teacher, n=3)
    same_value_and_grads(lambda *s: neuron_selectivity_transfer(s, t_stages),
                         lambda *s: plain_nst_stage(s[0], t_stages[0]) + plain_nst_stage(s[1], t_stages[1]),
                         s_stages)


def test_nst_pairs_stages_from_the_first(gen):
    student, teacher = net("S", (4, 6, 8), (8, 4, 2)), net("T", (5, 7), (8, 4))
    loss = NeuronSelectivityTransfer()
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0", "stage1") and (loss.ce_weight, loss.distill_weight) == (1.0, 50.0)
    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    logits, labels = randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=t_stages), labels)
    assert set(parts) == {"ce", "nst"}
    close(parts["nst"], neuron_selectivity_transfer(s_stages[:2], t_stages))
    close(total, F.cross_entropy(logits, labels) + 50 * parts["nst"], atol=1e-5)
    assert neuron_selectivity_transfer(t_stages, t_stages).abs() < 1e-6  # the MMD of equal maps
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}


# --- ICKD ----------------------------------------------------------------------------------------

def plain_ickd(f_s, f_t):
    """The authors' CIFAR batch_loss after the embedding, written out per sample and channel pair:
    G[n, i, j] = <f_i, f_j> / ||(<f_i, f_k>)_k||, loss = sum (G_s - G_t)^2 / (C * N)."""
    n, c = f_t.shape[:2]

    def gram(f):
        flat = f.flatten(2)
        rows = []
        for sample in range(n):
            g = torch.stack([torch.stack([(flat[sample, i] * flat[sample, j]).sum() for j in range(c)])
                             for i in range(c)])
            rows.append(g / g.pow(2).sum(dim=1, keepdim=True).sqrt())
        return torch.stack(rows)

    return (gram(f_s) - gram(f_t)).pow(2).sum() / (c * n)


def test_ickd_equals_the_authors_formula_and_torchdistill_times_the_batch(gen, td):
    f_s, f_t = randn(gen, N, 5, 4, 4), randn(gen, N, 5, 2, 2).abs()
    same_value_and_grads(inter_channel_correlation, plain_ickd, (f_s, f_t))
    # torchdistill's ChSimLoss divides by one more N (its ImageNet code); otherwise the same.
    chsim = td.ChSimLoss({"pair": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"},
                                   "weight": 1}})
    same_value_and_grads(inter_channel_correlation,
                         lambda s, t: N * chsim({"s": {"output": s}}, {"t": {"output": t}}), (f_s, f_t))


def test_ickd_embeds_the_student_stage_and_owns_its_state(gen):
    torch.manual_seed(0)
    student, teacher = net("S", (4, 6, 8), (8, 4, 2)), net("T", (5, 16), (8, 4))
    loss = InterChannelCorrelation()
    loss.bind(student, teacher)
    assert (loss.student_stage, loss.teacher_stage, loss.teacher_fields) == (2, 1, ("stage1",))
    conv, bn = loss.embedding.conv, loss.embedding.bn
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (8, 16, (1, 1), None)
    assert bn.num_features == 16
    assert set(loss.state_dict()) == {"embedding.conv.weight", "embedding.bn.weight", "embedding.bn.bias",
                                      "embedding.bn.running_mean", "embedding.bn.running_var",
                                      "embedding.bn.num_batches_tracked"}
    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    logits, labels = randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=(None, t_stages[1])), labels)
    assert set(parts) == {"ce", "ickd"}
    embedded = F.batch_norm(F.conv2d(s_stages[2], conv.weight), None, None, bn.weight, bn.bias, training=True)
    close(parts["ickd"], plain_ickd(embedded, t_stages[1]), atol=1e-5)
    close(total, F.cross_entropy(logits, labels) + 2.5 * parts["ickd"], atol=1e-5)
    parts["ickd"].backward()
    assert conv.weight.grad.abs().sum() > 0 and int(bn.num_batches_tracked) == 1


def test_ickd_adds_kd_when_asked(gen):
    loss = InterChannelCorrelation(kd_weight=1.0)
    student, teacher = net("S"), net("T")
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage2", "logits")
    from kdresearch.losses.kd import soft_target_kd

    s_logits, t_logits, labels = randn(gen, N, C), randn(gen, N, C), labels_for(gen)
    s_stages, t_stages = stages_for(gen, student), stages_for(gen, teacher)
    total, parts = loss(ModelOutputs(s_logits, stages=s_stages), ModelOutputs(t_logits, stages=t_stages), labels)
    assert set(parts) == {"ce", "ickd", "kd"}
    close(parts["kd"], soft_target_kd(s_logits, t_logits, 4.0))
    close(total, parts["ce"] + 2.5 * parts["ickd"] + parts["kd"], atol=1e-5)
    with pytest.raises(KDResearchError, match="same classes"):
        InterChannelCorrelation(kd_weight=1.0).bind(student, net("T100", classes=100))


# --- FSP -----------------------------------------------------------------------------------------

def plain_fsp_matrix(first, second):
    """RepDistiller's compute_fsp for one pair, with loops: pool the larger map (integer factors),
    G[n, j, i] = mean over positions of second[n, j] * first[n, i]."""
    size = min(first.shape[2], second.shape[2])
    first, second = F.avg_pool2d(first, first.shape[2] // size), F.avg_pool2d(second, second.shape[2] // size)
    n, c_first, c_second = first.shape[0], first.shape[1], second.shape[1]
    return torch.stack([torch.stack([torch.stack([(second[k, j] * first[k, i]).mean() for i in range(c_first)])
                                     for j in range(c_second)]) for k in range(n)])


def plain_fsp(student_stages, teacher_stages):
    """RepDistiller's FSP forward: per consecutive pair mean((G_s - G_t)^2), summed."""
    return sum((plain_fsp_matrix(s1, s2) - plain_fsp_matrix(t1, t2)).pow(2).mean()
               for (s1, s2), (t1, t2) in zip(zip(student_stages, student_stages[1:]),
                                             zip(teacher_stages, teacher_stages[1:])))


def test_fsp_equals_the_authors_formula(gen):
    student, teacher = net("S", (3, 4, 5), (8, 4, 4)), net("T", (3, 4, 5), (4, 8, 2))
    s_stages, t_stages = stages_for(gen, student, n=3), stages_for(gen, teacher, n=3)
    assert fsp_matrix(s_stages[0], s_stages[1]).shape == (3, 4, 3)
    close(fsp_matrix(t_stages[0], t_stages[1]), plain_fsp_matrix(t_stages[0], t_stages[1]))
    same_value_and_grads(lambda *s: flow_of_solution_procedure(s, t_stages), lambda *s: plain_fsp(s, t_stages),
                         s_stages)


def progress(epoch, epochs=4):
    return Progress(epoch=epoch, step=1, epochs=epochs, steps_per_epoch=1)


def test_fsp_trains_features_alone_then_the_classifier(gen):
    model = net("M", (4, 6, 8), (8, 4, 2))
    loss = FlowOfSolutionProcedure(init_epochs=2, ce_weight=0.5, distill_weight=3.0)
    loss.bind(model, model)
    assert loss.teacher_fields == ("stage0", "stage1", "stage2")
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}
    s_stages = tuple(leaves(*stages_for(gen, model)))
    t_stages = stages_for(gen, model)
    logits, labels = randn(gen, N, C).requires_grad_(True), labels_for(gen)
    expected_fsp = flow_of_solution_procedure(s_stages, t_stages)
    for epoch in (1, 2):  # the init stage: FSP alone, the classifier untouched
        total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=t_stages), labels,
                            progress(epoch))
        assert set(parts) == {"ce", "fsp"}
        close(total, expected_fsp)
        close(parts["ce"], F.cross_entropy(logits, labels))
        assert torch.autograd.grad(total, logits, allow_unused=True) == (None,)
    total, parts = loss(ModelOutputs(logits, stages=s_stages), ModelOutputs(None, stages=t_stages), labels,
                        progress(3))
    close(total, 0.5 * F.cross_entropy(logits, labels) + 3.0 * expected_fsp)
    assert torch.autograd.grad(total, logits)[0].abs().sum() > 0


def test_fsp_defaults_to_the_classifier_alone_after_its_init_stage(gen):
    model = net("M", (4, 6), (8, 4))
    loss = FlowOfSolutionProcedure()
    loss.bind(model, model)
    logits, labels = randn(gen, N, C), labels_for(gen)
    total, parts = loss(ModelOutputs(logits, stages=stages_for(gen, model)),
                        ModelOutputs(None, stages=stages_for(gen, model)), labels, progress(31, epochs=40))
    close(total, F.cross_entropy(logits, labels))
    assert parts["fsp"] > 0  # still logged


@pytest.mark.parametrize("student, teacher, problem", [
    (net("Narrow", (4, 6), (8, 4)), net("Wide", (4, 12), (8, 4)),
     "both models need the same stage channels ((4, 6) vs (4, 12))"),
    (net("Short", (4, 6), (8, 4)), net("Long", (4, 6, 8), (8, 4, 2)),
     "both models need the same stage channels ((4, 6) vs (4, 6, 8))"),
    (net("One", (4,), (8,)), net("One", (4,), (8,)), "FSP matrices need at least two stages"),
])
def test_fsp_refuses_pairs_it_cannot_compare(student, teacher, problem):
    with pytest.raises(KDResearchError) as raised:
        FlowOfSolutionProcedure().bind(student, teacher)
    assert_pair_refused(raised, "fsp", student, teacher, problem)


def test_fsp_refuses_an_init_stage_under_distributed_training(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    model = net("M", (4, 6), (8, 4))
    with pytest.raises(KDResearchError, match=r"loss=fsp: the init stage \(loss.init_epochs=30\) trains without"):
        FlowOfSolutionProcedure().bind(model, model)
    FlowOfSolutionProcedure(init_epochs=0, distill_weight=1.0).bind(model, model)  # joint FSP + CE is fine


def test_fsp_refuses_an_init_stage_that_leaves_no_epoch_and_a_call_without_progress(gen):
    model = net("M", (4, 6), (8, 4))
    loss = FlowOfSolutionProcedure(init_epochs=3)
    loss.bind(model, model)
    s = ModelOutputs(randn(gen, N, C), stages=stages_for(gen, model))
    t = ModelOutputs(None, stages=stages_for(gen, model))
    with pytest.raises(KDResearchError) as raised:
        loss(s, t, labels_for(gen), progress(1, epochs=3))
    assert one_line(raised) == ("loss=fsp: loss.init_epochs=3 leaves none of the 3 epochs to train the classifier; "
                                "set epochs above 3 or lower loss.init_epochs")
    with pytest.raises(KDResearchError, match="loss=fsp needs the epoch"):
        loss(s, t, labels_for(gen))


# --- shared: precision, batches of one, options, refusals ------------------------------------------

def method_inputs(gen, n=N):
    """(student outputs, teacher outputs) with every field a method may read (the stage channels
    equal, for FSP)."""
    student, teacher = net("S"), net("T", (4, 6, 8), (16, 4, 2), embedding=16)
    s = ModelOutputs(randn(gen, n, C), randn(gen, n, 12), stages_for(gen, student, n))
    t = ModelOutputs(randn(gen, n, C), randn(gen, n, 16), stages_for(gen, teacher, n))
    return student, teacher, s, t


METHODS = {"sp": SimilarityPreserving, "pkt": ProbabilisticKnowledgeTransfer, "rkd": RelationalKD,
           "cc": CorrelationCongruence, "nst": NeuronSelectivityTransfer, "ickd": InterChannelCorrelation,
           "fsp": functools.partial(FlowOfSolutionProcedure, init_epochs=0, distill_weight=1.0)}
PROGRESS = Progress(epoch=1, step=1, epochs=2, steps_per_epoch=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_terms_stay_float32_under_bf16_autocast(gen, name):
    student, teacher, s, t = method_inputs(gen)
    loss = METHODS[name]()
    loss.bind(student, teacher)
    _, exact = loss(s, t, labels_for(gen), PROGRESS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts = loss(s, t, labels_for(gen), PROGRESS)
    for part, value in parts.items():
        assert value.dtype == torch.float32, part
    # Float32 arithmetic from the (bf16) features on: within bf16 rounding of the inputs, not of products.
    close(parts[name], exact[name], rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_batch_of_one_sample_gives_a_finite_loss(gen, name):
    student, teacher, s, t = method_inputs(gen, n=1)
    loss = METHODS[name]()
    loss.bind(student, teacher)
    _, parts = loss(s, t, labels_for(gen, 1), PROGRESS)
    assert all(math.isfinite(float(value.detach())) for value in parts.values()), parts
    if name in ("rkd", "cc"):  # nothing to relate: the suites' code gives NaN here
        assert float(parts[name]) == 0.0


@pytest.mark.parametrize("name, cls", [("sp", SimilarityPreserving), ("ickd", InterChannelCorrelation)])
@pytest.mark.parametrize("stage", [3, -3])
def test_a_stage_one_model_lacks_is_refused(name, cls, stage):
    with pytest.raises(KDResearchError) as raised:
        cls(stage=stage).bind(net("Deep", (4, 6, 8), (8, 4, 2)), net("Shallow", (5, 7), (8, 4)))
    message = one_line(raised)
    assert message.startswith(f"loss={name}: loss.stage={stage} is out of range (the student has 3 stages, "
                              f"the teacher 2)")
    assert "student Deep (stages 4x8x8" in message and "teacher Shallow (stages 5x8x8" in message


def test_nst_refuses_a_model_without_stages():
    with pytest.raises(KDResearchError) as raised:
        NeuronSelectivityTransfer().bind(net("Flat", (), ()), net("T"))
    message = one_line(raised)
    assert message.startswith("loss=nst: ") and "student Flat" in message and "teacher T" in message


@pytest.mark.parametrize("cls, options, message", [
    (SimilarityPreserving, {"stage": "last"}, "loss.stage must be an integer"),
    (InterChannelCorrelation, {"stage": 1.5}, "loss.stage must be an integer"),
    (InterChannelCorrelation, {"T": 0}, "loss.T must be > 0"),
    (InterChannelCorrelation, {"T": 1000}, "loss.T must be <= 100"),
    (RelationalKD, {"angle_weight": -1}, "loss.angle_weight must be >= 0"),
    (RelationalKD, {"distance_weight": "x"}, "loss.distance_weight must be a number"),
    (CorrelationCongruence, {"feat_dim": 0}, "loss.feat_dim must be an integer >= 1"),
    (ProbabilisticKnowledgeTransfer, {"distill_weight": -2}, "loss.distill_weight must be >= 0"),
    (FlowOfSolutionProcedure, {"init_epochs": -1}, "loss.init_epochs must be an integer >= 0"),
    (FlowOfSolutionProcedure, {"init_epochs": 2.5}, "loss.init_epochs must be an integer >= 0"),
])
def test_bad_options_are_refused(cls, options, message):
    with pytest.raises(KDResearchError, match=message):
        cls(**options)


# --- configs and jobs ----------------------------------------------------------------------------

DEFAULTS = {  # conf/loss/<name>.yaml -> the class and the suites' defaults it must build
    "sp": (SimilarityPreserving, {"stage": -1, "ce_weight": 1.0, "distill_weight": 3000.0}),
    "pkt": (ProbabilisticKnowledgeTransfer, {"ce_weight": 1.0, "distill_weight": 30000.0}),
    "rkd": (RelationalKD, {"distance_weight": 25.0, "angle_weight": 50.0, "ce_weight": 1.0, "distill_weight": 1.0}),
    "cc": (CorrelationCongruence, {"feat_dim": 128, "ce_weight": 1.0, "distill_weight": 0.02}),
    "nst": (NeuronSelectivityTransfer, {"ce_weight": 1.0, "distill_weight": 50.0}),
    "ickd": (InterChannelCorrelation, {"stage": -1, "ce_weight": 1.0, "distill_weight": 2.5, "kd_weight": 0.0,
                                       "T": 4.0}),
    "fsp": (FlowOfSolutionProcedure, {"init_epochs": 30, "ce_weight": 1.0, "distill_weight": 0.0}),
}
JOB = ["debug=tiny", "data.limit_train=128", "data.limit_test=64", "model=resnet8",
       "teacher=resnet20", "device=cpu", "epochs=2", "batch_size=64", "teacher.batch_size=64", "optimizer=sgd",
       "optimizer.lr=0.05"]
JOBS = {  # loss overrides -> the parts it must log (FSP: epoch 1 its init stage, epoch 2 the classifier)
    "sp": (["loss=sp"], {"sp"}),
    "pkt": (["loss=pkt"], {"pkt"}),
    "rkd": (["loss=rkd"], {"rkd", "rkd_distance", "rkd_angle"}),
    "cc": (["loss=cc"], {"cc"}),
    "nst": (["loss=nst"], {"nst"}),
    "ickd": (["loss=ickd"], {"ickd"}),
    "fsp": (["loss=fsp", "loss.init_epochs=1"], {"fsp"}),
}


def job_config(store: Path, *overrides: str):
    return compose_job(store, *JOB, *overrides)


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_config_file_builds_the_defaults(name):
    assert_builds_defaults(name, *DEFAULTS[name])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-methods")  # one store: the teacher is trained once, then reused


@pytest.mark.slow  # a teacher and two jobs per method: the methods' loss values are checked in the default run
@pytest.mark.parametrize("name", list(JOBS))
def test_method_trains_logs_its_parts_and_resumes_exactly(store, name):
    overrides, logged = JOBS[name]
    job = run_job(job_config(store, *overrides), store / name)
    client = mlflow_client(store)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert {f"train/{part}" for part in logged | {"ce", "loss"}} <= set(metrics)
    assert all(math.isfinite(metrics[f"train/{part}"]) for part in logged)

    if name == "fsp":  # the init stage (epoch 1) left the classifier exactly as initialised; epoch 2 trained it
        cfg = job_config(store, *overrides)
        seed_everything(cfg.seed)
        initial = build(cfg.model, "model").state_dict()
        after_init = load_checkpoint(store / name / "checkpoints" / "epoch_0001.pt")["model"]
        final = load_checkpoint(job.checkpoint)["model"]
        for key in ("fc.weight", "fc.bias"):
            assert torch.equal(after_init[key], initial[key]) and not torch.equal(final[key], initial[key]), key
        assert not torch.equal(after_init["conv1.weight"], initial["conv1.weight"])

    interrupted = store / f"{name}-interrupted"
    interrupted_after_epoch_1(client, job, interrupted)
    resumed = run_job(job_config(store, *overrides, f"resume={interrupted}"), store / f"{name}-unused")
    assert_resumed_exactly(job.checkpoint, resumed.checkpoint)
    teachers = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name.startswith("resnet20")]
    assert len(teachers) == 1  # every method reused the one teacher


def test_a_pair_the_loss_cannot_serve_is_refused_before_training(store):
    client = mlflow_client(store)

    def runs():
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    before = len(runs())
    with pytest.raises(KDResearchError) as raised:
        run_job(job_config(store, "loss=sp", "loss.stage=3"), store / "refused")
    message = one_line(raised)
    assert message.startswith("loss=sp: loss.stage=3 is out of range (the student has 3 stages, the teacher 3)")
    assert "student resnet8 (stages 16x32x32" in message and "teacher resnet20 (stages 16x32x32" in message
    assert len(runs()) == before and not (store / "refused").exists()  # no run, no teacher, no checkpoint
