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
import tempfile
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.config.identity import config_identity, identity_hash
from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR, FINAL_CHECKPOINT
from kdresearch.models import model_name
from kdresearch.training.checkpoint import load_checkpoint, model_state

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


def load_weights(model: nn.Module, checkpoint: dict, source: str) -> None:
    """Load a checkpoint into `model`, refusing one made for another architecture with one line."""
    expected = model_name(model)
    found = checkpoint.get("model_class")
    if found is not None and found != expected:
        raise KDResearchError(f"{source} holds a {found}, but the teacher model is a {expected} (teacher.model)")
    state = model_state(checkpoint)
    classifier = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    found_classes = getattr(state.get(f"{classifier}.weight"), "shape", (None,))[0]
    if found_classes is not None and found_classes != model.num_classes:
        raise KDResearchError(
            f"{source} was trained for {found_classes} classes but the data has {model.num_classes} "
            f"(data.num_classes); use a teacher trained on this dataset"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise KDResearchError(f"{source} does not fit a {expected}: {first_line}") from None


def obtain_teacher(cfg: DictConfig, teacher: nn.Module, data_fingerprint: str, tracker,
                   work_dir: Path, train: Callable[[DictConfig, Path], str],
                   pinned_run_id: Optional[str] = None) -> Optional[str]:
    """Fill `teacher` with trained weights; return the MLflow run id they came from (None if unknown).

    `train(job_cfg, output_dir)` trains a teacher as its own run and returns that run's id.
    `pinned_run_id` (a resumed job's teacher) takes precedence over the automatic search, so a
    continuation never switches to a newer teacher.
    """
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint).expanduser()
        checkpoint = load_checkpoint(path)
        load_weights(teacher, checkpoint, f"teacher checkpoint {path}")
        run_id = checkpoint.get("run_id")
        log.info("teacher: loaded from checkpoint %s%s", path, f" (run {run_id})" if run_id else "")
        return run_id

    if cfg.teacher.run_id or pinned_run_id:
        run_id = str(cfg.teacher.run_id or pinned_run_id)
        load_weights(teacher, _run_checkpoint(tracker, run_id, work_dir), f"teacher run {run_id}")
        log.info("teacher: loaded from MLflow run %s", run_id)
        return run_id

    job = teacher_job_config(cfg)
    wanted = training_config_hash(job, data_fingerprint)
    with tracker.lock(f"teacher-{wanted}.lock"):
        found = tracker.find_runs(
            f"tags.config_hash = '{wanted}' and attributes.status = 'FINISHED'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            log.info("teacher: reusing MLflow run %s (%s), the newest finished run with this training config",
                     run_id, found[0].info.run_name)
        else:
            log.info("teacher: no finished run with this training config (%s); training one first", wanted)
            run_id = train(job, work_dir / "teacher")
    load_weights(teacher, _run_checkpoint(tracker, run_id, work_dir), f"teacher run {run_id}")
    return run_id


def _run_checkpoint(tracker, run_id: str, work_dir: Path) -> dict:
    """Download a run's final checkpoint into a temporary folder and load it (the copy is deleted)."""
    from mlflow.exceptions import MlflowException

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="teacher-", dir=work_dir) as folder:
        try:
            path = tracker.download_artifact(run_id, FINAL_CHECKPOINT, Path(folder))
        except (MlflowException, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise KDResearchError(
                f"teacher run {run_id} has no usable final checkpoint in {tracker.uri} ({first_line})"
            ) from None
        return load_checkpoint(path)
