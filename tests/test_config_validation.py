"""Every key a user types is checked before anything starts: the typed validators, `check_config` on
composed configs (each switch of the config tree, the group nodes of the teacher, the keys that
used to fail late or not at all), the bound on distillation temperatures, the keys that cannot
change a run's identity, the sweep's parent record and the search's own checks; through
`python train.py`, the one-line errors and exit status of a single job and of a multirun."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import (
    FAST,
    REPO_ROOT,
    compose_config,
    experiment_runs,
    mlflow_client,
    new_store,
    run_command,
    tracking_uri,
    train_in_process,
)
from omegaconf import OmegaConf

from kdresearch.config import validators
from kdresearch.config.flat import flatten
from kdresearch.config.identity import config_identity, identity_hash
from kdresearch.config.validation import check_config
from kdresearch.data.synthetic import make_synthetic
from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.losses.base import MAX_TEMPERATURE
from kdresearch.losses.crd import ContrastiveRepresentationDistillation
from kdresearch.losses.dist import DIST
from kdresearch.losses.dkd import DKD
from kdresearch.losses.kd import SoftTargetKD, soft_target_kd
from kdresearch.sweeps import parent_runs
from kdresearch.sweeps.search import SearchSetup, check_search

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def refusal(*overrides: str) -> str:
    """check_config's one-line message for the config of these overrides."""
    with pytest.raises(KDResearchError) as raised:
        check_config(compose_config(*overrides))
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- the typed validators ---------------------------------------------------------------------------

@pytest.mark.parametrize("check, value, message", [
    (lambda v: validators.integer("epochs", v, at_least=1), "abc", "epochs must be an integer >= 1, got 'abc'"),
    (lambda v: validators.integer("epochs", v, at_least=1), 2.0, "epochs must be an integer >= 1, got 2.0"),
    (lambda v: validators.integer("epochs", v, at_least=1), True, "epochs must be an integer >= 1, got True"),
    (lambda v: validators.integer("seed", v, 0, 2**32 - 1), -1, "seed must be an integer in [0, 4294967295], got -1"),
    (lambda v: validators.integer("data.limit_train", v, at_least=1, or_null=True), 0,
     "data.limit_train must be an integer >= 1 or null, got 0"),
    (lambda v: validators.integer("data.val_size", v, at_least=0, below=10, note="the training images"), 10,
     "data.val_size must be an integer in [0, 10) (the training images), got 10"),
    (lambda v: validators.number("optimizer.lr", v, above=0), "abc", "optimizer.lr must be a number, got 'abc'"),
    (lambda v: validators.number("optimizer.lr", v, above=0), 0, "optimizer.lr must be > 0, got 0"),
    (lambda v: validators.number("optimizer.lr", v, above=0), float("nan"), "optimizer.lr must be finite, got nan"),
    (lambda v: validators.number("loss.nce_mom", v, at_least=0, at_most=1), 1.5, "loss.nce_mom must be in [0, 1], got 1.5"),
    (lambda v: validators.switch("quiet", v), "maybe", "quiet must be true or false, got 'maybe'"),
    (lambda v: validators.switch("quiet", v), 1, "quiet must be true or false, got 1"),
    (lambda v: validators.name("tracking.experiment", v), " ", "tracking.experiment must be a non-empty name, got ' '"),
    (lambda v: validators.choice("device.type", v, ("cpu", "cuda")), "tpu", "device.type must be one of cpu, cuda, got 'tpu'"),
])
def test_validators_name_the_key_the_rule_and_the_value(check, value, message):
    with pytest.raises(KDResearchError) as raised:
        check(value)
    assert str(raised.value) == message


def test_validators_return_what_passes():
    assert validators.integer("epochs", 3, at_least=1) == 3
    assert validators.integer("augment_seed", None, at_least=0, or_null=True) is None
    assert validators.number("T", 4, above=0) == 4.0 and isinstance(validators.number("T", 4, above=0), float)
    assert validators.switch("quiet", False) is False


# --- every switch of the config tree: true or false only --------------------------------------------

# Group folders whose options are packaged under the group's name and, for the teacher recipe's
# optimizer and schedule, under teacher.<group> too.
TEACHER_PACKAGES = ("optimizer", "scheduler")
NOT_GROUPS = ("hydra", "experiment", "debug", "teacher")  # no keys of their own, or globals


def every_switch() -> list[tuple[tuple[str, ...], str]]:
    """(overrides choosing the option, key) for every boolean key of every yaml file in the config tree."""
    found = []
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    for key, value in flatten(OmegaConf.to_container(top)).items():
        if isinstance(value, bool) and not key.startswith(("hydra.", "defaults")):
            found.append(((), key))
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in NOT_GROUPS):
        for option in sorted(folder.glob("*.yaml")):
            content = OmegaConf.to_container(OmegaConf.load(option))
            content.pop("defaults", None)
            for key, value in flatten(content).items():
                if not isinstance(value, bool) or key.rsplit(".", 1)[-1].startswith("_"):  # _partial_: Hydra's
                    continue
                if folder.name == "teacher_recipe":
                    found.append(((), f"teacher.{key}"))
                    continue
                found.append(((f"{folder.name}={option.stem}",), f"{folder.name}.{key}"))
                if folder.name in TEACHER_PACKAGES:
                    found.append(((f"{folder.name}@teacher.{folder.name}={option.stem}",), f"teacher.{folder.name}.{key}"))
    return found


SWITCHES = every_switch()


def test_the_switch_list_covers_the_config_tree():
    keys = {key for _, key in SWITCHES}
    assert {"quiet", "cache.enabled", "tracking.log_model", "device.deterministic", "device.compile",
            "device.channels_last", "data.verify", "data.augment", "teacher.augment", "loss.standardize",
            "optimizer.nesterov", "teacher.optimizer.nesterov"} <= keys


@pytest.mark.parametrize("choose, key", SWITCHES, ids=[" ".join((*c, k)) for c, k in SWITCHES])
def test_every_switch_refuses_anything_but_true_or_false(choose, key):
    assert refusal(*choose, f"{key}=maybe") == f"{key} must be true or false, got 'maybe'"


# --- keys that failed late, with someone else's words, or not at all --------------------------------

@pytest.mark.parametrize("override, fix", [
    ("teacher.scheduler=cosine", "write scheduler@teacher.scheduler=cosine"),
    ("teacher.optimizer=sgd", "write optimizer@teacher.optimizer=sgd"),
    ("teacher.model=resnet20", "write teacher=resnet20 (that model with the teacher recipe) or model@teacher.model=resnet20"),
])
def test_a_teacher_group_given_as_a_value_says_how_to_choose_it(override, fix):
    message = refusal("loss=kd", override)
    assert message.startswith(f"{override} sets a value") and message.endswith(fix)


def test_the_teacher_groups_chosen_as_groups_pass():
    check_config(compose_config("loss=kd", "scheduler@teacher.scheduler=cosine", "optimizer@teacher.optimizer=sgd",
                                "model@teacher.model=resnet20"))


@pytest.mark.parametrize("overrides, message", [
    (("data.val_seed=abc",), "data.val_seed must be an integer in [0, 4294967295], got 'abc'"),
    (("optimizer.lr=abc",), "optimizer.lr must be a number, got 'abc'"),
    (("teacher.optimizer.lr=-1",), "teacher.optimizer.lr must be > 0, got -1"),
    (("optimizer.betas=[0.9,1.0]",), "optimizer.betas[1] must be in [0, 1), got 1"),
    (("data=synthetic", "data.num_classes=1000000"),
     ("data.num_classes must be an integer in [2, 2000] (data.num_train: one class per training image at most), "
      "got 1000000")),
    (("data.mean=[0.5,0.5]",), "data.mean must be 3 numbers (one per RGB channel), got [0.5, 0.5]"),
    (("device.type=tpu",), "device.type must be one of auto, cpu, cuda, mps, got 'tpu'"),
    (("loss=kd", "kd_weights.ce=-1"), "kd_weights.ce must be >= 0, got -1"),
    (("scheduler@teacher.scheduler=cosine", "teacher.scheduler.warmup_epochs=20"),
     "teacher.scheduler.warmup_epochs must be an integer in [0, 10) (fewer than the epochs), got 20"),
    (("optimizer@teacher.optimizer=sgd", "teacher.optimizer.nesterov=true", "teacher.optimizer.momentum=0"),
     "teacher.optimizer: Nesterov momentum requires a momentum and zero dampening"),
    (("+scheduler.warmup=2",), "scheduler: constant() got an unexpected keyword argument 'warmup'"),
    (("T=${nope}",), "config: Interpolation key 'nope' not found"),
])
def test_keys_are_refused_with_their_rule(overrides, message):
    assert refusal(*overrides) == message


def test_synthetic_data_bounds_its_classes_before_it_allocates():
    with pytest.raises(KDResearchError, match=r"data.num_classes must be an integer in \[2, 100\]"):
        make_synthetic(num_train=100, num_test=10, num_classes=10**9)  # 19 TB of class patterns


def test_a_registered_model_needs_the_logged_model():
    message = refusal(*FAST, "tracking.register_model=mymodel")
    assert message == ("tracking.register_model=mymodel registers the logged model, but tracking.log_model=false "
                       "(debug=tiny sets it): add tracking.log_model=true")
    check_config(compose_config(*FAST, "tracking.register_model=mymodel", "tracking.log_model=true"))


@pytest.mark.parametrize("name", ["a/b/c", "a:b", "50%", "..x", "."])
def test_a_registered_model_name_follows_mlflows_rule(name):
    message = refusal("tracking.log_model=true", f"tracking.register_model='{name}'")
    assert message.startswith("tracking.register_model must be a name MLflow registers") and message.endswith(repr(name))


def test_the_registered_model_rule_is_mlflows():
    """Names the check lets through MLflow registers, and those it refuses MLflow refuses."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    for name in ("a/b/c", "a:b", "..x", "."):
        with pytest.raises(MlflowException):
            _validate_model_name(name)
    for name in ("tiny-light", "my model.v2", ".hidden"):
        _validate_model_name(name)
        check_config(compose_config("tracking.log_model=true", f"tracking.register_model='{name}'"))


# --- a distillation term that would vanish -----------------------------------------------------------

@pytest.mark.parametrize("make, key", [
    (lambda T: SoftTargetKD(T=T), "T"), (lambda T: DKD(T=T), "loss.T"), (lambda T: DIST(T=T), "loss.T"),
    (lambda T: ContrastiveRepresentationDistillation(T=T), "loss.T"),
])
def test_temperatures_beyond_the_bound_are_refused(make, key):
    make(MAX_TEMPERATURE)
    with pytest.raises(KDResearchError, match=rf"^{key} must be <= 100 \(.*\), got 1e\+09$"):
        make(1e9)


def test_the_top_level_temperature_is_refused_before_anything_starts():
    assert refusal("loss=kd", "T=1e9").startswith("T must be <= 100")


def test_float32_computes_the_kd_term_faithfully_up_to_the_bound_and_not_far_beyond():
    """The bound's reason: at T = 100 the float32 term is within 0.1 % of the float64 one (for
    logits of unit spread, the standardised case), at 1e5 it is off, at 1e9 it is exactly 0."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(128, 100, generator=generator), torch.randn(128, 100, generator=generator)

    def relative_error(T: float) -> float:
        exact = soft_target_kd(student.double(), teacher.double(), T).item()
        return abs(soft_target_kd(student, teacher, T).item() - exact) / exact

    assert relative_error(MAX_TEMPERATURE) < 1e-3
    assert relative_error(1e5) > 0.1
    assert soft_target_kd(student, teacher, 1e9).item() == 0.0


# --- keys that cannot change what is trained do not change the identity -----------------------------

def identity_of(*overrides: str) -> str:
    return identity_hash(config_identity(compose_config("data=synthetic", *overrides), "fingerprint"))


def test_an_augmentation_seed_without_augmentation_is_not_part_of_the_identity():
    assert identity_of("augment_seed=5") == identity_of()
    assert identity_of("augment_seed=5", "teacher.augment=true") == identity_of("teacher.augment=true")  # no teacher
    assert identity_of("data.augment=true", "augment_seed=5") != identity_of("data.augment=true")
    assert identity_of("loss=kd", "teacher.augment=true", "augment_seed=5") != \
        identity_of("loss=kd", "teacher.augment=true")  # the automatic teacher's views follow it


def test_a_validation_seed_without_a_validation_split_is_not_part_of_the_identity():
    assert identity_of("data.val_seed=3") == identity_of()
    assert identity_of("data.val_size=100", "data.val_seed=3") != identity_of("data.val_size=100")


# --- sweeps: the parent record and the search -------------------------------------------------------

@pytest.mark.parametrize("content, problem", [("not json", "Expecting value"), ('{"tracking_uri": "x"}', 'no "run_id"')])
def test_a_damaged_parent_record_is_one_line_naming_the_file(tmp_path, content, problem):
    record = tmp_path / parent_runs.PARENT_FILE
    record.write_text(content)
    with pytest.raises(KDResearchError) as raised:
        parent_runs.parent_run_id(str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"{record} is not a parent-run record") and problem in message and "\n" not in message
    assert record.read_text() == content  # kept: it may be the only link to the parent run


def test_a_sweep_over_a_damaged_parent_record_stops_before_any_run(tmp_path):
    store = new_store(tmp_path / "store")
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / parent_runs.PARENT_FILE).write_text("{")
    config = compose_config(f"tracking.uri={tracking_uri(store)}", f"hydra.sweep.dir={folder}", hydra=True)
    with pytest.raises(SystemExit, match=rf"^error: {folder / parent_runs.PARENT_FILE} is not a parent-run record"):
        parent_runs.SweepParentRun().on_multirun_start(config)
    assert experiment_runs(mlflow_client(store)) == []


def search_settings(*overrides: str):
    return compose_config("hydra/sweeper=kd_search", *overrides, hydra=True).hydra.sweeper


@pytest.mark.parametrize("settings, arguments, message", [
    (("hydra.sweeper.n_trials=0",), (), "hydra.sweeper.n_trials must be an integer >= 1, got 0"),
    (("hydra.sweeper.n_jobs=0",), (), "hydra.sweeper.n_jobs must be an integer >= 1, got 0"),
    ((), ("T=tag(log, interval(8, 1))",),
     "search T=tag(log, interval(8, 1)): The `low` value must be smaller than or equal to the `high` value"),
    (("hydra.sweeper.params=null",), ("loss=kd",), "hydra/sweeper=kd_search has nothing to search"),
    ((), ("T=4", "loss.ce_weight=0.5", "loss.distill_weight=choice(0.5)"),
     "hydra/sweeper=kd_search has nothing to search"),
])
def test_a_search_that_cannot_run_is_refused(settings, arguments, message):
    with pytest.raises(KDResearchError) as raised:
        check_search(search_settings(*settings), list(arguments))
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_search_is_checked_before_the_sweeps_parent_run_opens():
    config = compose_config("hydra/sweeper=kd_search", "hydra.sweeper.n_trials=0", hydra=True)
    first = OmegaConf.select(config, f"hydra.callbacks.{next(iter(config.hydra.callbacks))}._target_")
    assert first.endswith("SearchSetup")  # Hydra calls the callbacks in this order
    with pytest.raises(SystemExit, match="^error: hydra.sweeper.n_trials must be an integer >= 1, got 0$"):
        SearchSetup().on_multirun_start(config)
    check_search(search_settings(), ["loss=kd"])  # the preset itself searches


# --- a job: one line, exit 1, nothing started; a multirun: one line per failed job ------------------

def test_a_bad_switch_stops_the_job_before_any_run(store):
    done = train_in_process(store, *FAST, "device.deterministic=maybe")
    assert done.returncode == 1 and "Traceback" not in done.output
    assert "error: device.deterministic must be true or false, got 'maybe'" in done.output
    assert experiment_runs(mlflow_client(store)) == [] and not done.run_dir.exists()


@pytest.mark.slow
def test_config_errors_in_a_multirun_are_one_line_per_job_and_fail_the_sweep(tmp_path):
    """Each failed job says what is wrong in one line where it ran, Hydra's report at the end is
    that line too (no traceback), the sweep exits 1 and its parent run ends FAILED."""
    store = new_store(tmp_path / "store")
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-m", *FAST, "data=synthetic", "loss=kd", "T=0,-1",
               f"tracking.uri={tracking_uri(store)}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = run_command(command, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.output, done.output[-3000:]
    for value in ("0", "-1"):
        assert done.output.count(f"error: T must be > 0, got {value}") == 1, done.output[-3000:]
    assert done.output.rstrip().splitlines()[-3] == "T must be > 0, got 0"  # Hydra's report of the first
    (parent,) = experiment_runs(mlflow_client(store))
    assert parent.data.tags["role"] == "sweep" and parent.info.status == "FAILED"
    assert json.loads((tmp_path / "sweep" / parent_runs.PARENT_FILE).read_text())["run_id"] == parent.info.run_id


def test_a_loss_that_cannot_fit_the_epochs_is_refused_by_the_config_checks():
    # FSP's init stage (30 epochs by default) would fill debug=tiny's one epoch: refused before
    # anything starts, not at the first training step after the teacher trained.
    assert refusal("debug=tiny", "data=synthetic", "loss=fsp") == (
        "loss=fsp: loss.init_epochs=30 leaves none of the 1 epochs to train the classifier; "
        "set epochs above 30 or lower loss.init_epochs")
    check_config(compose_config("debug=tiny", "data=synthetic", "loss=fsp", "loss.init_epochs=0"))
