"""Where a distillation run's teacher comes from: a file, an MLflow run, or a matching earlier run.

The automatic choice looks for the newest finished run whose *training identity*
(`kdresearch.identity`) equals the teacher job this student would need: the teacher model with
cross-entropy, trained with the teacher's own recipe (`teacher.optimizer`, `.scheduler`,
`.epochs`, `.batch_size`, `.augment`) on the student's data, seed and precision. A teacher trained
with `python train.py model=deep` (the tutorial recipe) therefore serves every later student of
the tutorial setup, whatever the student's own optimizer, schedule or epochs; when none exists,
one is trained first as its own MLflow run. A file lock makes parallel students of one sweep
train it once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.config.identity import config_identity, identity_hash
from kdresearch.digests import file_digest
from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR
from kdresearch.models import model_name
from kdresearch.teacher.provenance import TeacherSource, claimed_accuracy
from kdresearch.tracking.names import CONFIG_HASH, tag_equals
from kdresearch.training.weights import CheckpointSource, from_path, from_run, load_weights

log = logging.getLogger(__name__)



def training_config_hash(cfg: DictConfig, data_fingerprint: str) -> str:
    """The hash of a job's training identity (kdresearch.identity); equal hashes mean reusable runs."""
    return identity_hash(config_identity(cfg, data_fingerprint))


def teacher_job_config(cfg: DictConfig) -> DictConfig:
    """The job that trains this student's teacher: the teacher model with cross-entropy and the
    teacher's own recipe (`teacher.optimizer`, `.scheduler`, `.epochs`, `.batch_size`, `.augment`);
    seed, data and device settings are the student's."""
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    recipe = job.teacher
    job.model = recipe.model
    job.loss = OmegaConf.load(CONF_DIR / "loss" / "ce.yaml")
    job.optimizer = recipe.optimizer
    job.scheduler = recipe.scheduler
    job.epochs = recipe.epochs
    job.batch_size = recipe.batch_size
    job.data.augment = recipe.augment
    job.teacher.checkpoint = None
    job.teacher.run_id = None
    return job


def load_teacher_weights(teacher: nn.Module, source: CheckpointSource) -> TeacherSource:
    """Load the weights into `teacher`; returns where they came from and what accuracy they claim."""
    load_weights(teacher, source.checkpoint, source.description, "teacher.model", role="the teacher model")
    return TeacherSource(source.run_id, claimed_acc=claimed_accuracy(source.checkpoint))


def named_file(cfg: DictConfig, teacher: nn.Module) -> Optional[Path]:
    """The weights file the config names: `teacher.checkpoint`, or torchvision's weights file that
    `teacher.weights` names (the torchvision teachers' key, e.g. IMAGENET1K_V1); None for neither."""
    weights = cfg.teacher.get("weights")
    if cfg.teacher.checkpoint and weights:
        raise KDResearchError("teacher.checkpoint and teacher.weights both name the teacher's weights: set one")
    if cfg.teacher.checkpoint:
        return Path(cfg.teacher.checkpoint)
    if weights:
        from kdresearch.architectures.imagenet import torchvision_weights_file  # imports torchvision: seconds

        return torchvision_weights_file(model_name(teacher), str(weights))
    return None


def obtain_teacher(cfg: DictConfig, teacher: nn.Module, data_fingerprint: str, tracker,
                   train: Callable[[DictConfig], str], pinned_run_id: Optional[str] = None) -> TeacherSource:
    """Fill `teacher` with trained weights; return where they came from (its `run_id`: the MLflow
    run, None if unknown).

    `train(job_cfg)` trains a teacher as its own run (kdresearch.teacher.provider: in the student's
    job folder) and returns that run's id.
    `pinned_run_id` (a resumed job's teacher) takes precedence over the automatic search, so a
    continuation never switches to a newer teacher.
    """
    file = named_file(cfg, teacher)
    if file is not None:
        source = from_path(file, "teacher checkpoint")
        found = load_teacher_weights(teacher, source)
        log.info("teacher: loaded from %s%s", source.description, f" (run {source.run_id})" if source.run_id else "")
        found.file = source.label  # the file read, also when `file` names a job folder
        found.file_sha256 = source.sha256 or file_digest(Path(source.label))  # a bundle's is already checked
        found.bundle = source.bundle  # a bundle's weights file: its folder, checked against SHA256SUMS
        found.weights = str(cfg.teacher.weights) if cfg.teacher.get("weights") else None
        return found

    if cfg.teacher.run_id or pinned_run_id:
        run_id = str(cfg.teacher.run_id or pinned_run_id)
        found = load_teacher_weights(teacher, from_run(tracker, run_id, "teacher run"))
        log.info("teacher: loaded from MLflow run %s", run_id)
        return found

    job = teacher_job_config(cfg)
    wanted = training_config_hash(job, data_fingerprint)
    with tracker.lock(f"teacher-{wanted}.lock"):
        found = tracker.find_runs(f"{tag_equals(CONFIG_HASH, wanted)} and attributes.status = 'FINISHED'",
                                  max_results=1)
        if found:
            run_id = found[0].info.run_id
            log.info("teacher: reusing MLflow run %s (%s), the newest finished run with this training config",
                     run_id, found[0].info.run_name)
        else:
            log.info("teacher: no finished run with this training config (%s); training one first", wanted)
            run_id = train(job)
    return load_teacher_weights(teacher, from_run(tracker, run_id, "teacher run"))
