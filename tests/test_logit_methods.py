"""The logit-based methods (logit standardisation, DKD, DIST) against plain implementations of the
papers' formulas written here with explicit loops over samples and classes in float64 Python
math, on fixed random tensors; their validation; and one short training job per loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    CONF_DIR,
    check_ok,
    experiment_runs,
    mlflow_client,
    train_in_process,
)
from omegaconf import OmegaConf
from torch import nn

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress
from kdresearch.losses.dist import DIST, dist_relations
from kdresearch.losses.dkd import DKD, dkd_terms, warmup_factor
from kdresearch.losses.kd import SoftTargetKD, soft_target_kd, standardize_logits
from kdresearch.models import DeepNN, LightNN, ModelOutputs

N, C = 12, 7


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def labels_for(gen, n=N, classes=C):
    return torch.randint(0, classes, (n,), generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=rtol)


def progress(epoch):
    return Progress(epoch=epoch, step=1, epochs=240, steps_per_epoch=10)


# --- plain references: lists of floats, loops, math.exp / math.log ------------------------------

def rows(tensor):
    return [[float(v) for v in row] for row in tensor]


def log_sum_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def log_softmax_row(z, T):
    """log softmax(z / T) by the log-sum-exp: stays finite where a probability underflows."""
    scaled = [v / T for v in z]
    norm = log_sum_exp(scaled)
    return [v - norm for v in scaled]


def softmax_row(z, T):
    return [math.exp(v) for v in log_softmax_row(z, T)]


def kl(log_p, log_q):
    """KL(p || q) = sum_i p_i (log p_i - log q_i), from log-probabilities."""
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def plain_kd(student, teacher, T):
    """Hinton's KD as the project computes it: T^2 / N * sum_n KL(softmax(t_n/T) || softmax(s_n/T))."""
    s, t = rows(student), rows(teacher)
    return T**2 / len(s) * sum(kl(log_softmax_row(tn, T), log_softmax_row(sn, T)) for sn, tn in zip(s, t))


def plain_zscore(row):
    """Sun et al.'s Z-score as their code computes it: sample std (divisor C - 1), + 1e-7."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def plain_tckd_nckd(student, teacher, labels, T):
    """DKD's two terms from their definitions: per sample, the binary distribution (p_y, 1 - p_y)
    and the softmax over the non-target classes only (target removed from the list); each KL
    summed over the batch, times T^2 / N."""
    s, t, y = rows(student), rows(teacher), [int(v) for v in labels]
    tckd = nckd = 0.0
    for sn, tn, yn in zip(s, t, y):
        others_s = [v for c, v in enumerate(sn) if c != yn]
        others_t = [v for c, v in enumerate(tn) if c != yn]
        # log p_y and log(1 - p_y) = log(sum of the non-target probabilities).
        binary_s = [log_softmax_row(sn, T)[yn],
                    log_sum_exp([v / T for v in others_s]) - log_sum_exp([v / T for v in sn])]
        binary_t = [log_softmax_row(tn, T)[yn],
                    log_sum_exp([v / T for v in others_t]) - log_sum_exp([v / T for v in tn])]
        tckd += kl(binary_t, binary_s)
        nckd += kl(log_softmax_row(others_t, T), log_softmax_row(others_s, T))
    scale = T**2 / len(s)
    return tckd * scale, nckd * scale


def pearson(a, b):
    """The textbook sample correlation of two equal-length lists."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def plain_dist(student, teacher, T):
    """DIST's relations: 1 - mean Pearson over samples (rows) and over classes (columns), times T^2."""
    ps = [softmax_row(r, T) for r in rows(student)]
    pt = [softmax_row(r, T) for r in rows(teacher)]
    n, classes = len(ps), len(ps[0])
    inter = 1 - sum(pearson(ps[i], pt[i]) for i in range(n)) / n
    columns = [([ps[i][c] for i in range(n)], [pt[i][c] for i in range(n)]) for c in range(classes)]
    intra = 1 - sum(pearson(a, b) for a, b in columns) / classes
    return T**2 * inter, T**2 * intra


# --- logit standardisation ----------------------------------------------------------------------

def test_standardized_rows_have_mean_0_and_std_1(gen):
    logits = randn(gen, N, C, scale=5) + 3
    z = standardize_logits(logits)
    close(z.mean(dim=1), torch.zeros(N), atol=1e-6, rtol=0)
    close(z.std(dim=1), torch.ones(N), atol=1e-5, rtol=0)  # sample std, as the paper's code
    for row, expected in zip(rows(logits), (plain_zscore(r) for r in rows(logits))):
        close(standardize_logits(torch.tensor([row]))[0], torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_standardize_of_constant_row_is_zero_not_nan():
    z = standardize_logits(torch.full((2, C), 3.5))
    assert torch.equal(z, torch.zeros(2, C))


@pytest.mark.parametrize("T", [1, 2, 4])
def test_kd_with_standardize_is_kd_of_zscored_logits(gen, T):
    student, teacher, labels = randn(gen, N, C, scale=4), randn(gen, N, C, scale=2) + 1, labels_for(gen)
    _, parts = SoftTargetKD(T=T, standardize=True)(ModelOutputs(student), ModelOutputs(teacher), labels)
    close(parts["kd"], soft_target_kd(standardize_logits(student), standardize_logits(teacher), T))
    zs = torch.tensor([plain_zscore(r) for r in rows(student)])
    zt = torch.tensor([plain_zscore(r) for r in rows(teacher)])
    close(parts["kd"], plain_kd(zs, zt, T), atol=1e-5)
    # CE always sees the raw logits.
    close(parts["ce"], nn.CrossEntropyLoss()(student, labels))


def test_standardized_kd_ignores_logit_offset_and_scale(gen):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    loss = SoftTargetKD(T=2, standardize=True)
    base = loss(ModelOutputs(student), ModelOutputs(teacher), labels)[1]["kd"]
    for s, t in [(student + 7.0, teacher), (student, teacher - 3.0), (student * 5.0, teacher),
                 (student, teacher * 0.2), (student * 3.0 + 1.0, teacher * 0.5 - 2.0),
                 (student + randn(gen, N, 1, scale=10), teacher)]:  # a different constant per sample
        close(loss(ModelOutputs(s), ModelOutputs(t), labels)[1]["kd"], base, atol=1e-5)
    # Without standardisation the scale matters (the point of the paper).
    plain = SoftTargetKD(T=2)
    assert abs(plain(ModelOutputs(student * 5.0), ModelOutputs(teacher), labels)[1]["kd"]
               - plain(ModelOutputs(student), ModelOutputs(teacher), labels)[1]["kd"]) > 1e-2


def test_standardize_defaults_to_off_everywhere(gen):
    assert SoftTargetKD().standardize is False and DKD().standardize is False
    for name in ("kd", "dkd"):
        assert OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml").standardize is False
    student, teacher, labels = randn(gen, N, C), randn(gen, N, C), labels_for(gen)
    close(SoftTargetKD(T=2)(ModelOutputs(student), ModelOutputs(teacher), labels)[1]["kd"],
          plain_kd(student, teacher, 2))


# --- DKD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 4, 0.5])
def test_dkd_terms_match_their_definitions(gen, T):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    tckd, nckd = dkd_terms(student, teacher, labels, T)
    expected_tckd, expected_nckd = plain_tckd_nckd(student, teacher, labels, T)
    close(tckd, expected_tckd, atol=1e-5)
    close(nckd, expected_nckd, atol=1e-5)


def test_dkd_decomposes_kd_per_sample(gen):
    # The paper's Eq. 3: KD = TCKD + (1 - p^t_y) * NCKD, sample by sample.
    student, teacher, labels = randn(gen, N, C, scale=2), randn(gen, N, C, scale=2), labels_for(gen)
    T = 4
    for n in range(N):
        s, t, y = student[n:n + 1], teacher[n:n + 1], labels[n:n + 1]
        tckd, nckd = dkd_terms(s, t, y, T)
        teacher_target = softmax_row(rows(t)[0], T)[int(y)]
        close(tckd + (1 - teacher_target) * nckd, plain_kd(s, t, T), atol=1e-5)


def test_dkd_loss_total_and_parts(gen):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    loss = DKD(T=4, alpha=1.5, beta=6, warmup=20, ce_weight=0.7)
    total, parts = loss(ModelOutputs(student), ModelOutputs(teacher), labels, progress(30))
    assert set(parts) == {"ce", "tckd", "nckd", "dkd"}
    expected_tckd, expected_nckd = plain_tckd_nckd(student, teacher, labels, 4)
    ce = nn.CrossEntropyLoss()(student, labels)
    close(parts["tckd"], expected_tckd, atol=1e-5)
    close(parts["nckd"], expected_nckd, atol=1e-5)
    close(parts["ce"], ce)
    close(parts["dkd"], 1.5 * expected_tckd + 6 * expected_nckd, atol=1e-4)
    close(total, 0.7 * ce + 1.5 * expected_tckd + 6 * expected_nckd, atol=1e-4)


@pytest.mark.parametrize("epoch, factor", [(1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup(gen, epoch, factor):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    assert warmup_factor(epoch, 20) == pytest.approx(factor)
    total, parts = DKD(warmup=20)(ModelOutputs(student), ModelOutputs(teacher), labels, progress(epoch))
    expected_tckd, expected_nckd = plain_tckd_nckd(student, teacher, labels, 4)
    close(parts["dkd"], factor * (1.0 * expected_tckd + 8.0 * expected_nckd), atol=1e-4)
    close(total, nn.CrossEntropyLoss()(student, labels) + factor * (expected_tckd + 8 * expected_nckd), atol=1e-4)
    # The logged terms are unweighted: the warm-up only scales "dkd".
    close(parts["tckd"], expected_tckd, atol=1e-5)


def test_dkd_warmup_zero_means_none():
    assert warmup_factor(1, 0) == 1.0


def test_dkd_defaults_are_the_paper_recipe():
    loss = DKD()
    assert (loss.T, loss.alpha, loss.beta, loss.warmup, loss.ce_weight) == (4.0, 1.0, 8.0, 20.0, 1.0)
    cfg = OmegaConf.load(CONF_DIR / "loss" / "dkd.yaml")
    assert cfg.T == 4  # a literal: the top-level T (2, the tutorial's) does not reach DKD
    assert (cfg.alpha, cfg.beta, cfg.warmup, cfg.ce_weight) == (1.0, 8.0, 20, 1.0)


def test_dkd_with_standardize_is_dkd_of_zscored_logits(gen):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    _, parts = DKD(standardize=True)(ModelOutputs(student), ModelOutputs(teacher), labels, progress(20))
    zs = torch.tensor([plain_zscore(r) for r in rows(student)])
    zt = torch.tensor([plain_zscore(r) for r in rows(teacher)])
    expected_tckd, expected_nckd = plain_tckd_nckd(zs, zt, labels, 4)
    close(parts["tckd"], expected_tckd, atol=1e-5)
    close(parts["nckd"], expected_nckd, atol=1e-5)
    # Offset/scale invariance carries over.
    _, moved = DKD(standardize=True)(ModelOutputs(student * 4 + 2), ModelOutputs(teacher - 5), labels, progress(20))
    close(moved["dkd"], parts["dkd"], atol=1e-5)


def test_dkd_masks_the_target_at_any_logit_scale(gen):
    # Confident models (target logit ~150 above the rest) at T 0.05: z_y/T exceeds the others by
    # ~3000, so the paper code's "z_y/T - 1000" would leave the target dominating the "non-target"
    # softmax. Values and gradients stay finite and match the definition.
    labels = labels_for(gen)
    confident = 150 * nn.functional.one_hot(labels, C)
    student = (randn(gen, N, C, scale=50) + confident).requires_grad_(True)
    teacher = randn(gen, N, C, scale=50) + confident
    tckd, nckd = dkd_terms(student, teacher, labels, 0.05)
    expected_tckd, expected_nckd = plain_tckd_nckd(student.detach().double(), teacher.double(), labels, 0.05)
    close(tckd, expected_tckd, rtol=1e-4, atol=1e-2)
    close(nckd, expected_nckd, rtol=1e-4, atol=1e-2)
    (tckd + nckd).backward()
    assert torch.isfinite(student.grad).all()


def test_dkd_is_zero_when_student_equals_teacher(gen):
    logits, labels = randn(gen, N, C), labels_for(gen)
    tckd, nckd = dkd_terms(logits, logits.clone(), labels, 4)
    assert abs(tckd.item()) < 1e-6 and abs(nckd.item()) < 1e-6


def test_dkd_without_progress_says_so(gen):
    with pytest.raises(KDResearchError) as raised:
        DKD()(ModelOutputs(randn(gen, N, C)), ModelOutputs(randn(gen, N, C)), labels_for(gen))
    message = str(raised.value)
    assert "loss=dkd" in message and "progress" in message and "epoch" in message and "\n" not in message


# --- DIST -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 4])
def test_dist_relations_match_their_definitions(gen, T):
    student, teacher = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3)
    inter, intra = dist_relations(student, teacher, T)
    expected_inter, expected_intra = plain_dist(student, teacher, T)
    close(inter, expected_inter, atol=1e-5)
    close(intra, expected_intra, atol=1e-5)


def test_dist_loss_total_and_parts(gen):
    student, teacher, labels = randn(gen, N, C, scale=3), randn(gen, N, C, scale=3), labels_for(gen)
    total, parts = DIST(T=4, beta=2, gamma=0.5, ce_weight=0.3)(ModelOutputs(student), ModelOutputs(teacher), labels)
    assert set(parts) == {"ce", "dist_inter", "dist_intra", "dist"}
    expected_inter, expected_intra = plain_dist(student, teacher, 4)
    ce = nn.CrossEntropyLoss()(student, labels)
    close(parts["dist_inter"], expected_inter, atol=1e-5)
    close(parts["dist_intra"], expected_intra, atol=1e-5)
    close(parts["ce"], ce)
    close(parts["dist"], 2 * expected_inter + 0.5 * expected_intra, atol=1e-4)
    close(total, 0.3 * ce + 2 * expected_inter + 0.5 * expected_intra, atol=1e-4)


def test_dist_defaults():
    loss = DIST()
    assert (loss.T, loss.beta, loss.gamma, loss.ce_weight) == (4.0, 1.0, 1.0, 1.0)
    cfg = OmegaConf.load(CONF_DIR / "loss" / "dist.yaml")
    assert (cfg.T, cfg.beta, cfg.gamma, cfg.ce_weight) == (4, 1.0, 1.0, 1.0)


def test_dist_is_zero_when_student_equals_teacher(gen):
    logits, labels = randn(gen, N, C, scale=2), labels_for(gen)
    _, parts = DIST()(ModelOutputs(logits), ModelOutputs(logits.clone()), labels)
    assert abs(parts["dist_inter"].item()) < 1e-5 and abs(parts["dist_intra"].item()) < 1e-5


def test_dist_gradient_is_finite(gen):
    student = randn(gen, N, C, scale=3).requires_grad_(True)
    total, _ = DIST()(ModelOutputs(student), ModelOutputs(randn(gen, N, C)), labels_for(gen))
    total.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# --- what the losses declare, pair checks, validation ---------------------------------------------

@pytest.mark.parametrize("make", [DKD, DIST], ids=["dkd", "dist"])
def test_losses_declare_teacher_logits_and_check_classes(make):
    loss = make()
    assert loss.needs_teacher and loss.teacher_fields == ("logits",) and not loss.student_features
    assert list(loss.parameters()) == []
    loss.bind(LightNN(), DeepNN())
    with pytest.raises(KDResearchError) as raised:
        make().bind(LightNN(num_classes=10), DeepNN(num_classes=100))
    message = str(raised.value)
    assert f"loss={loss.loss_name()}" in message and "same classes (100 vs 10)" in message and "\n" not in message


@pytest.mark.parametrize("make, key, value, message", [
    (DKD, "T", 0, "loss.T must be > 0, got 0"),
    (DKD, "T", "abc", "loss.T must be a number, got 'abc'"),
    (DKD, "alpha", -1, "loss.alpha must be >= 0, got -1"),
    (DKD, "beta", "x", "loss.beta must be a number, got 'x'"),
    (DKD, "beta", float("inf"), "loss.beta must be finite"),
    (DKD, "warmup", -5, "loss.warmup must be >= 0, got -5"),
    (DKD, "ce_weight", float("nan"), "loss.ce_weight must be finite"),
    (DKD, "standardize", "yes", "loss.standardize must be true or false, got 'yes'"),
    (DKD, "standardize", 1, "loss.standardize must be true or false, got 1"),
    (DIST, "T", -4, "loss.T must be > 0, got -4"),
    (DIST, "beta", -0.5, "loss.beta must be >= 0, got -0.5"),
    (DIST, "gamma", "high", "loss.gamma must be a number, got 'high'"),
    (DIST, "ce_weight", True, "loss.ce_weight must be a number, got True"),
    (SoftTargetKD, "standardize", "true ", "loss.standardize must be true or false, got 'true '"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_hyperparameters_give_one_line_errors(make, key, value, message):
    with pytest.raises(KDResearchError) as raised:
        make(**{key: value})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


# --- end to end: one short job per loss -------------------------------------------------------------

def test_short_jobs_log_each_loss(tmp_path):
    """`debug=tiny` jobs (1 student epoch, 1 teacher epoch, 256 images, synthetic data) for kd with
    standardisation, dkd and dist, on one MLflow store (the first trains the teacher the others
    reuse); every one exits 0 and logs its loss parts."""
    jobs = {
        "kd": ("loss=kd", "loss.standardize=true"),
        "dkd": ("loss=dkd",),
        "dist": ("loss=dist",),
    }
    store = tmp_path / "store"
    done = {name: train_in_process(store, "debug=tiny", *jobs[name]) for name in jobs}
    expected = {"kd": ("train/kd", "train/ce"), "dkd": ("train/dkd", "train/tckd", "train/nckd", "train/ce"),
                "dist": ("train/dist", "train/dist_inter", "train/dist_intra", "train/ce")}
    for name in jobs:
        check_ok(done[name])
        runs = experiment_runs(mlflow_client(store))
        students = [run for run in runs if run.data.tags.get("loss") == name]
        assert students, f"no {name} run among {[run.info.run_name for run in runs]}"
        metrics = students[-1].data.metrics
        for key in expected[name]:
            assert key in metrics and math.isfinite(metrics[key]), f"{name}: {key} missing or not finite in {metrics}"
    # DKD's single epoch is epoch 1 of a 20-epoch warm-up: its logged term is 1/20 of alpha*TCKD + beta*NCKD.
    dkd = [run for run in experiment_runs(mlflow_client(store)) if run.data.tags.get("loss") == "dkd"][-1]
    m = dkd.data.metrics
    assert m["train/dkd"] == pytest.approx((m["train/tckd"] + 8 * m["train/nckd"]) / 20, rel=1e-4)
