"""Methods that combine (kdresearch.losses.combine), the distillation-oriented trainer
(kdresearch.optimizers.DOT) and curriculum temperature KD (kdresearch.losses.ctkd): a combined
loss is the weighted sum of its terms computed apart, its terms' keys are the methods' own; DOT's
updates are mdistiller's rule, step by step; CTKD is KD at its learned temperature, whose gradient
is reversed on the authors' curriculum; and each trains as a job that resumes bit-exactly from the
epoch-1 checkpoint."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config, compose_job
from mlflow.tracking import MlflowClient
from torch.nn import functional as F

from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress
from kdresearch.losses.combine import CombinedLoss, build_loss
from kdresearch.optimizers import DOT
from kdresearch.training.checkpoint import load_checkpoint
from kdresearch.training.job import run_job

PAIR = ["debug=tiny", "model=resnet8", "teacher=resnet20", "device=cpu", "epochs=2", "batch_size=64",
        "data.num_train=128", "data.num_test=64", "teacher.batch_size=64", "optimizer=sgd", "optimizer.lr=0.05"]


def pair_outputs(student_net, teacher_net, seed=0):
    """Both models' features on four fixed images, and labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    with torch.no_grad():
        teacher = teacher_net(images, with_features=True)
    return student_net(images, with_features=True), teacher, labels


def pair_loss(*overrides):
    """The loss of `overrides` on resnet8 <- resnet20, bound, with both models' outputs."""
    cfg = compose_config("model=resnet8", "teacher=resnet20", "data=synthetic", *overrides)
    torch.manual_seed(0)
    student, teacher = build(cfg.model, "model"), build(cfg.teacher.model, "teacher.model")
    loss = build_loss(cfg.loss)
    loss.bind(student, teacher, train_size=64, train_labels=torch.arange(64) % 10)
    return loss, (student, teacher)


@pytest.mark.parametrize("first, first_part", [("kd", "kd"), ("dkd", "dkd")])
def test_combined_loss_is_the_weighted_sum_of_its_terms(first, first_part):
    combined, nets = pair_loss(f"loss={first}", "+loss@loss.at=at", "loss.at.distill_weight=500",
                               "+loss.weights.at=0.5", "T=4")
    assert isinstance(combined, CombinedLoss) and list(combined.terms) == [first, "at"]
    alone, _ = pair_loss(f"loss={first}", "T=4")
    at_alone, _ = pair_loss("loss=at", "loss.distill_weight=500", "loss.ce_weight=0")
    assert combined.teacher_fields == ("logits", "stage0", "stage1", "stage2") and combined.student_features
    student, teacher, labels = pair_outputs(*nets)
    progress = Progress(epoch=3, step=1, epochs=10, steps_per_epoch=1)
    total, parts = combined(student, teacher, labels, progress)
    first_total, first_parts = alone(student, teacher, labels, progress)
    at_total, at_parts = at_alone(student, teacher, labels, progress)
    torch.testing.assert_close(total, first_total + 0.5 * at_total, rtol=1e-6, atol=0)
    assert set(parts) == set(first_parts) | {"at"} and first_part in parts  # CE once, under "ce"
    torch.testing.assert_close(parts["at"], at_parts["at"])
    # CE counts once: the at term's CE weight is 0, the first term's stays
    torch.testing.assert_close(total - first_total, 0.5 * 500 * at_parts["at"], rtol=1e-5, atol=0)


def test_combine_terms_keep_their_methods_defaults_and_name_clashes_get_the_term():
    combined, nets = pair_loss("loss=combine", "+loss@loss.kd=kd", "+loss@loss.crd=crd", "loss.crd.kd_weight=0.5",
                               "loss.crd.nce_k=8", "T=3")
    kd, crd = combined.terms["kd"], combined.terms["crd"]
    assert (kd.T, kd.ce_weight, kd.distill_weight) == (3, 0.75, 0.25)  # conf/loss/kd.yaml, ${T} resolved
    assert crd.ce_weight == 0.0 and crd.kd_weight == 0.5
    student, teacher, labels = pair_outputs(*nets)
    progress = Progress(1, 1, 1, 1, index=torch.arange(4))
    _, parts = combined(student, teacher, labels, progress)
    assert {"ce", "kd", "crd", "crd_kd"} <= set(parts)  # crd's own "kd" part, prefixed by its term
    assert set(combined.state_dict()) >= {f"terms.crd.{key}" for key in crd.state_dict()}


@pytest.mark.parametrize("overrides, message", [
    (["loss=combine"], "loss=combine needs terms: add each method as +loss@loss.NAME=NAME"),
    (["loss=kd", "+loss@loss.at=at", "+loss.weights.fitnet=2"], "loss.weights.fitnet: no term of that name"),
    (["loss=kd", "+loss@loss.at=at", "+loss.weights.at=-1"], "loss.weights.at"),
    (["loss=kd", "+loss@loss.ce=ce"], "loss.ce: a later term of a combined loss must have a ce_weight"),
    (["loss=kd", "+loss@loss.kd=kd"], "loss.kd: loss=kd is already the first term"),
])
def test_combine_refuses_in_one_line(overrides, message):
    with pytest.raises(KDResearchError, match=re.escape(message)) as error:
        pair_loss(*overrides)
    assert "\n" not in str(error.value)


# --- DOT against mdistiller's update rule -----------------------------------------------------------

def mdistiller_dot_step(params, task_grads, distill_grads, state, lr, momentum, momentum_kd, weight_decay):
    """mdistiller's DistillationOrientedTrainer (step_kd then step), written plainly: `state` holds
    each parameter's two buffers by name; a grad of None means the loss does not reach it."""
    average = (momentum + momentum_kd) / 2
    for name, p in params.items():  # the task update
        g = task_grads[name]
        if g is None:
            continue
        d = g + weight_decay * p
        key = ("task", name)
        if key not in state:
            state[key] = d.clone()
        else:
            state[key] = (momentum if distill_grads[name] is not None else average) * state[key] + d
        p -= lr * state[key]
    for name, p in params.items():  # the distillation update
        d = distill_grads[name]
        if d is None:
            continue
        key = ("kd", name)
        if key not in state:
            state[key] = d.clone()
        elif task_grads[name] is not None:
            state[key] = momentum_kd * state[key] + d
        else:
            state[key] = average * state[key] + (d + weight_decay * p)
        p -= lr * state[key]


def tiny_losses(params, x, labels, target):
    """A task loss reaching `shared` and `head`, a distillation loss reaching `shared` and `connector`."""
    hidden = x @ params["shared"]
    task = 0.5 * F.cross_entropy(hidden @ params["head"], labels)
    distill = (hidden @ params["connector"] - target).pow(2).mean()
    return task, distill


def test_dot_steps_as_mdistiller_does():
    generator = torch.Generator().manual_seed(0)
    start = {name: torch.randn(*shape, generator=generator) * 0.3
             for name, shape in {"shared": (6, 5), "head": (5, 3), "connector": (5, 4)}.items()}
    ours = {name: torch.nn.Parameter(value.clone()) for name, value in start.items()}
    reference = {name: value.clone() for name, value in start.items()}
    optimizer = DOT(list(ours.values()), lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-3)
    state = {}
    for _ in range(3):
        x, labels = torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        target = torch.randn(8, 4, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        optimizer.backward_split(*tiny_losses(ours, x, labels, target))
        optimizer.step()
        leaves = {name: value.clone().requires_grad_() for name, value in reference.items()}
        task, distill = tiny_losses(leaves, x, labels, target)
        task_grads = dict(zip(leaves, torch.autograd.grad(task, list(leaves.values()), retain_graph=True,
                                                                allow_unused=True)))
        distill_grads = dict(zip(leaves, torch.autograd.grad(distill, list(leaves.values()), allow_unused=True)))
        with torch.no_grad():
            mdistiller_dot_step(reference, task_grads, distill_grads, state, 0.1, 0.825, 0.975, 5e-3)
        for name in start:
            torch.testing.assert_close(ours[name].detach(), reference[name], rtol=1e-6, atol=1e-7)


def test_dot_refuses_momenta_outside_their_range():
    with pytest.raises(KDResearchError, match=r"optimizer.delta=0.2 with optimizer.momentum=0.1"):
        DOT([torch.nn.Parameter(torch.zeros(1))], momentum=0.1, delta=0.2)


# --- jobs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("combine_dot")  # one store: the teacher is trained once, then reused


JOBS = {  # overrides -> the loss parts it must log
    "kd+at": (["loss=kd", "+loss@loss.at=at", "loss.at.distill_weight=500"], {"train/kd", "train/at"}),
    "kd-dot": (["loss=kd", "optimizer=dot", "optimizer.lr=0.05"], {"train/kd"}),
    "ctkd": (["loss=ctkd", "loss.reversal_epochs=2"], {"train/ctkd", "train/temperature"}),
}


@pytest.mark.slow  # two jobs and their continuations, a teacher trained: ~40 s
@pytest.mark.usefixtures("one_compute_thread")
@pytest.mark.parametrize("name", list(JOBS))
def test_job_trains_and_resumes_exactly(store, name):
    overrides, parts = JOBS[name]
    job = run_job(compose_job(store, *PAIR, *overrides), store / name)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert parts | {"train/ce", "test/acc"} <= set(run.data.metrics)

    interrupted = store / f"{name}-interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(store / name / "checkpoints" / "epoch_0001.pt", interrupted / "checkpoints")
    client.set_terminated(job.run_id, "KILLED")  # as a stopped job leaves it
    resumed = run_job(compose_job(store, *PAIR, *overrides, f"resume={interrupted}"), store / f"{name}-unused")
    done, again = load_checkpoint(job.checkpoint), load_checkpoint(resumed.checkpoint)
    for section in ("model", "loss"):
        assert done[section].keys() == again[section].keys()
        for key, tensor in done[section].items():
            assert torch.equal(tensor, again[section][key]), f"{section}.{key}"
    for index, values in done["optimizer"]["state"].items():  # DOT: both momentum buffers of each parameter
        for key, tensor in values.items():
            assert torch.equal(tensor, again["optimizer"]["state"][index][key]), f"optimizer {index}.{key}"
    if name == "kd-dot":
        assert {"task_momentum", "distill_momentum"} <= set(done["optimizer"]["state"][0])
    if name == "ctkd":  # the learned temperature's parameter trained, and is in the checkpoint
        assert done["loss"]["temperature_logit"].item() != 1.0
    drop = {"epoch_seconds"}
    assert {k: v for k, v in done["metrics"].items() if k not in drop} == {
        k: v for k, v in again["metrics"].items() if k not in drop}


# --- CTKD ------------------------------------------------------------------------------------------

def authors_cosine_decay(epoch, max_value=0.0, min_value=-1.0, loops=10):
    """CTKD's CosineDecay.get_value (train_student.py): the λ its gradient reversal multiplies by."""
    epoch = min(max(epoch, 0), loops)
    return (math.cos(epoch * math.pi / loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def test_ctkd_is_kd_at_its_learned_temperature_with_the_gradient_reversed():
    loss, nets = pair_loss("loss=ctkd")
    student, teacher, labels = pair_outputs(*nets)
    with torch.no_grad():
        loss.temperature_logit.fill_(0.3)
    epoch = 4
    total, parts = loss(student, teacher, labels, Progress(epoch, 1, 20, 1))

    theta = torch.tensor(0.3, requires_grad=True)
    T = 1.0 + 20.0 * torch.sigmoid(theta)
    s, t = student.logits.float(), teacher.logits.float()
    kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    expected = 0.1 * F.cross_entropy(s, labels) + 0.9 * kl
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(parts["temperature"], T.detach())

    total.backward()
    (theta_grad,) = torch.autograd.grad(expected, theta)
    lam = authors_cosine_decay(epoch)
    assert -1 < lam < 0
    torch.testing.assert_close(loss.temperature_logit.grad[0], lam * theta_grad, rtol=1e-4, atol=1e-7)
    assert "temperature_logit" in loss.state_dict()


def test_ctkd_reversal_follows_the_authors_cosine_curriculum():
    from kdresearch.losses.ctkd import reversal_strength

    for epoch in (0, 1, 5, 9, 10, 30):
        assert reversal_strength(epoch, 0.0, 1.0, 10) == pytest.approx(-authors_cosine_decay(epoch), abs=1e-12)


def test_ctkd_refuses_a_temperature_range_beyond_the_largest():
    with pytest.raises(KDResearchError, match=r"loss.T_min \+ loss.T_range must be at most 100"):
        pair_loss("loss=ctkd", "loss.T_range=120")


@pytest.mark.parametrize("overrides, message", [
    (["loss=ce", "optimizer=dot"], "optimizer=dot needs a distillation loss with a cross-entropy term (a ce_weight) "
                                   "to split into task and distillation gradients; loss=ce has none"),
    (["loss=kd", "optimizer@teacher.optimizer=dot"], "teacher.optimizer=dot needs a distillation loss"),
    (["loss=fsp", "epochs=40", "optimizer=dot"], "loss=fsp's init stage (loss.init_epochs=30) trains without "
                                                 "cross-entropy; use optimizer=sgd"),
    (["loss=kd", "+loss@loss.fsp=fsp", "epochs=40", "optimizer=dot"], "loss=fsp's init stage"),
])
def test_dot_refuses_a_loss_it_cannot_split_before_the_job(overrides, message):
    from kdresearch.config.validation import check_config

    with pytest.raises(KDResearchError, match=re.escape(message)) as error:
        check_config(compose_config("data=synthetic", *overrides))
    assert "\n" not in str(error.value)
    check_config(compose_config("data=synthetic", "loss=dkd", "+loss@loss.at=at", "optimizer=dot"))
    check_config(compose_config("data=synthetic", "loss=fsp", "loss.init_epochs=0", "loss.distill_weight=1",
                                "optimizer=dot"))  # no init stage: DOT splits FSP + CE


def test_a_combined_loss_names_its_run_by_its_terms():
    from kdresearch.config.naming import run_name

    assert run_name(compose_config("model=resnet8", "loss=dkd", "+loss@loss.at=at")) == "resnet8-dkd+at-T4"
    assert run_name(compose_config("model=resnet8", "loss=combine", "+loss@loss.kd=kd", "+loss@loss.at=at")) == (
        "resnet8-combine+kd+at")
