"""Which teacher a student learned from, recorded so a reader can check it: the digest of its
weights, where they came from (an MLflow run; a file and the file's sha256; a bundle, checked
against its SHA256SUMS, and the run it was exported from; torchvision's weights by name), the
accuracy the source claims and the accuracy the teacher measures on this job's test split before
distillation starts.

A teacher that measures more than `teacher.accuracy_margin` points below its claim (a file from
elsewhere evaluated with other preprocessing, the wrong class order, a damaged download) is named
in one warning line with both numbers: a student distilled from it is no evidence about the method.

The measurement is the teacher's one pass over the test split that the job's fidelity metrics
need anyway (kdresearch.training.job: the teacher's reference logits, computed once per job), so it
is not cached separately: a cache would save no pass.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kdresearch.tracking import names

log = logging.getLogger(__name__)

# Where checkpoints state the accuracy they reached, in percent: ours (the last epoch's metrics)
# and the benchmark suites' (RepDistiller: `best_acc` in its best file, `accuracy` in the epoch
# files; mdistiller: `best_acc`).
OUR_CLAIM = "test/acc"
SUITE_CLAIMS = ("best_acc", "accuracy", "acc")


@dataclass
class TeacherSource:
    """Where a teacher's weights came from, and the test accuracy that source claims (None: no claim)."""

    run_id: Optional[str]  # the MLflow run that trained them, when known
    file: Optional[str] = None  # the weights file's absolute path, for a teacher loaded from a file
    file_sha256: Optional[str] = None
    bundle: Optional[str] = None  # the bundle folder (kdresearch.sharing) holding that file, when it is one
    weights: Optional[str] = None  # torchvision's weights name (teacher.weights)
    claimed_acc: Optional[float] = None


def weight_digest(model: nn.Module) -> str:
    """sha256 over the bytes of the model's state_dict tensors, in sorted key order: equal digests,
    equal weights, whatever file or run they were read from."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def claimed_accuracy(checkpoint: dict) -> Optional[float]:
    """The test accuracy (percent) a checkpoint states it reached: ours in its metrics, a suite's
    under SUITE_CLAIMS (a number or a one-element tensor); None when it states none."""
    metrics = checkpoint.get("metrics")
    candidates = [metrics.get(OUR_CLAIM)] if isinstance(metrics, dict) else []
    candidates += [checkpoint.get(key) for key in SUITE_CLAIMS]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def provenance_tags(source: TeacherSource, digest: str, measured_acc: float) -> dict[str, str]:
    """The student run's tags naming its teacher (kdresearch.tracking.names)."""
    tags = {names.TEACHER_DIGEST: digest, names.TEACHER_TEST_ACC: f"{measured_acc:.2f}"}
    for key, value in ((names.TEACHER_RUN_ID, source.run_id), (names.TEACHER_FILE, source.file),
                       (names.TEACHER_FILE_SHA256, source.file_sha256), (names.TEACHER_BUNDLE, source.bundle),
                       (names.TEACHER_WEIGHTS, source.weights),
                       (names.TEACHER_CLAIMED_ACC, source.claimed_acc)):
        if value is not None:
            tags[key] = f"{value:.2f}" if isinstance(value, float) else str(value)
    return tags


def check_claim(source: TeacherSource, measured_acc: float, margin: float) -> None:
    """Warn when the teacher measures more than `margin` points below what its source claims."""
    if source.claimed_acc is None or measured_acc >= source.claimed_acc - margin:
        return
    where = source.file or (f"MLflow run {source.run_id}" if source.run_id else "its source")
    log.warning("teacher: measures %.2f %% test accuracy on this data, but %s claims %.2f %% (more than "
                "teacher.accuracy_margin=%g points below): check its preprocessing, classes and file",
                measured_acc, where, source.claimed_acc, margin)
