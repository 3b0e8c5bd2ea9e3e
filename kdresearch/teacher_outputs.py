"""What the loss needs from the teacher, per batch: computed online, or looked up in a cache.

The teacher is frozen and in eval mode, so without random augmentation its outputs for a given
training image never change. `CachedTeacher` computes the fields the loss reads (logits, hidden
vector, feature map) once over the training set and keeps them on disk, keyed by content hashes of
(teacher weights, data and normalisation, precision, memory format, torch version), so every
later epoch, run and sweep job of the same teacher skips the teacher's forward pass (about 96 % of
a KD step's FLOPs). Files live in `cache.dir` (default `.cache/teacher_outputs` in the project
folder), the folder is kept under `cache.max_gb` by deleting the least recently used entries, and
`python scripts/teacher_cache.py --clear` empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdresearch import devices, interrupts
from kdresearch.checkpoint import load_checkpoint, save_checkpoint
from kdresearch.data import Dataset
from kdresearch.errors import KDResearchError
from kdresearch.models import ModelOutputs, assemble_outputs, select_fields
from kdresearch.tracking import PROJECT_ROOT, FileLock

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "teacher_outputs"


class OnlineTeacher:
    """Runs the teacher on every batch (needed when inputs are randomly augmented)."""

    used_cache = False

    def __init__(self, teacher: nn.Module, device: torch.device, precision: str):
        self.teacher = teacher
        self.device, self.precision = device, precision

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ModelOutputs:
        with devices.autocast(self.device, self.precision):
            return self.teacher(images, with_features=True)


class CachedTeacher:
    """Teacher outputs for every training image, looked up by the batch's sample indices."""

    used_cache = True

    def __init__(self, outputs: dict[str, torch.Tensor], device: torch.device, num_stages: int):
        self.outputs = outputs
        self.device = device
        self.num_stages = num_stages

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ModelOutputs:
        return assemble_outputs({
            field: values[index].to(self.device, non_blocking=True) for field, values in self.outputs.items()
        }, self.num_stages)


def cache_entry_bytes(teacher: nn.Module, fields: tuple[str, ...], train_size: int, precision: str) -> int:
    """Size of the cached outputs, from the teacher's shape facts (known before computing them)."""
    per_sample = 0
    for field in fields:
        if field.startswith("stage"):
            index = int(field[len("stage"):])
            per_sample += teacher.stage_channels[index] * teacher.stage_sizes[index] ** 2
        else:
            per_sample += {"logits": teacher.num_classes, "embedding": teacher.embedding_dim,
                           "hidden": teacher.hidden_dim}[field]
    return per_sample * train_size * (2 if precision == "bf16" else 4)


def cache_key(teacher: nn.Module, data: Dataset, precision: str, channels_last: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{data.fingerprint()}|{precision}|{channels_last}|{torch.__version__}".encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def _compute(teacher: nn.Module, fields: tuple[str, ...], data: Dataset, device: torch.device,
             precision: str, channels_last: bool) -> dict[str, torch.Tensor]:
    batches = data.batches("train", 256, device, channels_last=channels_last)
    parts: dict[str, list[torch.Tensor]] = {field: [] for field in fields}
    for images, _, _ in batches:
        interrupts.check()
        with devices.autocast(device, precision):
            out = teacher(images, with_features=True)
        for field, value in select_fields(out, fields).items():
            # Stored as computed (bf16 stays bf16), contiguous NCHW for compact, fast indexing.
            parts[field].append(value.contiguous().cpu())
    return {field: torch.cat(values) for field, values in parts.items()}


def _remove_stale_temp_files(folder: Path, older_than_s: float = 3600) -> None:
    """Temp files of writes killed midway (SIGKILL) are never renamed into place: delete them."""
    now = time.time()
    for temp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > older_than_s:
                temp.unlink()


def _enforce_size_limit(folder: Path, max_bytes: float) -> None:
    _remove_stale_temp_files(folder)
    entries = sorted(folder.glob("*.pt"), key=lambda path: path.stat().st_mtime)
    total = sum(path.stat().st_size for path in entries)
    for path in entries[:-1]:  # never the entry just written
        if total <= max_bytes:
            break
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        log.info("teacher cache: removed least recently used %s (cache.max_gb)", path.name)


def teacher_outputs(teacher: nn.Module, fields: tuple[str, ...], data: Dataset, device: torch.device,
                    precision: str, channels_last: bool, augment: bool, cache_cfg):
    """An `OnlineTeacher` or a `CachedTeacher` (built or read from disk) for this job."""
    reason = None
    if augment:
        reason = "data.augment is on"
    elif not cache_cfg.enabled:
        reason = "cache.enabled=false"
    else:
        size_gb = cache_entry_bytes(teacher, fields, data.train_size, precision) / 1e9
        if size_gb > cache_cfg.max_gb:
            reason = f"the outputs would take {size_gb:.1f} GB, over cache.max_gb={cache_cfg.max_gb:g}"
    if reason:
        log.info("teacher outputs: computed online (%s)", reason)
        return OnlineTeacher(teacher, device, precision)
    folder = Path(cache_cfg.dir).expanduser() if cache_cfg.dir else DEFAULT_CACHE_DIR
    key = cache_key(teacher, data, precision, channels_last)
    path = folder / f"{key}-{'-'.join(fields)}.pt"
    with FileLock(folder / ".locks" / f"{path.name}.lock"):  # parallel jobs build it once
        outputs = None
        if path.is_file():
            try:
                outputs = load_checkpoint(path)
                os.utime(path)  # mark as recently used
                log.info("teacher outputs: cached, read from %s", path)
            except KDResearchError as error:
                log.warning("teacher cache: ignoring unreadable %s (%s); rebuilding", path, error)
        if outputs is None:
            outputs = _compute(teacher, fields, data, device, precision, channels_last)
            size_gb = sum(t.numel() * t.element_size() for t in outputs.values()) / 1e9
            try:
                save_checkpoint(outputs, path)
                _enforce_size_limit(folder, cache_cfg.max_gb * 1e9)
                log.info("teacher outputs: cached, built and saved to %s (%.2f GB)", path, size_gb)
            except KDResearchError as error:  # a full disk costs speed, never the run
                log.warning("teacher cache: could not save (%s); using it in memory only", error)
    return CachedTeacher(outputs, device, len(teacher.stage_channels))


def clear_cache(folder: Optional[Path] = None) -> int:
    """Delete every cached entry; returns the number of bytes freed."""
    folder = folder or DEFAULT_CACHE_DIR
    freed = 0
    for path in [*folder.glob("*.pt"), *folder.glob(".*.tmp")]:
        freed += path.stat().st_size
        path.unlink(missing_ok=True)
    return freed
