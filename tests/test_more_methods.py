"""NKD, WTTM, KD-SVD and VID against independent implementations on fixed tensors (values and
gradients), their pair checks and validation, and one short job per method on a zoo pair that
resumes bit-exactly from its epoch-1 checkpoint.

References: VID against torchdistill's own `VIDLoss` and `Regressor4VID` (torchdistill 1.1.5).
NKD, WTTM and KD-SVD against plain implementations written here (loops over samples, float64),
not calling the modules. Their values on the fixed tensors were also computed with the authors'
published code and are pinned below (AUTHORS_*): NKD with cls_KD's `NKDLoss`
(mmcls/models/dis_losses/nkd.py), WTTM with zkxufo/TTM's `WTTM` (distiller_zoo/wttm.py), KD-SVD
with RepDistiller's `KDSVD` (distiller_zoo/KDSVD.py, the suites' port of the authors' TensorFlow
code), each run on exactly these tensors in float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, assert_resumed_exactly, experiment_runs, interrupted_after_epoch_1
from loss_checks import one_line
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from kdresearch.architectures.resnet import resnet8, resnet20, resnet32x4
from kdresearch.errors import KDResearchError
from kdresearch.losses.kdsvd import KDSVD
from kdresearch.losses.nkd import NKD
from kdresearch.losses.vid import VID
from kdresearch.losses.wttm import WTTM
from kdresearch.models import DeepNN, LightNN, ModelOutputs, Network
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import run_job

N, C = 12, 7

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def logits_case(gen):
    """The fixed logits and labels every logit test uses (and the pinned authors' values)."""
    student = 3 * torch.randn(N, C, generator=gen)
    teacher = 2 * torch.randn(N, C, generator=gen) + 1
    labels = torch.randint(0, C, (N,), generator=gen)
    return student, teacher, labels


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


def net(name: str, channels, sizes, classes: int = C) -> Network:
    """A Network with shape facts only: `bind` never runs a forward pass."""
    cls = type(name, (Network,), {"stage_channels": tuple(channels), "stage_sizes": tuple(sizes),
                                  "embedding_dim": 64, "num_classes": classes})
    return cls()


def loss_and_grad(loss_fn, student, teacher, labels):
    """(total, parts, d total / d student logits) of a logit loss."""
    student = student.clone().requires_grad_(True)
    total, parts = loss_fn(ModelOutputs(student), ModelOutputs(teacher), labels)
    total.backward()
    return total, parts, student.grad


def reference_grad(reference, student, *args):
    """(value, d value / d student) of a float64 reference."""
    student = student.double().clone().requires_grad_(True)
    value = reference(student, *args)
    value.backward()
    return value, student.grad


# --- plain references (float64, a loop over samples) ------------------------------------------------

def plain_log_softmax(z):
    return z - torch.logsumexp(z, dim=0)


def plain_ce(student, labels):
    return -sum(plain_log_softmax(z)[y] for z, y in zip(student, labels.tolist())) / len(labels)


def plain_zscore(z):
    """Sun et al.'s Z-score as their code computes it: sample std (divisor C - 1), + 1e-7."""
    mean = z.mean()
    std = torch.sqrt(((z - mean) ** 2).sum() / (len(z) - 1))
    return (z - mean) / (std + 1e-7)


def plain_nkd(student, teacher, labels, T, gamma):
    """NKD from the paper's formula: -p^t_y log p^s_y, plus gamma T^2 times the cross-entropy of the
    softmaxes over the non-target classes (the target removed from the list), at T; batch means."""
    teacher = teacher.double()
    target = non_target = 0.0
    for z_s, z_t, y in zip(student, teacher, labels.tolist()):
        target = target - plain_log_softmax(z_t).exp()[y] * plain_log_softmax(z_s)[y]
        others = [c for c in range(len(z_s)) if c != y]
        q_t = plain_log_softmax(z_t[others] / T).exp()
        non_target = non_target - (q_t * plain_log_softmax(z_s[others] / T)).sum()
    return (target + gamma * T**2 * non_target) / len(labels)


def plain_wttm(student, teacher, T):
    """WTTM from the paper's formula: per sample U = sum_c p_c^(1/T), the transformed teacher
    p^(1/T) / U, and U * KL(transformed || softmax(student)); batch mean."""
    teacher = teacher.double()
    total = 0.0
    for z_s, z_t in zip(student, teacher):
        p_t = z_t.exp() / z_t.exp().sum()
        powered = p_t ** (1 / T)
        power_sum = powered.sum()
        transformed = powered / power_sum
        total = total + power_sum * (transformed * (transformed.log() - plain_log_softmax(z_s))).sum()
    return total / len(student)


def plain_directions(f, count):
    """Of one sample's (C, H, W) map read as X = (H*W) x C: the first `count` singular values
    (normalised as a vector) and right singular vectors (columns, each normalised)."""
    x = f.reshape(f.shape[0], -1).t()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[:count].t()
    return s[:count] / s[:count].norm(), v / v.norm(dim=0, keepdim=True)


def plain_kdsvd(student_stages, teacher_stages, k):
    """KD-SVD from the paper's (and RepDistiller's) steps, one sample at a time: align each teacher
    vector with the student's (of k + 3) of largest |cosine| (times its sign), scale both by the
    teacher's singular values, and sum the squared RBF differences between consecutive stages."""
    total = 0.0
    n = student_stages[0].shape[0]
    for i in range(n):
        previous = None
        for f_s, f_t in zip(student_stages, teacher_stages):
            s_t, v_t = plain_directions(f_t[i].double(), k)
            _, v_s_all = plain_directions(f_s[i], k + 3)
            columns = []
            for j in range(v_t.shape[1]):
                cosines = [float((v_s_all[:, m] @ v_t[:, j]).detach()) for m in range(v_s_all.shape[1])]
                best = max(range(len(cosines)), key=lambda m: abs(cosines[m]))
                columns.append(math.copysign(1.0, cosines[best]) * v_s_all[:, best])
            w_s, w_t = torch.stack(columns, dim=1) * s_t, v_t * s_t
            if previous is not None:
                p_s, p_t = previous
                for j in range(w_t.shape[1]):
                    g_s = torch.exp(-(w_s[:, j, None] - p_s[None, :, j]) ** 2 / 8)
                    g_t = torch.exp(-(w_t[:, j, None] - p_t[None, :, j]) ** 2 / 8)
                    total = total + ((g_s - g_t) ** 2).sum()
            previous = (w_s, w_t)
    return total / n


# Values of the authors' code on `logits_case` / `svd_case` (module docstring).
AUTHORS_NKD = {(3.0, 3.5): 66.7056274414, (1.0, 1.5): 6.3726234436}  # cls_KD NKDLoss(temp, gamma)
AUTHORS_WTTM = {5.0: 9.4684572220, 2.0: 5.1184344292}  # zkxufo/TTM WTTM(l = 1 / T)
AUTHORS_KDSVD = {1: 0.2407742441, 2: 0.1722871065}  # RepDistiller KDSVD(k), summed over its list


# --- NKD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, gamma", [(3.0, 3.5), (1.0, 1.5)])
def test_nkd_matches_its_formula_and_the_authors_code(gen, T, gamma):
    student, teacher, labels = logits_case(gen)
    loss = NKD(T=T, gamma=gamma, ce_weight=0.5)
    total, parts, grad = loss_and_grad(loss, student, teacher, labels)
    assert set(parts) == {"ce", "nkd_target", "nkd_non_target", "nkd"}

    expected, expected_grad = reference_grad(
        lambda s: 0.5 * plain_ce(s, labels) + plain_nkd(s, teacher, labels, T, gamma), student)
    close(total, expected, atol=1e-5)
    close(grad, expected_grad, atol=1e-6)
    close(parts["nkd"], plain_nkd(student.double(), teacher, labels, T, gamma), atol=1e-5)
    close(parts["nkd"], AUTHORS_NKD[(T, gamma)], atol=1e-4)
    close(parts["nkd"], parts["nkd_target"] + gamma * parts["nkd_non_target"])
    close(parts["ce"], plain_ce(student.double(), labels))


def test_nkd_with_standardize_is_nkd_of_zscored_logits(gen):
    student, teacher, labels = logits_case(gen)
    total, parts, grad = loss_and_grad(NKD(standardize=True), student, teacher, labels)

    def reference(s):
        zs = torch.stack([plain_zscore(z) for z in s])
        zt = torch.stack([plain_zscore(z) for z in teacher.double()])
        return plain_ce(s, labels) + plain_nkd(zs, zt, labels, 3.0, 3.5)  # CE on the raw logits

    expected, expected_grad = reference_grad(reference, student)
    close(total, expected, atol=1e-4)
    close(grad, expected_grad, atol=1e-5)
    # Standardised, the term ignores each model's logit scale and offset.
    shifted = NKD(standardize=True)(ModelOutputs(student * 4 + 2), ModelOutputs(teacher * 0.3 - 1), labels)[1]
    close(shifted["nkd"], parts["nkd"], atol=1e-4)


def test_nkd_defaults_are_the_authors_cifar100_setting():
    loss = NKD()
    assert (loss.T, loss.gamma, loss.ce_weight, loss.standardize) == (3.0, 3.5, 1.0, False)
    cfg = OmegaConf.load(CONF_DIR / "loss" / "nkd.yaml")
    assert (cfg.T, cfg.gamma, cfg.ce_weight, cfg.standardize) == (3, 3.5, 1.0, False)


# --- WTTM -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [5.0, 2.0])
def test_wttm_matches_its_formula_and_the_authors_code(gen, T):
    student, teacher, labels = logits_case(gen)
    total, parts, grad = loss_and_grad(WTTM(T=T, ce_weight=0.5, distill_weight=3.0), student, teacher, labels)
    assert set(parts) == {"ce", "wttm"}
    expected, expected_grad = reference_grad(
        lambda s: 0.5 * plain_ce(s, labels) + 3.0 * plain_wttm(s, teacher, T), student)
    close(total, expected, atol=1e-5)
    close(grad, expected_grad, atol=1e-6)
    close(parts["wttm"], AUTHORS_WTTM[T], atol=1e-4)


def test_wttm_with_standardize_is_wttm_of_zscored_logits(gen):
    student, teacher, labels = logits_case(gen)
    total, parts, grad = loss_and_grad(WTTM(standardize=True), student, teacher, labels)

    def reference(s):
        zs = torch.stack([plain_zscore(z) for z in s])
        zt = torch.stack([plain_zscore(z) for z in teacher.double()])
        return plain_ce(s, labels) + 4.0 * plain_wttm(zs, zt, 5.0)

    expected, expected_grad = reference_grad(reference, student)
    close(total, expected, atol=1e-4)
    close(grad, expected_grad, atol=1e-5)


def test_wttm_weights_samples_by_the_teachers_uncertainty(gen):
    """U is 1 for a one-hot teacher and C^(1 - 1/T) for a uniform one: the same KL weighs more
    on the uncertain sample; and at T = 1 (no transform) WTTM is KL(p_t || p_s) itself."""
    student = torch.zeros(2, C)
    sharp, flat = torch.full((1, C), -1e4), torch.zeros(1, C)
    sharp[0, 0] = 0
    loss = WTTM(T=4)
    close(loss.distillation_term(ModelOutputs(student[:1]), ModelOutputs(flat)), 0.0, atol=1e-6)  # equal: KL 0
    one_hot_term = loss.distillation_term(ModelOutputs(student[:1]), ModelOutputs(sharp))
    close(one_hot_term, math.log(C), atol=1e-5)  # U = 1, KL(one-hot || uniform) = log C
    peaked = torch.arange(C, dtype=torch.float32)[None]  # a student that is not uniform
    kl_from_uniform = -math.log(C) - F.log_softmax(peaked, 1).mean()
    uniform_term = loss.distillation_term(ModelOutputs(peaked), ModelOutputs(flat))
    close(uniform_term, C ** (1 - 1 / 4) * kl_from_uniform, atol=1e-5)  # U = C^(1 - 1/T)
    student, teacher, _ = logits_case(gen)
    kl = (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(student, 1))).sum(1).mean()
    close(WTTM(T=1).distillation_term(ModelOutputs(student), ModelOutputs(teacher)), kl, atol=1e-5)


def test_wttm_defaults():
    loss = WTTM()
    assert (loss.T, loss.ce_weight, loss.distill_weight, loss.standardize) == (5.0, 1.0, 4.0, False)
    cfg = OmegaConf.load(CONF_DIR / "loss" / "wttm.yaml")
    assert (cfg.T, cfg.ce_weight, cfg.distill_weight, cfg.standardize) == (5, 1.0, 4.0, False)


# --- KD-SVD ---------------------------------------------------------------------------------------

def svd_case(gen):
    """Three post-ReLU stages; stage 1 of the teacher is larger (sizes may differ, channels not),
    stage 2 has fewer positions than channels (4 singular vectors: at k = 2 the student offers 4
    instead of k + 3 = 5, as the suites' slicing does)."""
    student = [torch.randn(4, c, s, s, generator=gen).relu() for c, s in ((8, 8), (16, 4), (32, 2))]
    teacher = [torch.randn(4, c, s, s, generator=gen).relu() for c, s in ((8, 8), (16, 8), (32, 2))]
    return student, teacher


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_its_formula_and_repdistiller(gen, k):
    student_stages, teacher_stages = svd_case(gen)
    student = net("S", (8, 16, 32), (8, 4, 2))
    teacher = net("T", (8, 16, 32), (8, 8, 2))
    loss = KDSVD(k=k, ce_weight=0.5, distill_weight=2.0)
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0", "stage1", "stage2")

    stages = [f.clone().requires_grad_(True) for f in student_stages]
    logits, labels = torch.randn(4, C, generator=gen), torch.tensor([0, 1, 2, 3])
    total, parts = loss(ModelOutputs(logits, stages=tuple(stages)), ModelOutputs(None, stages=tuple(teacher_stages)),
                        labels)
    assert set(parts) == {"ce", "kdsvd"}
    parts["kdsvd"].backward()

    reference_stages = [f.double().clone().requires_grad_(True) for f in student_stages]
    expected = plain_kdsvd(reference_stages, teacher_stages, k)
    expected.backward()
    close(parts["kdsvd"], expected, atol=1e-5, rtol=1e-3)  # float32 SVD against float64
    close(total, 0.5 * float(F.cross_entropy(logits, labels)) + 2.0 * float(expected.detach()), atol=1e-4, rtol=1e-3)
    close(parts["kdsvd"], AUTHORS_KDSVD[k], atol=1e-6)
    for got, want in zip(stages, reference_stages):
        close(got.grad, want.grad, atol=1e-5, rtol=1e-2)
    assert all(float(f.grad.abs().sum()) > 0 for f in stages)


def test_kdsvd_is_zero_for_equal_stages_and_owns_nothing(gen):
    stages, _ = svd_case(gen)
    loss = KDSVD()
    loss.bind(net("S", (8, 16, 32), (8, 4, 2)), net("T", (8, 16, 32), (8, 4, 2)))
    term = loss.distillation_term(ModelOutputs(stages=tuple(stages)), ModelOutputs(stages=tuple(stages)))
    assert abs(float(term)) < 1e-10
    assert list(loss.parameters()) == [] and dict(loss.state_dict()) == {}


def test_kdsvd_gradient_stays_finite_on_a_dead_map(gen):
    """A sample whose map is all zeros has no singular-vector gradient (torch gives NaN); its
    gradient is zeroed and the other samples' gradients are unchanged."""
    student_stages, teacher_stages = svd_case(gen)
    loss = KDSVD()
    loss.bind(net("S", (8, 16, 32), (8, 4, 2)), net("T", (8, 16, 32), (8, 8, 2)))

    def grads(stages, teachers):
        stages = [f.clone().requires_grad_(True) for f in stages]
        loss.distillation_term(ModelOutputs(stages=tuple(stages)), ModelOutputs(stages=tuple(teachers))).backward()
        return [f.grad for f in stages]

    dead = [f.clone() for f in student_stages]
    dead[1][1] = 0
    dead_grads = grads(dead, teacher_stages)
    assert all(torch.isfinite(g).all() for g in dead_grads)
    assert float(dead_grads[1][1].abs().sum()) == 0
    # Samples are decomposed independently: the others' gradients match a batch without sample 1.
    keep = [0, 2, 3]
    alone = grads([f[keep] for f in student_stages], [f[keep] for f in teacher_stages])
    for g_dead, g_alone in zip(dead_grads, alone):
        close(g_dead[keep] * 4, g_alone * 3, atol=1e-6)  # the loss divides by the batch size


def test_kdsvd_refuses_pairs_it_cannot_serve():
    with pytest.raises(KDResearchError) as raised:
        KDSVD().bind(resnet8(), resnet32x4())
    message = one_line(raised)
    assert message.startswith("loss=kdsvd: stage 0 has 16 channels in the student and 64 in the teacher")
    assert "student resnet8 (stages 16x32x32" in message and "teacher resnet32x4 (stages 64x32x32" in message

    with pytest.raises(KDResearchError) as raised:
        KDSVD().bind(net("One", (8,), (8,)), net("T", (8, 16), (8, 4)))
    assert "needs two stages in each model" in one_line(raised)

    KDSVD().bind(resnet8(), resnet20())  # the benchmark's same-width pairs fit


@pytest.mark.parametrize("k", [0, 1.5, "x", True])
def test_kdsvd_rejects_a_bad_k(k):
    with pytest.raises(KDResearchError, match="loss.k must be an integer >= 1"):
        KDSVD(k=k)


# --- VID ------------------------------------------------------------------------------------------

def test_vid_matches_torchdistill(gen):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level", reason="torchdistill is the VID reference")
    from torchdistill.models.wrapper import Regressor4VID

    student, teacher = net("S", (6, 12), (8, 4)), net("T", (10, 20), (4, 4))
    loss = VID(ce_weight=0.5, distill_weight=2.0)
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage0", "stage1")
    references = []
    for j, (s_channels, t_channels) in enumerate(zip(student.stage_channels, teacher.stage_channels)):
        reference = Regressor4VID(s_channels, t_channels, t_channels, eps=1e-5, init_pred_var=5.0).double()
        # Same start: torchdistill's softplus parameter equals ours before any training.
        close(loss.alphas[j], reference.soft_plus_param, atol=1e-6)
        with torch.no_grad():
            loss.alphas[j].add_(0.5 * torch.randn(t_channels, generator=gen))  # a learned-looking variance
            reference.soft_plus_param.copy_(loss.alphas[j])
            for index in (0, 2, 4):
                reference.regressor[index].weight.copy_(loss.regressors[j][index].weight)
        references.append(reference)

    s_stages = [torch.randn(3, c, s, s, generator=gen).relu().requires_grad_(True) for c, s in ((6, 8), (12, 4))]
    t_stages = [torch.randn(3, c, s, s, generator=gen).relu() for c, s in ((10, 4), (20, 4))]
    logits, labels = torch.randn(3, C, generator=gen), torch.tensor([0, 3, 6])
    total, parts = loss(ModelOutputs(logits, stages=tuple(s_stages)), ModelOutputs(None, stages=tuple(t_stages)),
                        labels)
    assert set(parts) == {"ce", "vid"}
    parts["vid"].backward()

    # torchdistill takes maps of one size: stage 0's larger student map is pooled first, as RepDistiller does.
    inputs = [f.detach().double().requires_grad_(True) for f in s_stages]
    pooled = [F.adaptive_avg_pool2d(inputs[0], (4, 4)), inputs[1]]
    pairs = {f"pair{j}": {"student": {"io": "output", "path": f"regressor{j}"},
                          "teacher": {"io": "output", "path": f"stage{j}"}, "weight": 1} for j in range(2)}
    student_io = {f"regressor{j}": {"output": references[j](pooled[j])} for j in range(2)}
    teacher_io = {f"stage{j}": {"output": t_stages[j].double()} for j in range(2)}
    expected = mid_level.VIDLoss(pairs)(student_io, teacher_io)
    expected.backward()

    close(parts["vid"], expected, atol=1e-5)
    close(total, 0.5 * float(F.cross_entropy(logits, labels)) + 2.0 * float(expected.detach()), atol=1e-4)
    for got, want in zip(s_stages, inputs):
        close(got.grad, want.grad, atol=1e-6)
    for j in range(2):
        close(loss.alphas[j].grad, references[j].soft_plus_param.grad, atol=1e-6)
        for index in (0, 2, 4):
            close(loss.regressors[j][index].weight.grad, references[j].regressor[index].weight.grad, atol=1e-6)


def test_vid_owns_regressors_and_variances_sized_from_the_pair():
    loss = VID()
    assert list(loss.parameters()) == []
    loss.bind(resnet8(), resnet32x4())
    convs = [[(m.in_channels, m.out_channels) for m in r if isinstance(m, nn.Conv2d)] for r in loss.regressors]
    assert convs == [[(16, 64), (64, 64), (64, 64)], [(32, 128), (128, 128), (128, 128)],
                     [(64, 256), (256, 256), (256, 256)]]
    assert all(m.bias is None for r in loss.regressors for m in r if isinstance(m, nn.Conv2d))
    assert [a.shape[0] for a in loss.alphas] == [64, 128, 256]
    close(F.softplus(loss.alphas[0]) + 1e-5, torch.full((64,), 5.0))  # starts at init_var
    trained = {id(p) for p in loss.parameters()}
    assert {id(a) for a in loss.alphas} <= trained and len(trained) == 3 * 3 + 3
    assert {"alphas.0", "alphas.2", "regressors.1.2.weight"} <= set(loss.state_dict())


def test_vid_refuses_a_model_without_stages_and_bad_values():
    with pytest.raises(KDResearchError) as raised:
        VID().bind(net("Flat", (), ()), DeepNN(num_classes=C))
    assert one_line(raised).startswith("loss=vid: VID needs at least one stage in each model")
    with pytest.raises(KDResearchError, match=r"loss.init_var must be > 1e-05 \(the variance floor loss.eps\)"):
        VID(init_var=1e-6)
    with pytest.raises(KDResearchError, match="loss.eps must be > 0"):
        VID(eps=0)


# --- what the logit losses declare, validation ----------------------------------------------------

@pytest.mark.parametrize("make", [NKD, WTTM], ids=["nkd", "wttm"])
def test_logit_losses_declare_teacher_logits_and_check_classes(make):
    loss = make()
    assert loss.needs_teacher and loss.teacher_fields == ("logits",) and not loss.student_features
    assert list(loss.parameters()) == []
    with pytest.raises(KDResearchError) as raised:
        make().bind(LightNN(num_classes=10), DeepNN(num_classes=100))
    message = one_line(raised)
    assert f"loss={loss.loss_name()}" in message and "same classes (100 vs 10)" in message


@pytest.mark.parametrize("make, key, value, message", [
    (NKD, "T", 0, "loss.T must be > 0, got 0"),
    (NKD, "gamma", -1, "loss.gamma must be >= 0, got -1"),
    (NKD, "standardize", "yes", "loss.standardize must be true or false, got 'yes'"),
    (WTTM, "T", "abc", "loss.T must be a number, got 'abc'"),
    (WTTM, "distill_weight", float("nan"), "loss.distill_weight must be finite"),
    (WTTM, "standardize", 1, "loss.standardize must be true or false, got 1"),
    (VID, "init_var", "big", "loss.init_var must be a number, got 'big'"),
    (NKD, "T", 1e9, "loss.T must be <= 100"),
    (WTTM, "T", 1e9, "loss.T must be <= 100"),
    (KDSVD, "ce_weight", "x", "loss.ce_weight must be a number, got 'x'"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_hyperparameters_give_one_line_errors(make, key, value, message):
    with pytest.raises(KDResearchError) as raised:
        make(**{key: value})
    assert message in one_line(raised)


# --- as jobs on a zoo pair: train, log the parts, resume bit-exactly --------------------------------

PAIR = ["debug=tiny", "data=synthetic", "model=resnet8", "teacher=resnet20", "device=cpu", "epochs=2",
        "optimizer=sgd", "optimizer.lr=0.05"]  # 256 images: 2 steps of 128 per epoch
PARTS = {"nkd": ("nkd", "nkd_target", "nkd_non_target"), "wttm": ("wttm",), "kdsvd": ("kdsvd",), "vid": ("vid",)}


@pytest.fixture(scope="module")
def job_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("more-methods")  # one store: the teacher is trained once, then reused


def compose_job(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*PAIR, f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                                            f"cache.dir={store / 'cache'}", *overrides])


@pytest.mark.slow  # a teacher and two jobs per method: the methods' loss values are checked in the default run
@pytest.mark.parametrize("method", list(PARTS))
def test_method_trains_logs_its_parts_and_resumes_exactly(job_store, method):
    job = run_job(compose_job(job_store, f"loss={method}"), job_store / method)
    client = MlflowClient(f"sqlite:///{job_store / 'mlflow.db'}")
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["loss"] == method
    for part in ("ce", *PARTS[method]):
        assert math.isfinite(run.data.metrics[f"train/{part}"]), f"train/{part} missing or not finite"

    interrupted = job_store / f"{method}-interrupted"
    interrupted_after_epoch_1(client, job, interrupted)
    resumed = run_job(compose_job(job_store, f"loss={method}", f"resume={interrupted}"), job_store / "unused")
    assert_resumed_exactly(job.checkpoint, resumed.checkpoint)
    if method == "vid":  # the variances trained with the student's optimizer
        alphas = load_checkpoint(job.checkpoint)["loss"]["alphas.0"]
        assert not torch.allclose(alphas, torch.full_like(alphas, math.log(math.expm1(5.0 - 1e-5))))
    teachers = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("loss") == "ce"]
    assert len(teachers) == 1  # every method reused the one teacher


def test_a_pair_kdsvd_cannot_serve_is_refused_before_training(job_store):
    client = MlflowClient(f"sqlite:///{job_store / 'mlflow.db'}")
    runs_before = {r.info.run_id for r in experiment_runs(client)}
    with pytest.raises(KDResearchError) as raised:
        run_job(compose_job(job_store, "loss=kdsvd", "teacher=resnet32x4"), job_store / "refused")
    assert one_line(raised).startswith("loss=kdsvd: stage 0 has 16 channels in the student and 64 in the teacher")
    # Nothing trained: no run opened (neither the teacher's nor the student's), no job folder.
    assert {r.info.run_id for r in experiment_runs(client)} == runs_before
    assert not (job_store / "refused").exists()
