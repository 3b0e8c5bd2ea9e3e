"""What identifies a run: the one rule, used by teacher reuse, resume checks and compare.py.

A job's *training identity* is the part of its flattened, resolved config that determines the
trained weights: the model, loss, optimizer, scheduler, seed, epochs, batch size, the data's
content (its fingerprint) and preprocessing, the numeric precision, and, for a loss with a teacher,
which teacher and how it was trained. Everything else says where or how the job ran (tracking,
caches, progress bars, device switches other than precision, the data's path) or is already part
of the identity through an interpolation (top-level `T` reaches it as `loss.T`).

A key that cannot change what is trained in a given job enters its identity at its default value
(`inert_values`): `augment_seed` when nothing augments (neither the data, nor, for a loss with a
teacher, the teacher's recipe), `data.val_seed` without a validation split. Such a job is the same
job as one that never set them: it reuses that job's teacher and shares its compare row (and a job
that leaves them at their defaults has the identity it had before this rule).
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from kdresearch.config.flat import flatten

# Top-level config nodes whose keys determine the trained weights.
TRAINING_ROOTS = ("model", "loss", "optimizer", "scheduler", "seed", "augment_seed", "epochs", "batch_size", "data",
                  "teacher")
# Keys under those roots that say where things are, or what is checked, not what is trained.
LOCATION_KEYS = {"data.root", "data.download", "data.verify", "data.num_workers",
                 "teacher.checkpoint", "teacher.run_id", "teacher.accuracy_margin"}
PRECISION_KEY = "device.precision"  # the one device switch that changes the numbers
DATA_FINGERPRINT_KEY = "data.fingerprint"


def is_identity_key(key: str, with_teacher: bool) -> bool:
    """Whether a flattened config key (e.g. `optimizer.lr`) belongs to the training identity;
    the `teacher.*` keys count only for losses that use a teacher."""
    root = key.split(".", 1)[0]
    if key == PRECISION_KEY:
        return True
    if root not in TRAINING_ROOTS or key in LOCATION_KEYS or key.endswith(".name"):
        return False
    return with_teacher or root != "teacher"


def inert_values(flat_config: Mapping[str, object], with_teacher: bool) -> dict:
    """The identity keys this config cannot train with, at their default values (module docstring).
    Values may be typed (a config) or text (MLflow params: 'True', '0')."""
    augments = str(flat_config.get("data.augment")) == "True" or (
        with_teacher and str(flat_config.get("teacher.augment")) == "True")
    inert = {}
    if not augments:
        inert["augment_seed"] = None  # null: the views would follow `seed`; there are no views
    if str(flat_config.get("data.val_size", 0)) == "0":
        inert["data.val_seed"] = 0
    return {key: value for key, value in inert.items() if key in flat_config}


def training_identity(flat_config: Mapping[str, object], data_fingerprint: str, with_teacher: bool) -> dict:
    """The identity keys of a flattened config (inert ones at their defaults), plus the data's
    content fingerprint."""
    identity = {key: value for key, value in flat_config.items() if is_identity_key(key, with_teacher)}
    identity.update(inert_values(flat_config, with_teacher))
    identity[DATA_FINGERPRINT_KEY] = data_fingerprint
    return identity


def identity_hash(identity: Mapping[str, object]) -> str:
    """A short stable hash of an identity (values compared as text, as MLflow stores params)."""
    text = json.dumps({key: str(value) for key, value in identity.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(before: Mapping[str, object], now: Mapping[str, object]) -> list[str]:
    """Keys whose values differ between two identities (sorted)."""
    return sorted(key for key in before.keys() | now.keys() if str(before.get(key)) != str(now.get(key)))


def config_identity(cfg: DictConfig, data_fingerprint: str) -> dict:
    """The training identity of a job's config (the loss class says whether a teacher is used)."""
    with_teacher = get_class(cfg.loss._target_).needs_teacher
    return training_identity(flatten(OmegaConf.to_container(cfg, resolve=True)), data_fingerprint, with_teacher)
