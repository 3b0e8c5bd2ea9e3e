"""Every option of every config group composes with Hydra and instantiates (small sizes)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf

from kdresearch.config.groups import build
from kdresearch.config.naming import run_name
from kdresearch.config.validation import check_config
from kdresearch.data.splits import ImageData
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import TrainingLoss
from kdresearch.losses.combine import build_loss
from kdresearch.losses.kd import SoftTargetKD

DEFAULT_GROUPS = ("model", "teacher", "loss", "optimizer", "scheduler", "device", "data")
# Folders of configs that groups include (teacher_recipe: the shared part of every teacher option).
INCLUDED_ONLY = ("teacher_recipe",)
SMALL_SYNTHETIC = ("data.num_train=64", "data.num_test=32")


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def group_options():
    """(group, option) for every yaml file of every group folder in conf/, found on disk."""
    found = []
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in INCLUDED_ONLY):
        for option in sorted(folder.glob("*.yaml")):
            found.append((folder.name, option.stem))
    return found


def test_every_default_group_has_options():
    groups = {group for group, _ in group_options()}
    assert set(DEFAULT_GROUPS) <= groups
    options = {(g, o) for g, o in group_options()}
    for expected in [("model", "deep"), ("model", "light"), ("teacher", "deep"), ("teacher", "light"),
                     ("loss", "ce"), ("loss", "kd"), ("loss", "cosine"), ("loss", "regressor"),
                     ("loss", "multimargin"), ("optimizer", "adam"), ("optimizer", "sgd"),
                     ("device", "auto"), ("device", "cpu"), ("device", "cuda"), ("device", "mps"),
                     ("data", "cifar10"), ("data", "synthetic")]:
        assert expected in options


def test_defaults_are_the_tutorials():
    cfg = compose_config()
    assert (cfg.model.name, cfg.teacher.model.name, cfg.loss.name, cfg.optimizer.name, cfg.data.name) == (
        "light", "deep", "ce", "adam", "cifar10")
    assert (cfg.seed, cfg.batch_size, cfg.T) == (42, 128, 2)
    assert cfg.optimizer.lr == 0.001
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406] and list(cfg.data.std) == [0.229, 0.224, 0.225]
    check_config(cfg)


def instantiate_everything(cfg):
    """Build what a job builds from `cfg`: models, loss (checked against them), optimizer, small data."""
    student = build(cfg.model, "model")
    teacher = build(cfg.teacher.model, "teacher.model")
    assert isinstance(student, torch.nn.Module) and isinstance(teacher, torch.nn.Module)
    loss = build_loss(cfg.loss)  # as the job builds it (a combined loss builds its terms)
    assert isinstance(loss, TrainingLoss)
    if loss.needs_teacher:
        try:
            loss.bind(student, teacher)
        except KDResearchError:
            pass  # some pairs are refused on purpose (test_losses); the loss itself was built
    else:
        loss.bind(student, None)
    params = list(student.parameters()) + list(loss.parameters())
    optimizer = build(cfg.optimizer, "optimizer", params)
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = build(cfg.scheduler, "scheduler", optimizer, cfg.epochs)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    if cfg.data.name == "synthetic":
        data = build(cfg.data, "data")
        assert isinstance(data, ImageData)
        assert data.train_images.shape[1:] == (3, 32, 32)
    return student, teacher, loss, optimizer


# Options that are only complete with more overrides: loss=combine sums the methods added to it.
GROUP_OPTION_NEEDS = {("loss", "combine"): ["+loss@loss.kd=kd", "+loss@loss.at=at"]}


@pytest.mark.parametrize("group, option", group_options(), ids=[f"{g}={o}" for g, o in group_options()])
def test_group_option_composes_and_instantiates(group, option):
    if group in DEFAULT_GROUPS:
        overrides = [f"{group}={option}"]
        if group != "data":
            overrides += ["data=synthetic"]
        if group != "data" or option == "synthetic":
            overrides += list(SMALL_SYNTHETIC)
    elif group in ("experiment", "debug"):  # optional presets; the test swaps in small synthetic data
        overrides = [f"{group}={option}", "data=synthetic", *SMALL_SYNTHETIC]
    else:  # presets outside the defaults list
        overrides = [f"+{group}={option}"]
    overrides += GROUP_OPTION_NEEDS.get((group, option), [])
    cfg = compose_config(*overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "teacher":
        assert cfg.teacher.model.name == option
        assert "checkpoint" in cfg.teacher and "run_id" in cfg.teacher
    elif group in DEFAULT_GROUPS:
        assert cfg[group].name == option
    if group == "data" and option != "synthetic":
        assert "_target_" in cfg.data  # composes; loading real files is test_data's job
        return
    if group == "device":
        assert cfg.device.type in ("auto", "cpu", "cuda", "mps")
        assert cfg.device.precision in ("fp32", "bf16")
    if group not in DEFAULT_GROUPS and cfg.data.name == "synthetic":
        cfg = compose_config(*overrides, *SMALL_SYNTHETIC)
    instantiate_everything(cfg)


def test_synthetic_sizes_come_from_the_config():
    cfg = compose_config("data=synthetic", "data.num_train=40", "data.num_test=24", "data.limit_test=8")
    data = build(cfg.data, "data")
    assert data.train_images.shape == (40, 3, 32, 32) and data.test_images.shape == (8, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8


def test_cifar10_composes_with_its_options():
    cfg = compose_config("data=cifar10", "data.root=/somewhere", "data.verify=false", "data.download=false",
                   "data.limit_train=100")
    assert cfg.data._target_ == "kdresearch.data.load_cifar10"
    assert (cfg.data.root, cfg.data.verify, cfg.data.download, cfg.data.limit_train) == ("/somewhere", False, False, 100)


def test_kd_temperature_flows_from_the_short_key():
    cfg = compose_config("loss=kd", "T=4")
    assert cfg.loss.T == 4
    loss = build(cfg.loss, "loss")
    assert isinstance(loss, SoftTargetKD) and loss.T == 4.0
    assert (loss.ce_weight, loss.distill_weight) == (0.75, 0.25)
    assert run_name(cfg) == "light-kd-T4"
    assert compose_config("loss=kd").loss.T == 2
    assert run_name(compose_config("loss=kd")) == "light-kd-T2"
    assert run_name(compose_config("model=deep")) == "deep-ce"


def test_kd_bad_temperature_is_refused():
    with pytest.raises(KDResearchError, match="T must be a number, got 'abc'"):
        check_config(compose_config("loss=kd", "T=abc"))
    with pytest.raises(KDResearchError, match="T must be"):
        build(compose_config("loss=kd", "T=0").loss, "loss")


def test_sgd_options_reach_torch():
    cfg = compose_config("optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.8", "optimizer.nesterov=true",
                   "optimizer.weight_decay=0.001", "optimizer.maximize=false")
    optimizer = build(cfg.optimizer, "optimizer", [torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (
        0.05, 0.8, True, 0.001, 0.0)


def test_sgd_nesterov_without_momentum_is_a_one_line_error():
    cfg = compose_config("optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0")
    with pytest.raises(KDResearchError) as raised:
        build(cfg.optimizer, "optimizer", [torch.nn.Parameter(torch.zeros(3))])
    message = str(raised.value)
    assert message.startswith("optimizer:") and "Nesterov" in message
    assert "\n" not in message


def test_unknown_option_is_refused_by_hydra():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="loss/nope"):
        compose_config("loss=nope")


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc_and_is_on_by_default():
    from kdresearch.runtime import devices

    assert compose_config().device.keep_freed_memory is True
    assert devices.keep_freed_memory(True) is True
    assert devices.keep_freed_memory(False) is False


@pytest.mark.parametrize("preset, beta", [
    ("cifar100_res32x4_res8x4", 8.0), ("cifar100_res32x4_shuv1", 8.0), ("cifar100_res56_res20", 2.0),
    ("cifar100_vgg13_vgg8", 6.0), ("cifar100_wrn40_2_wrn16_2", 6.0),
])
def test_pair_presets_carry_the_authors_dkd_beta(preset, beta):
    """mdistiller configs/cifar100/dkd/<pair>.yaml: DKD.BETA 2 / 6 / 6 where the pair changes it, else 8;
    the bound loss gets it, a typed loss.beta still wins, and other losses compose unchanged."""
    cfg = compose_config(f"experiment={preset}", "loss=dkd")
    assert build_loss(cfg.loss).beta == beta
    assert build_loss(compose_config(f"experiment={preset}", "loss=dkd", "loss.beta=3").loss).beta == 3
    assert compose_config(f"experiment={preset}", "loss=kd").loss.name == "kd"
    assert build_loss(compose_config("loss=dkd").loss).beta == 8.0  # without a preset: the default
    combined = compose_config(f"experiment={preset}", "loss=kd", "+loss@loss.dkd=dkd")
    assert build_loss(combined.loss).terms["dkd"].beta == beta
