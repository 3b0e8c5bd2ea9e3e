"""SRD (softmax regression representation learning) and FT (factor transfer): their terms' values
and gradients against independent implementations on fixed tensors, the modules they size from the
pair, what they refuse, and each as a job on a zoo pair (resnet20 -> resnet8, synthetic data) that
trains, logs its parts and resumes bit-exactly from its epoch-1 checkpoint.

References. FT: torchdistill 1.1.5's own `FTLoss` (p=1) for the factor loss, and its
`Paraphraser4FactorTransfer` (uses_bn=False) / `Translator4FactorTransfer` for the two modules
(same layers: the state dicts load across). SRD: torchdistill's `SRDLoss` is a different method
(Miles & Mikolajczyk, AAAI 2024, which its code also calls SRD), so the terms are checked against a
plain implementation of Yang et al.'s formula written out here (float64, loops over samples), and
their values on these tensors as the authors' code computes them (SRD_ossl: `statm_loss` of
`distiller_zoo/AIN.py` plus `F.mse_loss` of the teacher's pooled-map classifier output, as in
`helper/loops.py`), run in float32, are pinned below (AUTHORS_SRD).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_resumed_exactly, compose_job, interrupted_after_epoch_1, mlflow_client
from loss_checks import assert_builds_defaults, assert_pair_refused, one_line
from torch.nn import functional as F

from kdresearch.architectures.resnet import resnet8, resnet20
from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.layout import JobFolder
from kdresearch.losses.base import Progress
from kdresearch.losses.ft import FactorTransfer, Paraphraser, factor_transfer, translator
from kdresearch.losses.srd import SoftmaxRegression, softmax_regression
from kdresearch.models import ModelOutputs, Network
from kdresearch.tracking import names
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import bind_pair, run_job

pytestmark = pytest.mark.usefixtures("one_compute_thread")

N, C = 6, 7


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def net(name: str, channels=(4, 6), sizes=(8, 4), embedding=5, classes=C) -> Network:
    """A Network with shape facts only (and so no classifier layer): `bind` never runs a forward pass."""
    cls = type(name, (Network,), {"stage_channels": tuple(channels), "stage_sizes": tuple(sizes),
                                  "embedding_dim": embedding, "num_classes": classes})
    return cls()


def progress(epoch, epochs=4):
    return Progress(epoch=epoch, step=1, epochs=epochs, steps_per_epoch=1)


# --- SRD: the terms -------------------------------------------------------------------------------

def srd_case():
    """The fixed tensors of the SRD checks (and of the pinned authors' values): the student's
    connected map, the teacher's map (pooled, its embedding), its classifier and its logits."""
    gen = torch.Generator().manual_seed(2024)
    s_map = torch.randn(N, 5, 3, 3, generator=gen).relu()
    t_map = 1.5 * torch.randn(N, 5, 3, 3, generator=gen).relu()
    weight = 0.5 * torch.randn(C, 5, generator=gen)
    bias = 0.1 * torch.randn(C, generator=gen)
    t_logits = 2 * torch.randn(N, C, generator=gen)
    return s_map, t_map, weight, bias, t_logits


# The authors' code on `srd_case` (module docstring): statm_loss(s_map, t_map) and
# F.mse_loss(fc(avg_pool2d(s_map)), t_logits).
AUTHORS_SRD = {"feature": 0.1274939477, "logits": 5.6307473183}


def plain_mean_over_positions(f):
    return torch.stack([torch.stack([channel.sum() / channel.numel() for channel in sample]) for sample in f])


def plain_srd(s_map, t_map, weight, bias, t_logits, logit_term="mse", T=4.0):
    """Yang et al.'s two terms written out, one sample at a time: the squared difference of the
    position-averaged maps, and of the teacher's classifier output on the student's pooled feature
    to the teacher's logits (or T^2 KL(teacher || that output) at T), each a mean."""
    s_map, t_map, weight, bias, t_logits = (x.double() for x in (s_map, t_map, weight, bias, t_logits))
    h_s, h_t = plain_mean_over_positions(s_map), plain_mean_over_positions(t_map)
    n, d = h_s.shape
    feature = sum(((h_s[i] - h_t[i]) ** 2).sum() for i in range(n)) / (n * d)
    regressed = [weight @ h_s[i] + bias for i in range(n)]
    if logit_term == "mse":
        logits = sum(((regressed[i] - t_logits[i]) ** 2).sum() for i in range(n)) / (n * len(bias))
    else:
        logits = 0.0
        for z, z_t in zip(regressed, t_logits):
            p_t = torch.exp(z_t / T) / torch.exp(z_t / T).sum()
            log_p = z / T - torch.logsumexp(z / T, dim=0)
            logits = logits + (p_t * (p_t.log() - log_p)).sum()
        logits = T * T * logits / n
    return feature, logits


@pytest.mark.parametrize("feature_weight", [1.0, 10.0])
def test_srd_terms_equal_the_authors_formula_and_code(feature_weight):
    s_map, t_map, weight, bias, t_logits = srd_case()
    ours_map, plain_map = leaf(s_map), leaf(s_map)
    feature, logits = softmax_regression(ours_map.mean(dim=(2, 3)), t_map.mean(dim=(2, 3)), t_logits, weight, bias)
    expected_feature, expected_logits = plain_srd(plain_map, t_map, weight, bias, t_logits)
    close(feature, expected_feature)
    close(logits, expected_logits)
    close(feature, AUTHORS_SRD["feature"])
    close(logits, AUTHORS_SRD["logits"])

    (feature_weight * feature + logits).backward()
    (feature_weight * expected_feature + expected_logits).backward()
    assert ours_map.grad.abs().sum() > 0
    close(ours_map.grad, plain_map.grad)


def test_srd_kl_logit_term_is_soft_target_kd_of_the_regressed_logits():
    s_map, t_map, weight, bias, t_logits = srd_case()
    ours_map, plain_map = leaf(s_map), leaf(s_map)
    _, kl = softmax_regression(ours_map.mean(dim=(2, 3)), t_map.mean(dim=(2, 3)), t_logits, weight, bias, "kl", 3.0)
    _, expected = plain_srd(plain_map, t_map, weight, bias, t_logits, "kl", 3.0)
    close(kl, expected)
    kl.backward()
    expected.backward()
    close(ours_map.grad, plain_map.grad)


def test_srd_stays_float32_under_bf16_autocast():
    s_map, t_map, weight, bias, t_logits = srd_case()
    exact = softmax_regression(s_map.mean(dim=(2, 3)), t_map.mean(dim=(2, 3)), t_logits, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = softmax_regression(s_map.mean(dim=(2, 3)).bfloat16(), t_map.mean(dim=(2, 3)), t_logits, weight, bias)
    for value, reference in zip(parts, exact):
        assert value.dtype == torch.float32
        close(value, reference, rtol=0.02, atol=1e-4)


# --- SRD: the loss on a pair ------------------------------------------------------------------------

def test_srd_trains_the_student_through_the_loaded_teachers_frozen_classifier(gen):
    student, teacher = resnet8(num_classes=C), resnet20(num_classes=C)
    loss = SoftmaxRegression(feature_weight=2.0, ce_weight=0.5, distill_weight=3.0)
    loss.bind(student, teacher)
    assert loss.needs_teacher and loss.student_features and loss.teacher_fields == ("logits", "embedding")
    assert {name for name, _ in loss.named_parameters()} == {"connector.conv.weight", "connector.bn.weight",
                                                             "connector.bn.bias"}
    assert loss.connector.conv.weight.shape == (teacher.embedding_dim, student.stage_channels[-1], 1, 1)
    assert {"classifier_weight", "classifier_bias"} <= set(loss.state_dict())

    # The teacher's trained weights arrive after bind (the job's teacher step loads them in place).
    trained = resnet20(num_classes=C)
    teacher.load_state_dict(trained.state_dict())
    teacher.eval().requires_grad_(False)
    images, labels = randn(gen, 4, 3, 32, 32), torch.randint(0, C, (4,), generator=gen)
    with torch.no_grad():
        t_out = teacher(images, with_features=True)
    s_out = student(images, with_features=True)
    total, parts = loss(s_out, t_out, labels)

    assert set(parts) == {"ce", "srd_feature", "srd_logits", "srd"}
    assert torch.equal(loss.classifier_weight, trained.fc.weight) and torch.equal(loss.classifier_bias, trained.fc.bias)
    connected = loss.connector(s_out.stages[-1])
    expected_feature, expected_logits = plain_srd(connected, t_out.stages[-1], trained.fc.weight, trained.fc.bias,
                                                  t_out.logits)
    close(t_out.embedding, plain_mean_over_positions(t_out.stages[-1]), atol=1e-5)  # the target is the embedding
    close(parts["srd_feature"], expected_feature, atol=1e-5)
    close(parts["srd_logits"], expected_logits, atol=1e-5)
    close(total, 0.5 * F.cross_entropy(s_out.logits, labels) + 3.0 * (2.0 * expected_feature + expected_logits),
          atol=1e-5)

    total.backward()
    assert loss.classifier_weight.grad is None and teacher.fc.weight.grad is None  # frozen
    assert loss.connector.conv.weight.grad.abs().sum() > 0
    assert student.layer3[-1].conv2.weight.grad.abs().sum() > 0  # the last stage learns through it


def test_srd_keeps_its_copy_of_the_classifier_in_its_state():
    student, teacher = resnet8(num_classes=C), resnet20(num_classes=C)
    loss = SoftmaxRegression()
    loss.bind(student, teacher)
    weight, bias = loss.frozen_classifier()
    again = SoftmaxRegression()
    again.bind(resnet8(num_classes=C), resnet20(num_classes=C))
    again.load_state_dict(loss.state_dict())  # a checkpoint's loss state
    assert torch.equal(again.classifier_weight, weight) and torch.equal(again.classifier_bias, bias)


@pytest.mark.parametrize("student, teacher, problem", [
    (net("S"), net("NoClassifier"), "the teacher needs exactly one classifier layer, a Linear from its 5-wide "
                                    "embedding to its 7 classes"),
    (net("S", classes=10), resnet20(num_classes=7), "teacher and student need the same classes (7 vs 10)"),
    (net("Flat", (), ()), resnet20(num_classes=C), "the connector reads the student's last stage, and the "
                                                   "student has none"),
])
def test_srd_refuses_a_pair_it_cannot_serve_in_one_line(student, teacher, problem):
    with pytest.raises(KDResearchError) as raised:
        SoftmaxRegression().bind(student, teacher)
    assert_pair_refused(raised, "srd", student, teacher, problem)


@pytest.mark.parametrize("options, message", [
    ({"logit_term": "l1"}, "loss.logit_term must be one of mse, kl, got 'l1'"),
    ({"T": 0}, "loss.T must be > 0"),
    ({"feature_weight": -1}, "loss.feature_weight must be >= 0"),
    ({"distill_weight": "x"}, "loss.distill_weight must be a number"),
])
def test_srd_bad_options_are_refused(options, message):
    with pytest.raises(KDResearchError, match=message):
        SoftmaxRegression(**options)


# --- FT: the terms and modules ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def td():
    """torchdistill (the dev extra's reference implementations), imported only where compared."""
    from torchdistill.losses.mid_level import FTLoss
    from torchdistill.models.wrapper import Paraphraser4FactorTransfer, Translator4FactorTransfer

    return FTLoss, Paraphraser4FactorTransfer, Translator4FactorTransfer


def test_ft_factor_loss_equals_torchdistills(gen, td):
    ft_loss = td[0](p=1, reduction="mean")
    f_s, f_t = randn(gen, N, 4, 3, 3), randn(gen, N, 4, 3, 3, scale=2.0)
    ours_s, ours_t, their_s, their_t = leaf(f_s), leaf(f_t), leaf(f_s), leaf(f_t)
    ours = factor_transfer(ours_s, ours_t)
    theirs = ft_loss({"translator": {"output": their_s}}, {"paraphraser": {"output": their_t}})
    close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert ours_s.grad.abs().sum() > 0
    close(ours_s.grad, their_s.grad)
    close(ours_t.grad, their_t.grad)


def test_ft_factor_loss_pools_the_larger_factor_to_the_smaller(gen):
    f_s, f_t = randn(gen, N, 4, 4, 4), randn(gen, N, 4, 2, 2)
    ours_s, plain_s = leaf(f_s), leaf(f_s)

    def plain(s, t):  # each 2x2 block of the larger map averaged, then the paper's formula per sample
        s = s.double().reshape(N, 4, 2, 2, 2, 2).mean(dim=(3, 5))
        total = 0.0
        for a, b in zip(s, t.double()):
            total = total + (a.flatten() / a.flatten().norm() - b.flatten() / b.flatten().norm()).abs().sum()
        return total / s.numel()

    ours, expected = factor_transfer(ours_s, f_t), plain(plain_s, f_t)
    close(ours, expected)
    ours.backward()
    expected.backward()
    close(ours_s.grad, plain_s.grad)


def test_ft_paraphraser_and_translator_are_torchdistills_modules(gen, td):
    _, their_paraphraser, their_translator = td
    ours, theirs = Paraphraser(8, 4), their_paraphraser(0.5, 8, uses_bn=False)
    theirs.load_state_dict(ours.state_dict())
    x = randn(gen, N, 8, 4, 4).relu()
    close(ours(x), theirs(x))
    theirs.uses_decoder = False
    close(ours.encoder(x), theirs(x))

    ours, theirs = translator(6, 4), their_translator(6, 4, uses_bn=True)
    theirs.load_state_dict(ours.state_dict())
    x = randn(gen, N, 6, 4, 4)
    close(ours(x), theirs(x))


# --- FT: the two stages -----------------------------------------------------------------------------

def ft_outputs(gen, student, teacher):
    s_stages = tuple(leaf(randn(gen, N, c, s, s).relu()) for c, s in zip(student.stage_channels, student.stage_sizes))
    t_stages = tuple(randn(gen, N, c, s, s).relu() for c, s in zip(teacher.stage_channels, teacher.stage_sizes))
    return ModelOutputs(leaf(randn(gen, N, C)), stages=s_stages), ModelOutputs(None, stages=t_stages)


def gradients_reach(total, module) -> bool:
    grads = torch.autograd.grad(total, list(module.parameters()), retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_ft_trains_its_paraphraser_alone_then_the_student_through_the_translator(gen):
    student, teacher = net("S", (4, 6), (8, 4)), net("T", (5, 10), (8, 2))
    loss = FactorTransfer(init_epochs=2, ce_weight=0.5, distill_weight=3.0)
    loss.bind(student, teacher)
    assert loss.teacher_fields == ("stage1",)
    assert loss.paraphraser.encoder[0].in_channels == 10 and loss.paraphraser.encoder[-2].out_channels == 5
    assert loss.translator[0].in_channels == 6 and loss.translator[-3].out_channels == 5
    assert {name.split(".")[0] for name, _ in loss.named_parameters()} == {"paraphraser", "translator"}
    s, t = ft_outputs(gen, student, teacher)
    labels = torch.randint(0, C, (N,), generator=gen)

    for epoch in (1, 2):  # the init stage: the paraphraser's reconstruction alone
        total, parts = loss(s, t, labels, progress(epoch))
        assert set(parts) == {"ce", "ft_reconstruction"}
        close(total, F.mse_loss(loss.paraphraser(t.stages[1]), t.stages[1]))
        close(parts["ce"], F.cross_entropy(s.logits, labels))
        assert gradients_reach(total, loss.paraphraser) and not gradients_reach(total, loss.translator)
        assert torch.autograd.grad(total, [s.logits, *s.stages], allow_unused=True) == (None, None, None)

    total, parts = loss(s, t, labels, progress(3))  # then CE and the factor loss, the paraphraser frozen
    assert set(parts) == {"ce", "ft"}
    expected_ft = factor_transfer(loss.translator(s.stages[1]), loss.paraphraser.encoder(t.stages[1]))
    close(parts["ft"], expected_ft)
    close(total, 0.5 * F.cross_entropy(s.logits, labels) + 3.0 * expected_ft)
    assert not gradients_reach(total, loss.paraphraser) and gradients_reach(total, loss.translator)
    assert torch.autograd.grad(total, s.stages[1], retain_graph=True)[0].abs().sum() > 0


@pytest.mark.parametrize("student, teacher, options, problem", [
    (net("Flat", (), ()), net("T"), {}, "the translator and the paraphraser read each model's last stage"),
    (net("S"), net("Thin", (4, 1), (8, 4)), {"paraphrase_rate": 0.5},
     "loss.paraphrase_rate=0.5 of the teacher's 1 last-stage channels leaves the factor no channel"),
])
def test_ft_refuses_a_pair_it_cannot_serve_in_one_line(student, teacher, options, problem):
    with pytest.raises(KDResearchError) as raised:
        FactorTransfer(**options).bind(student, teacher)
    assert_pair_refused(raised, "ft", student, teacher, problem)


@pytest.mark.parametrize("options, message", [
    ({"init_epochs": 0}, r"loss.init_epochs must be an integer >= 1 \(FT's paraphraser learns the teacher's "
                         r"factors in its init stage\), got 0"),
    ({"paraphrase_rate": 0}, "loss.paraphrase_rate must be > 0"),
    ({"distill_weight": -1}, "loss.distill_weight must be >= 0"),
])
def test_ft_bad_options_are_refused(options, message):
    with pytest.raises(KDResearchError, match=message):
        FactorTransfer(**options)


def test_ft_refuses_distributed_training_and_a_job_its_init_stage_fills(monkeypatch):
    loss = FactorTransfer(init_epochs=3)
    with pytest.raises(KDResearchError) as raised:
        loss.check_epochs(3)
    assert one_line(raised) == ("loss=ft: loss.init_epochs=3 leaves none of the 3 epochs to train the classifier; "
                                "set epochs above 3 or lower loss.init_epochs")
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(KDResearchError) as raised:
        loss.bind(net("S"), net("T"))
    assert one_line(raised) == ("loss=ft: the init stage (loss.init_epochs=3) trains without the classifier, which "
                                "distributed training cannot; run it in one process")  # init_epochs=0 is no way out


# --- configs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls, expected", [
    ("srd", SoftmaxRegression, {"feature_weight": 1.0, "logit_term": "mse", "T": 4.0, "ce_weight": 1.0,
                                "distill_weight": 1.0}),
    ("ft", FactorTransfer, {"paraphrase_rate": 0.5, "init_epochs": 30, "ce_weight": 1.0, "distill_weight": 500.0}),
])
def test_config_file_builds_the_authors_defaults(name, cls, expected):
    assert_builds_defaults(name, cls, expected)


# --- as jobs on a zoo pair ------------------------------------------------------------------------------

JOB = ["debug=tiny", "data.limit_train=128", "data.limit_test=64", "model=resnet8", "teacher=resnet20", "device=cpu",
       "batch_size=64", "teacher.batch_size=64", "optimizer=sgd", "optimizer.lr=0.05"]
JOBS = {  # FT: epochs 1-2 its paraphraser's init stage, epoch 3 the student
    "srd": ["loss=srd", "epochs=2"],
    "ft": ["loss=ft", "loss.init_epochs=2", "epochs=3", "checkpoint.keep_last=3"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("srd-ft")  # one store: the teacher is trained once, then reused


@pytest.fixture(scope="module")
def trained(store):
    """name -> its finished job on `store` (each trained once per module)."""
    jobs = {}

    def job(name):
        if name not in jobs:
            jobs[name] = run_job(job_config(store, name), store / name)
        return jobs[name]

    return job


def job_config(store: Path, name: str, *overrides: str):
    return compose_job(store, *JOB, *JOBS[name], *overrides)


def metric_steps(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_srd_job_trains_through_the_trained_teachers_classifier(store, trained):
    job = trained("srd")
    client = mlflow_client(store)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["teacher_cache"] == "used"  # served from the cache
    for part in ("ce", "srd_feature", "srd_logits", "srd"):
        assert set(metric_steps(client, job.run_id, f"train/{part}")) == {1, 2}
        assert math.isfinite(run.data.metrics[f"train/{part}"]), part

    final = load_checkpoint(job.checkpoint)
    teacher_run = client.get_run(final["teacher_run_id"])
    teacher = load_checkpoint(JobFolder(Path(teacher_run.data.tags[names.OUTPUT_DIR])).final_checkpoint)["model"]
    assert torch.equal(final["loss"]["classifier_weight"], teacher["fc.weight"])
    assert torch.equal(final["loss"]["classifier_bias"], teacher["fc.bias"])


def test_ft_job_trains_its_paraphraser_then_the_student(store, trained):
    job = trained("ft")
    client = mlflow_client(store)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert set(metric_steps(client, job.run_id, "train/ft_reconstruction")) == {1, 2}
    assert set(metric_steps(client, job.run_id, "train/ft")) == {3}
    assert set(metric_steps(client, job.run_id, "train/ce")) == {1, 2, 3}
    assert all(math.isfinite(run.data.metrics[f"train/{part}"]) for part in ("ft", "ft_reconstruction", "ce"))

    cfg = job_config(store, "ft")
    pair = bind_pair(cfg, build(cfg.data, "data"))  # the job's initial student and loss
    student_start = dict(pair.student.named_parameters())
    loss_start = pair.loss_fn.state_dict()
    checkpoints = Path(job.checkpoint).parent
    after_init = load_checkpoint(checkpoints / "epoch_0002.pt")
    final = load_checkpoint(job.checkpoint)

    def same(state, start, prefix):
        return all(torch.equal(state[key], start[key]) for key in start if key.startswith(prefix))

    # The init stage trained the paraphraser alone: the student's weights and the translator as they began.
    assert all(torch.equal(after_init["model"][key], value) for key, value in student_start.items())
    assert same(after_init["loss"], loss_start, "translator.")
    assert not same(after_init["loss"], loss_start, "paraphraser.")
    # Then the student and the translator trained, the paraphraser frozen.
    assert not torch.equal(final["model"]["conv1.weight"], student_start["conv1.weight"])
    assert not torch.equal(final["model"]["fc.weight"], student_start["fc.weight"])
    assert same(final["loss"], after_init["loss"], "paraphraser.")
    assert not same(final["loss"], loss_start, "translator.")


@pytest.mark.slow  # two more jobs: the loss values and one job per method run in the default tests
@pytest.mark.parametrize("name", list(JOBS))
def test_job_resumes_exactly_from_its_epoch_1_checkpoint(store, trained, name):
    job = trained(name)
    client = mlflow_client(store)
    interrupted = store / f"{name}-interrupted"
    interrupted_after_epoch_1(client, job, interrupted)  # FT: in its init stage, the paraphraser's momentum kept
    resumed = run_job(job_config(store, name, f"resume={interrupted}"), store / f"{name}-unused")
    assert_resumed_exactly(job.checkpoint, resumed.checkpoint)
    run = client.get_run(job.run_id)
    teachers = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name.startswith("resnet20")]
    assert len(teachers) == 1  # both methods reused the one teacher
