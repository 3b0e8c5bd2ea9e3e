"""Trained weights a user names, and loading them into a model: one loader for the teacher
(`teacher.checkpoint`, `teacher.run_id`, a reused run) and for `scripts/evaluate.py`'s SOURCE.

Weights come from
- an MLflow run: its artifact `checkpoints/final.pt` (layout.FINAL_CHECKPOINT);
- a job folder: its `checkpoints/final.pt`, else its newest complete epoch checkpoint (the one
  `resume=` continues from too);
- a bundle (kdresearch.sharing.bundle, what scripts/export.py writes): its `weights.safetensors`,
  read only after every digest in its SHA256SUMS matched;
- a checkpoint file: one of ours, a benchmark suite's (RepDistiller, mdistiller: the weights under
  `model`, `net` or `state_dict`) or a bare state_dict (`checkpoint.model_state`); or a
  `.safetensors` file (checked against its bundle's SHA256SUMS when it lies in one).
Every torch file is read by `checkpoint.load_checkpoint`, with `weights_only=True`; safetensors
files hold tensors and text only, so reading them runs no code either. `load_weights` puts
the weights into a model or says in one line why they do not fit it: another architecture,
another number of classes, missing or unexpected keys and the first shape mismatch, or weights
that are not finite.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdresearch.errors import KDResearchError, first_line
from kdresearch.layout import CHECKPOINT_DIR, EPOCH_CHECKPOINTS, FINAL_CHECKPOINT, JobFolder
from kdresearch.models import model_name
from kdresearch.sharing import bundle
from kdresearch.teacher.provenance import OUR_CLAIM
from kdresearch.training.checkpoint import load_checkpoint, model_state

log = logging.getLogger(__name__)

SHOWN_KEYS = 3  # key names a fit error lists of each kind (missing, unexpected), besides the count
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class CheckpointSource:
    """A checkpoint and where it came from."""

    checkpoint: dict
    description: str  # for messages: "checkpoint <file>", "MLflow run <id>" (or the caller's word for it)
    label: str  # what records name it by: the file's absolute path, or runs:/<id>/checkpoints/final.pt
    run_id: Optional[str]  # the MLflow run that wrote it: the run given, or the one a file of ours records
    bundle: Optional[str] = None  # the bundle folder it was read from (absolute), for a bundle's weights
    sha256: Optional[str] = None  # the file's digest where reading it already computed one (a bundle's)

    @property
    def epoch(self) -> int:
        """The epoch it was saved after (0 when the file does not say)."""
        epoch = self.checkpoint.get("epoch")
        return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


def from_path(path: Path, what: str = "checkpoint") -> CheckpointSource:
    """The checkpoint file `path`, the weights of the bundle `path`, or the checkpoint of the job
    folder `path` (its final checkpoint, else its newest epoch checkpoint that reads). `what` names
    it in messages ("teacher checkpoint")."""
    path = Path(path).expanduser()
    if path.name == bundle.WEIGHTS_FILE and bundle.is_bundle(path.parent):
        path = path.parent  # a bundle's weights file is checked as its bundle is
    if path.is_dir() and bundle.is_bundle(path):
        return from_bundle(path, what)
    if path.is_dir():
        file, checkpoint = _folder_checkpoint(path)
    else:
        file, checkpoint = path, (safetensors_checkpoint(path) if path.suffix == SAFETENSORS_SUFFIX
                                  else load_checkpoint(path))
    recorded = checkpoint.get("run_id")
    return CheckpointSource(checkpoint, f"{what} {file}", str(file.resolve()),
                            recorded if isinstance(recorded, str) else None)


def from_bundle(folder: Path, what: str = "checkpoint") -> CheckpointSource:
    """The weights of a bundle (kdresearch.sharing.bundle) and its config, read only once every file
    its SHA256SUMS lists matches its digest; the run it was exported from is the source's `run_id`."""
    folder = Path(folder).resolve()
    described = f"{what} bundle {folder}"
    listed = bundle.verify_manifest(folder, described)
    file = folder / bundle.WEIGHTS_FILE
    checkpoint = safetensors_checkpoint(file)
    if bundle.CONFIG_FILE in listed:  # the training config, checked too: what evaluate.py builds the model from
        checkpoint["config"] = (folder / bundle.CONFIG_FILE).read_text(encoding="utf-8")
    recorded = checkpoint.get("run_id")
    return CheckpointSource(checkpoint, described, str(file), recorded if isinstance(recorded, str) else None,
                            bundle=str(folder), sha256=listed[bundle.WEIGHTS_FILE])  # equal: just verified


def safetensors_checkpoint(file: Path) -> dict:
    """A safetensors file as a checkpoint dict: its tensors under `model`, and what a bundle's header
    states (bundle.META_KEY: architecture, classes, run, epoch, test accuracy) under the keys our
    checkpoints use, so the fit checks and the teacher's claimed accuracy read it alike."""
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    if not file.is_file():
        raise KDResearchError(f"checkpoint {file} does not exist")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise KDResearchError(f"checkpoint {file} is truncated or corrupt ({first_line(error)})") from None
    checkpoint: dict = {"model": state}
    if bundle.META_KEY in metadata:
        facts = _header_facts(metadata[bundle.META_KEY], file)
        for key, kind in ((bundle.META_MODEL_CLASS, str), (bundle.META_RUN_ID, str),
                          (bundle.META_NUM_CLASSES, int), (bundle.META_EPOCH, int)):
            if isinstance(facts.get(key), kind) and not isinstance(facts[key], bool):
                checkpoint[key] = facts[key]
        claim = facts.get(bundle.META_TEST_ACC)
        if isinstance(claim, (int, float)) and not isinstance(claim, bool):
            checkpoint["metrics"] = {OUR_CLAIM: float(claim)}
    return checkpoint


def _header_facts(text: str, file: Path) -> dict:
    try:
        facts = json.loads(text)
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        raise KDResearchError(f"checkpoint {file}: its header's {bundle.META_KEY} entry is not a JSON object")
    return facts


def _folder_checkpoint(folder: Path) -> tuple[Path, dict]:
    job = JobFolder(folder)
    if job.final_checkpoint.is_file():
        return job.final_checkpoint, load_checkpoint(job.final_checkpoint)
    found = newest_epoch_checkpoint(job)
    if found is None:
        raise KDResearchError(
            f"{folder} holds no {FINAL_CHECKPOINT} and no readable {CHECKPOINT_DIR}/{EPOCH_CHECKPOINTS}")
    return found


def newest_epoch_checkpoint(job: JobFolder) -> Optional[tuple[Path, dict]]:
    """The job folder's newest epoch checkpoint that reads, with its content; None when none does.
    One that does not read is skipped with a warning (they are written atomically: only a failed
    disk damages one)."""
    for path in reversed(job.epoch_checkpoints()):
        try:
            return path, load_checkpoint(path)
        except KDResearchError as error:
            log.warning("skipping %s (%s)", path, error)
    return None


def from_run(tracker, run_id: str, what: str = "MLflow run") -> CheckpointSource:
    """The final checkpoint of the MLflow run `run_id`, downloaded into a temporary folder that is
    deleted once it is read. `what` names the run in messages ("teacher run")."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="kdresearch-checkpoint-") as folder:
        try:
            path = tracker.download_artifact(run_id, FINAL_CHECKPOINT, Path(folder))
        except (MlflowException, OSError) as error:
            raise KDResearchError(
                f"{what} {run_id} has no final checkpoint {FINAL_CHECKPOINT} in {tracker.uri} "
                f"({first_line(error)}){_unfinished_hint(tracker, run_id)}"
            ) from None
        checkpoint = load_checkpoint(path)
    return CheckpointSource(checkpoint, f"{what} {run_id}", f"runs:/{run_id}/{FINAL_CHECKPOINT}", run_id)


def _unfinished_hint(tracker, run_id: str) -> str:
    """Where the epoch checkpoints of a run without a final one are, when the store knows the run."""
    from mlflow.exceptions import MlflowException

    from kdresearch.tracking import names

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        return ""
    folder = run.data.tags.get(names.OUTPUT_DIR)
    where = f"; its job folder {folder} may hold epoch checkpoints to use instead" if folder else ""
    return f"; the run is {run.info.status}{where}"


# --- into a model -----------------------------------------------------------------------------------

def trained_classes(checkpoint: dict, model: Optional[nn.Module] = None) -> Optional[int]:
    """How many classes the checkpoint's model was trained for: its `num_classes`, else (given the
    model it is for) the rows of that model's last linear layer in the weights; None if unknown."""
    found = checkpoint.get("num_classes")
    if isinstance(found, int) and not isinstance(found, bool):
        return found
    if model is None:
        return None
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    weight = model_state(checkpoint).get(f"{linears[-1]}.weight") if linears else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def check_classes(found: Optional[int], num_classes: int, source: str) -> None:
    if found is not None and found != num_classes:
        raise KDResearchError(
            f"{source} was trained for {found} classes but the data has {num_classes} "
            f"(data.num_classes={num_classes})")


def load_weights(model: nn.Module, checkpoint: dict, source: str, model_key: str,
                 role: str = "the model") -> None:
    """Load the checkpoint's weights into `model`, or refuse in one line. `source` names the
    checkpoint, `model_key` what chose the model as the user writes it (`teacher.model`,
    `model=resnet8x4`), `role` the model in a sentence ("the teacher model")."""
    expected = model_name(model)
    found = checkpoint.get("model_class")
    if isinstance(found, str) and found != expected:
        raise KDResearchError(f"{source} holds a {found}, but {role} is a {expected} ({model_key})")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        check_classes(trained_classes(checkpoint, model), num_classes, source)
    state = model_state(checkpoint)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        # torch's message spreads the keys over many lines after a header: one line says it all
        raise KDResearchError(f"{source} does not fit a {expected} ({model_key}): "
                              f"{fit_report(model, state) or _first_detail(error)}") from None
    check_finite(state, source)


def fit_report(model: nn.Module, state: dict) -> str:
    """How `state` differs from the model's own state_dict: missing and unexpected keys (counted,
    the first few named) and the first shape mismatch; "" when keys and shapes agree."""
    if not state:
        return "it holds no weights"
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    parts = [f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''} ({_some(keys)})"
             for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    for key, tensor in own.items():
        value = state.get(key)
        if key not in state or (isinstance(value, torch.Tensor) and value.shape == tensor.shape):
            continue
        held = tuple(value.shape) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        parts.append(f"first shape mismatch {key}: checkpoint {held}, model {tuple(tensor.shape)}")
        break
    return ", ".join(parts)


def _some(keys: list) -> str:
    return ", ".join(map(str, keys[:SHOWN_KEYS])) + (", ..." if len(keys) > SHOWN_KEYS else "")


def _first_detail(error: BaseException) -> str:
    """torch's first line after its "Error(s) in loading state_dict for X:" header."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else first_line(error)


def check_finite(state: dict, source: str) -> None:
    """Refuse NaN or inf weights: the job that wrote them diverged, and every output is garbage."""
    bad = [key for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise KDResearchError(f"{source} holds weights that are not finite (NaN or inf in {len(bad)} "
                              f"tensor{'s' if len(bad) != 1 else ''}: {_some(bad)})")
