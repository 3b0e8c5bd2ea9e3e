"""`check_config`: every key a user can type in a job's config, checked before anything starts.

Hydra passes whatever was typed through (`epochs=abc`, `device.deterministic=maybe`), and a bad
value found later wastes what ran before it (a dataset download, the md5 check, a teacher's
training) or, worse, is used as it is (`device.compile=maybe` is a true string). So the first step of
every job is this check, each key against its rule (`kdresearch.config.validators`), one line naming
the key, the rule and the value. A module that owns a group's options states their rules itself and
is called from here: `devices.check_options` (device.*), `schedules.check_options` (scheduler.*,
teacher.scheduler.*), the data checks of `kdresearch.data` (data.*). The groups whose constructors
check their own options are then built once, on a stand-in parameter: the loss (every loss checks
its hyperparameters), the optimizers (torch's own value rules, e.g. Nesterov needs momentum) and the
schedules (an option no schedule takes). That costs milliseconds besides imports the job needs
anyway; data, models and runs come later.
"""

from __future__ import annotations

import posixpath

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdresearch import optimizers, schedules
from kdresearch.config.flat import flatten
from kdresearch.config.groups import build
from kdresearch.config.validators import integer, name, number, switch
from kdresearch.data import synthetic
from kdresearch.data.splits import check_limit, check_normalisation, check_num_classes
from kdresearch.data.views import check_views
from kdresearch.errors import KDResearchError, first_line
from kdresearch.losses.base import temperature
from kdresearch.losses.combine import build_loss
from kdresearch.runtime import devices

SEEDS = {"at_least": 0, "at_most": 2**32 - 1}  # what torch.manual_seed and numpy's seeding both take

# Config nodes that a config group fills, and how a user chooses the group's option there: the
# nodes inside the teacher are packages of their group (`scheduler@teacher.scheduler=cosine`), so
# `teacher.scheduler=cosine` would replace the node by the string 'cosine'.
GROUP_NODES = {
    "model": "model=NAME", "teacher": "teacher=NAME", "loss": "loss=NAME", "optimizer": "optimizer=NAME",
    "scheduler": "scheduler=NAME", "device": "device=NAME", "data": "data=NAME",
    "teacher.model": "teacher=NAME (that model with the teacher recipe) or model@teacher.model=NAME",
    "teacher.optimizer": "optimizer@teacher.optimizer=NAME",
    "teacher.scheduler": "scheduler@teacher.scheduler=NAME",
}

# The optimizer options (torch.optim's names) that are numbers >= 0, and those that are switches.
OPTIMIZER_NUMBERS = ("momentum", "dampening", "weight_decay", "eps")
OPTIMIZER_SWITCHES = ("nesterov", "maximize", "amsgrad", "capturable", "differentiable", "decoupled_weight_decay",
                      "foreach", "fused")

# What MLflow 3.17 refuses in a registered model's name (mlflow.utils.validation._validate_model_name
# for the SQL and server stores, plus the file store's path separators and '%').
REGISTERED_NAME_FORBIDDEN = ("/", ":", "\\", "%")


def check_config(cfg: DictConfig) -> None:
    """Check every key users type (module docstring); raises KDResearchError with one line."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:  # e.g. T='${nope}'
        raise KDResearchError(f"config: {first_line(error)}") from None
    check_group_nodes(tree)
    flat = flatten(tree)
    check_job_keys(flat)
    check_tracking(flat)
    devices.check_options(tree["device"])
    check_data(tree["data"])
    check_teacher(flat)
    for key in ("model.num_classes", "teacher.model.num_classes"):
        if key in flat:  # a head's size (it follows data.num_classes)
            integer(key, flat[key], at_least=2)
    check_optimizer(tree["optimizer"], "optimizer")
    check_optimizer(tree["teacher"]["optimizer"], "teacher.optimizer")
    schedules.check_options(tree["scheduler"], flat["epochs"], "scheduler")
    schedules.check_options(tree["teacher"]["scheduler"], flat["teacher.epochs"], "teacher.scheduler")
    build_on_stand_ins(cfg)


def check_group_nodes(tree: dict) -> None:
    """Each node a config group fills holds that group's option, not a typed value."""
    for key, how in GROUP_NODES.items():
        parent, _, last = key.rpartition(".")
        value = tree[parent][last] if parent else tree[key]
        if not isinstance(value, dict):
            shown = how.replace("NAME", str(value))
            raise KDResearchError(f"{key}={value} sets a value, but {key} is chosen from a config group: "
                                  f"write {shown}")


def check_job_keys(flat: dict) -> None:
    """The top-level keys and the checkpoint and cache settings."""
    integer("epochs", flat["epochs"], at_least=1)
    integer("batch_size", flat["batch_size"], at_least=1)
    integer("seed", flat["seed"], **SEEDS)
    integer("augment_seed", flat["augment_seed"], **SEEDS, or_null=True)  # null: the views follow `seed`
    temperature("T", flat["T"])
    number("kd_weights.ce", flat["kd_weights.ce"], at_least=0)
    number("kd_weights.distill", flat["kd_weights.distill"], at_least=0)
    switch("quiet", flat["quiet"])
    integer("checkpoint.keep_last", flat["checkpoint.keep_last"], at_least=0)
    switch("cache.enabled", flat["cache.enabled"])
    name("cache.dir", flat["cache.dir"], or_null=True)
    number("cache.max_gb", flat["cache.max_gb"], above=0)


def check_tracking(flat: dict) -> None:
    """The tracking keys (the store's URI itself is checked where it is opened: tracking.store.check_uri)."""
    name("tracking.uri", flat["tracking.uri"], or_null=True)
    name("tracking.experiment", flat["tracking.experiment"])
    log_model = switch("tracking.log_model", flat["tracking.log_model"])
    switch("tracking.system_metrics", flat["tracking.system_metrics"])
    number("tracking.retry_minutes", flat["tracking.retry_minutes"], above=0)
    registered = name("tracking.register_model", flat["tracking.register_model"], or_null=True)
    if registered is None:
        return
    normal = posixpath.normpath(registered)
    if any(c in registered for c in REGISTERED_NAME_FORBIDDEN) or normal != registered or normal == "." \
            or normal.startswith(".."):
        raise KDResearchError(
            f"tracking.register_model must be a name MLflow registers (none of {' '.join(REGISTERED_NAME_FORBIDDEN)}, "
            f"not '.', not starting with '..'), got {registered!r}")
    if not log_model:
        raise KDResearchError(f"tracking.register_model={registered} registers the logged model, but "
                              f"tracking.log_model=false (debug=tiny sets it): add tracking.log_model=true")


def check_data(data: dict) -> None:
    """The keys of the chosen data option; what needs the data itself (val_size below its training
    images, num_classes equal to its classes) is checked when it is loaded."""
    for key in ("augment", "verify", "download"):
        if key in data:
            switch(f"data.{key}", data[key])
    check_num_classes(data["num_classes"])
    for key in ("limit_train", "limit_test"):
        check_limit(data[key], key)
    integer("data.val_size", data["val_size"], at_least=0)
    integer("data.val_seed", data["val_seed"], **SEEDS)
    check_normalisation(data["mean"], data["std"])
    if "num_workers" in data:  # image files decoded by DataLoader workers
        integer("data.num_workers", data["num_workers"], at_least=0)
    if "num_train" in data:  # generated data (data=synthetic)
        synthetic.check_sizes(data["num_train"], data["num_test"], data["num_classes"])
        number("data.noise", data["noise"], at_least=0)
        integer("data.seed", data["seed"], **SEEDS)


def check_teacher(flat: dict) -> None:
    """The teacher recipe's own keys (its optimizer and schedule: `check_optimizer`, schedules)."""
    integer("teacher.epochs", flat["teacher.epochs"], at_least=1)
    integer("teacher.batch_size", flat["teacher.batch_size"], at_least=1)
    switch("teacher.augment", flat["teacher.augment"])
    number("teacher.accuracy_margin", flat["teacher.accuracy_margin"], at_least=0)


def check_optimizer(optimizer: dict, key: str) -> None:
    """An optimizer node's options by their torch.optim names: lr > 0, the other numbers >= 0,
    betas two numbers in [0, 1), switches true or false; torch's own value rules run when it is
    built (`build_on_stand_ins`)."""
    number(f"{key}.lr", optimizer["lr"], above=0)
    for option in OPTIMIZER_NUMBERS:
        if option in optimizer:
            number(f"{key}.{option}", optimizer[option], at_least=0)
    for option in OPTIMIZER_SWITCHES:
        if optimizer.get(option) is not None:  # foreach / fused: null lets torch choose
            switch(f"{key}.{option}", optimizer[option])
    if "betas" in optimizer:
        betas = optimizer["betas"]
        if not isinstance(betas, list) or len(betas) != 2:
            raise KDResearchError(f"{key}.betas must be two numbers in [0, 1), got {betas!r}")
        for index, beta in enumerate(betas):
            number(f"{key}.betas[{index}]", beta, at_least=0, below=1)


def build_on_stand_ins(cfg: DictConfig) -> None:
    """Build the loss (and check it fits the job's epochs), and each optimizer and schedule on one
    stand-in parameter, so that the checks their constructors make run now (their errors name the group: `teacher.optimizer: ...`)."""
    loss = build_loss(cfg.loss)
    loss.check_epochs(cfg.epochs)
    check_views(cfg.loss.name, loss.views, bool(cfg.data.augment), str(cfg.data.get("_target_", "")))
    for prefix, epochs in (("", cfg.epochs), ("teacher.", cfg.teacher.epochs)):
        optimizers.check_split(OmegaConf.select(cfg, f"{prefix}optimizer"), loss, cfg.loss.name,
                               f"{prefix}optimizer")
        optimizer = build(OmegaConf.select(cfg, f"{prefix}optimizer"), f"{prefix}optimizer",
                          [torch.nn.Parameter(torch.zeros(1))])
        build(OmegaConf.select(cfg, f"{prefix}scheduler"), f"{prefix}scheduler", optimizer, epochs)
