"""CRD (kdresearch.losses.crd) against the paper's formulas written out here with plain floats and
loops, on a tiny bank (50 samples, 8 negatives, 4-d heads): the NCE value with the same sampled
negatives, the memory update, Z, gradients, state, refusals; a 2-process gloo run of the bank
update; and one short training job."""

from __future__ import annotations

import math
import sys
from pathlib import Path

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
from processes import Process
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress
from kdresearch.losses.crd import ContrastiveRepresentationDistillation
from kdresearch.losses.kd import soft_target_kd
from kdresearch.models import DeepNN, LightNN, ModelOutputs

N_DATA, K, FEAT, B, C = 50, 8, 4, 6, 10
TRAIN_LABELS = torch.arange(N_DATA) % C  # 5 samples per class: 45 of other classes for each anchor
S_DIM, T_DIM = LightNN.embedding_dim, DeepNN.embedding_dim  # 256, 512
EPS = 1e-7


def bound_loss(seed=0, **options) -> ContrastiveRepresentationDistillation:
    options = {"nce_k": K, "feat_dim": FEAT, **options}
    loss = ContrastiveRepresentationDistillation(**options)
    torch.manual_seed(seed)
    loss.bind(LightNN(), DeepNN(), train_size=N_DATA, train_labels=TRAIN_LABELS)
    return loss


def batch(seed=1, n=B):
    gen = torch.Generator().manual_seed(seed)
    student = ModelOutputs(torch.randn(n, C, generator=gen), torch.randn(n, S_DIM, generator=gen).relu())
    teacher = ModelOutputs(torch.randn(n, C, generator=gen), torch.randn(n, T_DIM, generator=gen).relu())
    labels = torch.randint(0, C, (n,), generator=gen)
    index = torch.randperm(N_DATA, generator=gen)[:n]
    return student, teacher, labels, index


def progress(index):
    return Progress(epoch=1, step=1, epochs=1, steps_per_epoch=1, index=index)


# --- the paper's formulas, with plain Python floats ----------------------------------------------

def plain_head(x, linear):
    """linear(x) / ||linear(x)|| for one sample."""
    weight, bias = linear.weight.tolist(), linear.bias.tolist()
    y = [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]
    norm = math.sqrt(sum(v * v for v in y))
    return [v / norm for v in y]


def plain_nce(scores, z, n_data):
    """ContrastLoss on exp scores (rows: positive first) divided by Z: eq. 18, summed over the batch / B."""
    noise = (len(scores[0]) - 1) / n_data
    total = 0.0
    for row in scores:
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + noise + EPS))
        for q in p[1:]:
            total += math.log(noise / (q + noise + EPS))
    return -total / len(scores)


def plain_crd(loss, bank_s, bank_t, s_emb, t_emb, index, negatives, z=None):
    """CRD for one batch from a copy of the banks before the call; returns (crd, z pair, heads' outputs)."""
    bank_s, bank_t = bank_s.tolist(), bank_t.tolist()
    v_s = [plain_head(x, loss.embed_student.linear) for x in s_emb.tolist()]
    v_t = [plain_head(x, loss.embed_teacher.linear) for x in t_emb.tolist()]
    rows = [[i] + negs for i, negs in zip(index.tolist(), negatives.tolist())]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    # Student anchors are scored against the teacher bank, teacher anchors against the student bank.
    out_s = [[math.exp(dot(bank_t[j], v) / loss.nce_t) for j in row] for v, row in zip(v_s, rows)]
    out_t = [[math.exp(dot(bank_s[j], v) / loss.nce_t) for j in row] for v, row in zip(v_t, rows)]
    if z is None:  # the first batch sets Z = mean(exp scores) * n
        z = tuple(sum(map(sum, out)) / (len(out) * len(out[0])) * N_DATA for out in (out_s, out_t))
    crd = plain_nce(out_s, z[0], N_DATA) + plain_nce(out_t, z[1], N_DATA)
    return crd, z, torch.tensor(v_s), torch.tensor(v_t)


def plain_ce(logits, labels):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(labels)


def close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


# --- the value ------------------------------------------------------------------------------------

def test_nce_matches_plain_formula_with_the_drawn_negatives():
    loss = bound_loss()
    student, teacher, labels, index = batch()
    bank_s, bank_t = loss.memory_student.clone(), loss.memory_teacher.clone()

    torch.manual_seed(7)
    total, parts = loss(student, teacher, labels, progress(index))
    torch.manual_seed(7)  # the same draws again: the loss's negatives come from the global RNG
    negatives = loss.sample_negatives(index)
    assert negatives.shape == (B, K) and negatives.dtype == torch.long
    assert 0 <= negatives.min() and negatives.max() < N_DATA

    crd, z, _, _ = plain_crd(loss, bank_s, bank_t, student.embedding, teacher.embedding, index, negatives)
    ce = plain_ce(student.logits, labels)
    assert set(parts) == {"ce", "crd"}
    close(parts["crd"], crd)
    close(parts["ce"], ce)
    close(total, 1.0 * ce + 0.8 * crd)  # the paper's -r 1 -a 0 -b 0.8
    close(loss.nce_z, z)
    assert parts["crd"].dtype == torch.float32 and math.isfinite(total.item())


def test_explicit_negatives_give_the_same_value():
    student, teacher, _, index = batch()
    first, second = bound_loss(), bound_loss()
    torch.manual_seed(3)
    drawn = first.contrast(student.embedding, teacher.embedding, index)
    torch.manual_seed(3)
    given = second.contrast(student.embedding, teacher.embedding, index, negatives=second.sample_negatives(index))
    close(drawn, given, rtol=0, atol=0)


def test_kd_term_when_kd_weight_is_on():
    loss = bound_loss(kd_weight=0.5, T=4)
    assert loss.teacher_fields == ("embedding", "logits")
    student, teacher, labels, index = batch()
    total, parts = loss(student, teacher, labels, progress(index))
    assert set(parts) == {"ce", "crd", "kd"}
    close(parts["kd"], soft_target_kd(student.logits, teacher.logits, 4.0))
    close(total, parts["ce"] + 0.5 * parts["kd"] + 0.8 * parts["crd"])


def test_declares_what_it_needs():
    loss = ContrastiveRepresentationDistillation()
    assert loss.needs_teacher and loss.student_features
    assert loss.teacher_fields == ("embedding",)  # logits only when the KD term is on
    assert (loss.ce_weight, loss.kd_weight, loss.distill_weight, loss.T) == (1.0, 0.0, 0.8, 4.0)
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_mom) == (128, 16384, 0.07, 0.5)


def test_config_file_builds_the_paper_defaults():
    node = OmegaConf.load(CONF_DIR / "loss" / "crd.yaml")
    assert node.name == "crd"
    params = {key: value for key, value in OmegaConf.to_container(node).items() if key not in ("name", "_target_")}
    loss = ContrastiveRepresentationDistillation(**params)
    assert node._target_ == "kdresearch.losses.crd.ContrastiveRepresentationDistillation"
    assert (loss.ce_weight, loss.kd_weight, loss.distill_weight, loss.T) == (1.0, 0.0, 0.8, 4.0)
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_mom) == (128, 16384, 0.07, 0.5)


# --- the memory banks and Z -----------------------------------------------------------------------

def test_bank_initialisation_is_seeded_and_in_range():
    a, b, c = bound_loss(seed=0), bound_loss(seed=0), bound_loss(seed=1)
    stdv = 1 / math.sqrt(FEAT / 3)
    for bank in (a.memory_student, a.memory_teacher):
        assert bank.shape == (N_DATA, FEAT)
        assert bank.abs().max() <= stdv and bank.abs().max() > 0.5 * stdv
    assert torch.equal(a.memory_student, b.memory_student) and torch.equal(a.memory_teacher, b.memory_teacher)
    assert not torch.equal(a.memory_student, a.memory_teacher)
    assert not torch.equal(a.memory_student, c.memory_student)
    assert a.nce_z.tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("mom", [0.5, 0.9])
def test_memory_update_moves_only_the_positives(mom):
    loss = bound_loss(nce_mom=mom)
    student, teacher, labels, index = batch()
    old_s, old_t = loss.memory_student.clone(), loss.memory_teacher.clone()
    torch.manual_seed(7)
    loss(student, teacher, labels, progress(index))
    torch.manual_seed(7)
    negatives = loss.sample_negatives(index)
    _, _, v_s, v_t = plain_crd(loss, old_s, old_t, student.embedding, teacher.embedding, index, negatives)

    for bank, old, new in ((loss.memory_student, old_s, v_s), (loss.memory_teacher, old_t, v_t)):
        mixed = mom * old[index].double() + (1 - mom) * new.double()
        expected = mixed / mixed.norm(dim=1, keepdim=True)
        close(bank[index], expected, rtol=1e-5, atol=1e-6)
        close(bank[index].norm(dim=1), torch.ones(B), rtol=0, atol=1e-6)
        others = torch.ones(N_DATA, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank[others], old[others])  # untouched, bit for bit


def test_z_is_set_by_the_first_batch_then_fixed():
    loss = bound_loss()
    student, teacher, labels, index = batch(seed=1)
    loss(student, teacher, labels, progress(index))
    z = loss.nce_z.clone()
    assert (z > 0).all()

    # A second, different batch: Z stays, and the value uses that Z with the updated banks.
    student2, teacher2, labels2, index2 = batch(seed=2)
    bank_s, bank_t = loss.memory_student.clone(), loss.memory_teacher.clone()
    torch.manual_seed(11)
    _, parts = loss(student2, teacher2, labels2, progress(index2))
    torch.manual_seed(11)
    negatives = loss.sample_negatives(index2)
    assert torch.equal(loss.nce_z, z)
    crd, _, _, _ = plain_crd(loss, bank_s, bank_t, student2.embedding, teacher2.embedding, index2, negatives,
                             z=tuple(z.tolist()))
    close(parts["crd"], crd)


def test_heads_get_gradients_banks_do_not():
    loss = bound_loss()
    student, teacher, labels, index = batch()
    embedding = student.embedding.clone().requires_grad_(True)
    logits = student.logits.clone().requires_grad_(True)
    total, _ = loss(ModelOutputs(logits, embedding), teacher, labels, progress(index))
    total.backward()
    for head in (loss.embed_student, loss.embed_teacher):
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
        assert head.linear.bias.grad is not None
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    params = {id(p) for p in loss.parameters()}
    assert params == {id(p) for head in (loss.embed_student, loss.embed_teacher) for p in head.parameters()}
    assert sum(p.numel() for p in loss.parameters()) == (S_DIM + 1) * FEAT + (T_DIM + 1) * FEAT
    assert not any(b.requires_grad for b in loss.buffers())


def test_state_dict_holds_banks_and_z_and_resume_is_exact():
    loss = bound_loss(seed=0)
    expected_keys = {"embed_student.linear.weight", "embed_student.linear.bias", "embed_teacher.linear.weight",
                     "embed_teacher.linear.bias", "memory_student", "memory_teacher", "nce_z"}
    assert set(loss.state_dict()) == expected_keys
    student, teacher, labels, index = batch(seed=1)
    torch.manual_seed(5)
    loss(student, teacher, labels, progress(index))
    saved = {key: value.clone() for key, value in loss.state_dict().items()}
    assert (saved["nce_z"] > 0).all()

    resumed = bound_loss(seed=99)  # other initial banks and heads, replaced by the checkpoint's
    resumed.load_state_dict(saved)
    student2, teacher2, labels2, index2 = batch(seed=2)
    outcomes = []
    for which in (loss, resumed):
        torch.manual_seed(6)
        outcomes.append(which(student2, teacher2, labels2, progress(index2))[0])
    assert torch.equal(outcomes[0], outcomes[1])
    assert torch.equal(loss.memory_student, resumed.memory_student)
    assert torch.equal(loss.memory_teacher, resumed.memory_teacher)


def test_bf16_autocast_keeps_the_contrast_in_float32():
    loss = bound_loss()
    student, teacher, labels, index = batch()
    reference = bound_loss()
    torch.manual_seed(7)
    _, exact = reference(student, teacher, labels, progress(index))
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts = loss(ModelOutputs(student.logits, student.embedding.bfloat16()),
                        ModelOutputs(None, teacher.embedding.bfloat16()), labels, progress(index))
    assert parts["crd"].dtype == torch.float32 and loss.memory_student.dtype == torch.float32
    close(parts["crd"], exact["crd"], rtol=0.05, atol=0.05)  # only the inputs were rounded to bf16


# --- how negatives are drawn ---------------------------------------------------------------------

def test_default_negatives_are_distinct_samples_of_the_other_classes():
    """RepDistiller's CIFAR-100 draw (CIFAR100InstanceSample, mode 'exact'): K negatives per anchor,
    without replacement, from the samples whose class differs from the anchor's."""
    loss = bound_loss(nce_k=40)  # 45 samples of other classes per anchor
    assert loss.negatives == "other_classes"
    index = torch.arange(N_DATA)
    torch.manual_seed(5)
    negatives = loss.sample_negatives(index)
    assert negatives.shape == (N_DATA, 40)
    for anchor, row in zip(index.tolist(), negatives.tolist()):
        assert len(set(row)) == 40  # distinct
        assert all(TRAIN_LABELS[j] != TRAIN_LABELS[anchor] for j in row)  # never the anchor's class


def test_other_class_draw_is_uniform_over_the_others():
    """Every sample of another class is drawn equally often (a uniformly random K-subset)."""
    loss = bound_loss(nce_k=9)
    torch.manual_seed(0)
    anchors = torch.zeros(4000, dtype=torch.long)  # class 0: samples 0, 10, 20, 30, 40
    counts = torch.bincount(loss.sample_negatives(anchors).flatten(), minlength=N_DATA).double()
    others = TRAIN_LABELS != 0
    assert counts[~others].sum() == 0
    expected = 4000 * 9 / 45
    assert (counts[others] - expected).abs().max() < 5 * math.sqrt(expected)  # within 5 sigma


def test_uniform_negatives_span_the_training_set_with_replacement():
    loss = bound_loss(negatives="uniform")
    torch.manual_seed(0)
    drawn = loss.sample_negatives(torch.zeros(2000, dtype=torch.long))
    assert int(TRAIN_LABELS[drawn].eq(0).sum()) > 0  # the anchor's class too
    assert set(drawn.flatten().tolist()) == set(range(N_DATA))


def test_other_class_negatives_need_the_labels_and_enough_others():
    with pytest.raises(KDResearchError, match=r"needs the training labels.*loss\.negatives=uniform"):
        ContrastiveRepresentationDistillation(nce_k=K).bind(LightNN(), DeepNN(), train_size=N_DATA)
    with pytest.raises(KDResearchError) as raised:  # 45 samples outside each class
        bound_loss(nce_k=46)
    message = str(raised.value)
    assert "nce_k=46" in message and "leaves 45" in message and "loss.negatives=uniform" in message
    assert "\n" not in message
    bound_loss(nce_k=45)  # exactly all the others: fine


def test_negatives_option_is_checked():
    with pytest.raises(KDResearchError, match="loss.negatives"):
        ContrastiveRepresentationDistillation(negatives="exact")


# --- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_size", [8, 5, 0])
def test_refuses_nce_k_not_below_train_size(train_size):
    with pytest.raises(KDResearchError) as raised:
        ContrastiveRepresentationDistillation(nce_k=8, feat_dim=FEAT, negatives="uniform").bind(
            LightNN(), DeepNN(), train_size=train_size)
    message = str(raised.value)
    assert "loss=crd" in message and "nce_k=8" in message and "loss.nce_k" in message
    assert "\n" not in message


def test_default_nce_k_refused_on_a_small_set_and_suggests_a_value():
    with pytest.raises(KDResearchError, match=r"loss\.nce_k=64"):
        ContrastiveRepresentationDistillation(negatives="uniform").bind(LightNN(), DeepNN(), train_size=256)


@pytest.mark.parametrize("index_given", [False, True])
def test_error_without_sample_indices(index_given):
    loss = bound_loss()
    student, teacher, labels, _ = batch()
    given = progress(None) if index_given else None
    with pytest.raises(KDResearchError) as raised:
        loss(student, teacher, labels, given)
    assert "progress.index" in str(raised.value) and "\n" not in str(raised.value)


def test_error_before_bind():
    student, teacher, labels, index = batch()
    with pytest.raises(KDResearchError, match="bind"):
        ContrastiveRepresentationDistillation(nce_k=K)(student, teacher, labels, progress(index))


@pytest.mark.parametrize("key, value, message", [
    ("nce_k", 0, "loss.nce_k must be an integer >= 1, got 0"),
    ("nce_k", 16.5, "loss.nce_k must be an integer >= 1, got 16.5"),
    ("feat_dim", "x", "loss.feat_dim must be an integer >= 1, got 'x'"),
    ("nce_t", 0, "loss.nce_t must be > 0, got 0"),
    ("nce_mom", 1.5, "loss.nce_mom must be in [0, 1], got 1.5"),
    ("kd_weight", -1, "loss.kd_weight must be >= 0, got -1"),
    ("T", 0, "loss.T must be > 0, got 0"),
])
def test_rejects_bad_options(key, value, message):
    with pytest.raises(KDResearchError) as raised:
        ContrastiveRepresentationDistillation(**{key: value})
    assert message in str(raised.value)


def test_refuses_different_class_counts_when_kd_is_on():
    with pytest.raises(KDResearchError, match=r"same classes \(100 vs 10\)"):
        ContrastiveRepresentationDistillation(kd_weight=1.0, nce_k=K).bind(
            LightNN(num_classes=10), DeepNN(num_classes=100), train_size=N_DATA, train_labels=TRAIN_LABELS)


# --- data-parallel: the bank update gathers every rank's rows ----------------------------------

DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from kdresearch.losses.crd import ContrastiveRepresentationDistillation
from kdresearch.models import DeepNN, LightNN

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
loss = ContrastiveRepresentationDistillation(nce_k=8, feat_dim=4)
torch.manual_seed(0)
loss.bind(LightNN(), DeepNN(), train_size=50, train_labels=torch.arange(50) % 10)
gen = torch.Generator().manual_seed(1)
student, teacher = torch.randn(7, 256, generator=gen), torch.randn(7, 512, generator=gen)
index = torch.randperm(50, generator=gen)[:7]
share = slice(0, 4) if rank == 0 else slice(4, 7)  # unequal shares, like an epoch's last batch
torch.manual_seed(7)
loss.contrast(student[share], teacher[share], index[share])
torch.save({key: value.clone() for key, value in loss.state_dict().items()}, out)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two gloo processes
def test_bank_update_gathers_all_ranks(tmp_path):
    script = tmp_path / "ddp_crd.py"
    script.write_text(DDP_SCRIPT)
    procs = [Process([sys.executable, script, rank, tmp_path / "store", tmp_path / f"rank{rank}.pt"],
                     tmp_path / f"rank{rank}.log", one_thread=True) for rank in (0, 1)]
    for proc in procs:
        proc.check_ok(timeout=180)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(7, S_DIM, generator=gen), torch.randn(7, T_DIM, generator=gen)
    index = torch.randperm(N_DATA, generator=gen)[:7]
    # Each rank alone, in one process, from the same seeds: its own Z.
    zs = []
    for share in (slice(0, 4), slice(4, 7)):
        alone = bound_loss(seed=0)
        torch.manual_seed(7)
        alone.contrast(student[share], teacher[share], index[share])
        zs.append(alone.nce_z)
    fresh = bound_loss(seed=0)
    with torch.no_grad():
        v_s, v_t = fresh.embed_student(student), fresh.embed_teacher(teacher)
    for state in states:
        close(state["nce_z"], (zs[0] + zs[1]) / 2, rtol=1e-6, atol=0)  # one Z for all ranks
        for key, old, new in (("memory_student", fresh.memory_student, v_s), ("memory_teacher", fresh.memory_teacher, v_t)):
            expected = old.clone()
            expected[index] = F.normalize(0.5 * old[index] + 0.5 * new, dim=1)  # all 7 rows, both ranks'
            close(state[key], expected, rtol=1e-5, atol=1e-6)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # the ranks' banks stay identical


# --- one short training job ------------------------------------------------------------------------

def test_training_job_logs_crd(store):
    done = check_ok(train_in_process(store, "debug=tiny", "loss=crd", "loss.nce_k=64"))
    runs = experiment_runs(mlflow_client(store))
    student = [run for run in runs if run.data.tags.get("loss") == "crd"]
    assert len(student) == 1, done.output[-3000:]
    metrics = student[0].data.metrics
    assert {"train/crd", "train/ce", "train/loss"} <= set(metrics)
    assert "train/kd" not in metrics
    assert math.isfinite(metrics["train/crd"]) and metrics["train/crd"] > 0

    from kdresearch.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(Path(done.run_dir) / "checkpoints" / "final.pt")
    state = checkpoint["loss"]
    assert state["memory_student"].shape == state["memory_teacher"].shape == (256, 128)
    assert (state["nce_z"] > 0).all()
