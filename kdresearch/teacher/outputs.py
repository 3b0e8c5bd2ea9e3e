"""What the loss needs from the teacher, per batch: computed online, or looked up in a cache.

The teacher is frozen and in eval mode, so without random augmentation its outputs for a given
training image never change. `CachedTeacher` computes the fields the loss reads (logits, hidden
vector, feature map) once over the training set and keeps them on disk, keyed by content hashes of
(teacher weights, data and normalisation, precision, memory format, torch version), so every
later epoch, run and sweep job of the same teacher skips the teacher's forward pass (about 96 % of
a KD step's FLOPs). Files live in `cache.dir` (default `.cache/teacher_outputs` in the project
folder), the folder is kept under `cache.max_gb` by deleting the least recently used entries, and
`python scripts/teacher_cache.py --clear` empties it.

Guarantees, for jobs on one machine or on a shared file system with working file locks:

* Built once. Jobs that need the same entry (a parallel sweep, several launches at once) take
  one lock per entry (`kdresearch.runtime.locks`, released by the OS when its holder exits or
  is killed); the first builds and saves it, the others wait and then read it. A waiting job never gives up:
  it logs once that it waits and stays interruptible (Ctrl-C, SIGTERM).
* Never partial. An entry is written to a temp file, fsynced and renamed into place (see
  `save_checkpoint`), so a reader sees the whole previous state or the whole new one; temp files
  of writers killed midway are deleted later.
* Checked on every read. Each entry stores a CRC-32 per tensor (over its bytes, dtype and shape);
  on load the checksums and the shapes the current teacher and data imply (rows = training
  images, width = classes, embedding, hidden or stage size) are checked. A truncated, corrupt,
  wrong-shaped or older-format entry is reported in one WARNING line naming the file and the
  fault, deleted and rebuilt, so it never fails the job, neither this one nor later ones.
* A full disk (or an unwritable cache folder) never fails the job: it logs one WARNING line,
  leaves no partial file and runs the teacher online (`OnlineTeacher`, tag `teacher_cache=online`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdresearch.data.splits import Dataset
from kdresearch.data.views import CACHE_TAGS, WEAK
from kdresearch.errors import KDResearchError
from kdresearch.layout import PROJECT_ROOT
from kdresearch.models import ModelOutputs, assemble_outputs, field_stage_index, select_fields
from kdresearch.runtime import devices, interrupts
from kdresearch.runtime.locks import InterruptibleLock
from kdresearch.training.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "teacher_outputs"

# Layout of an entry: {"format": ENTRY_FORMAT, "outputs": {field: tensor}, "checksums": {field: int},
# "checksum": "crc32"}. Format 1 (no version, a bare {field: tensor}) had no checksums.
ENTRY_FORMAT = 2


@dataclass
class TeacherCounts:
    """Images the teacher ran forward on and images whose outputs were read from a cache instead,
    for the job's budget (kdresearch.training.budget). Counted from batch shapes, which the host
    knows: counting never waits for the device."""

    forwards: int = 0
    cache_hits: int = 0


class OnlineTeacher:
    """Runs the teacher on every batch."""

    used_cache = False

    def start_epoch(self, epoch: int) -> None:
        pass

    def __init__(self, teacher: nn.Module, device: torch.device, precision: str,
                 counts: Optional[TeacherCounts] = None):
        self.teacher = teacher
        self.device, self.precision = device, precision
        self.counts = counts or TeacherCounts()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ModelOutputs:
        self.counts.forwards += images.shape[0]
        with devices.autocast(self.device, self.precision):
            return self.teacher(images, with_features=True)


class CachedTeacher:
    """Teacher outputs for every training image, looked up by the batch's sample indices."""

    used_cache = True

    def __init__(self, outputs: dict[str, torch.Tensor], device: torch.device, num_stages: int,
                 counts: Optional[TeacherCounts] = None):
        self.outputs = outputs
        self.device = device
        self.num_stages = num_stages
        self.counts = counts or TeacherCounts()  # the entry's build, when this job built it, counted in

    def start_epoch(self, epoch: int) -> None:
        pass  # the same outputs in every epoch: the inputs are not augmented

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ModelOutputs:
        self.counts.cache_hits += index.numel()
        return assemble_outputs({
            field: values[index].to(self.device, non_blocking=True) for field, values in self.outputs.items()
        }, self.num_stages)


def sample_shapes(teacher: nn.Module, fields: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shape of one sample's value of each field, from the teacher's shape facts (for its `image_size`)."""
    shapes = {}
    for field in fields:
        index = field_stage_index(field)  # a stage before or after its final ReLU: the same shape
        if index is not None:
            size = teacher.stage_sizes[index]
            shapes[field] = (teacher.stage_channels[index], size, size)
        else:
            shapes[field] = ({"logits": teacher.num_classes, "embedding": teacher.embedding_dim,
                              "hidden": teacher.hidden_dim}[field],)
    return shapes


def entry_shapes(teacher: nn.Module, fields: tuple[str, ...], rows: int) -> dict[str, tuple[int, ...]]:
    """The shape of each field's tensor in a cache entry of `rows` training samples."""
    return {field: (rows, *shape) for field, shape in sample_shapes(teacher, fields).items()}


def cache_entry_bytes(teacher: nn.Module, fields: tuple[str, ...], train_size: int, precision: str) -> int:
    """Size of the cached outputs, from the teacher's shape facts (known before computing them)."""
    per_sample = sum(math.prod(shape) for shape in sample_shapes(teacher, fields).values())
    return per_sample * train_size * (2 if precision == "bf16" else 4)


def cache_key(teacher: nn.Module, data: Dataset, precision: str, channels_last: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{data.fingerprint()}|{precision}|{channels_last}|{torch.__version__}".encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def _compute(teacher: nn.Module, fields: tuple[str, ...], batches, device: torch.device,
             precision: str, counts: TeacherCounts) -> dict[str, torch.Tensor]:
    """The teacher's `fields` for every training sample, in stored order (`batches` unshuffled)."""
    parts: dict[str, list[torch.Tensor]] = {field: [] for field in fields}
    for images, _, _ in batches:
        interrupts.check()
        counts.forwards += images.shape[0]
        with devices.autocast(device, precision):
            out = teacher(images, with_features=True)
        for field, value in select_fields(out, fields).items():
            # Stored as computed (bf16 stays bf16), contiguous NCHW for compact, fast indexing.
            parts[field].append(value.contiguous().cpu())
    return {field: torch.cat(values) for field, values in parts.items()}


# --- entries on disk: checksummed, checked against the current teacher and data ----------------

def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes: against accidental damage, not tampering. zlib's
    CRC-32 is the cheapest of the checks measured, on 50,000 x 256 float32 logits (51 MB) 12-20 ms
    against 40-50 ms for sha256 and 70-80 ms for blake2b; loading such an entry takes about 50 ms."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(raw, zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode()))


def _save_entry(outputs: dict[str, torch.Tensor], path: Path) -> None:
    save_checkpoint({
        "format": ENTRY_FORMAT, "checksum": "crc32", "outputs": outputs,
        "checksums": {field: tensor_checksum(values) for field, values in outputs.items()},
    }, path)


def _entry_fault(entry: dict, expected: dict[str, tuple[int, ...]]) -> Optional[str]:
    """What is wrong with a loaded entry (phrased to follow its file name), or None if it is usable."""
    if entry.get("format") != ENTRY_FORMAT:
        if entry and all(isinstance(value, torch.Tensor) for value in entry.values()):
            return "has the older format without checksums"
        return f"has an unknown format ({entry.get('format')!r})"
    outputs, checksums = entry.get("outputs"), entry.get("checksums")
    if not isinstance(outputs, dict) or not isinstance(checksums, dict):
        return "lacks its outputs or checksums"
    if sorted(outputs) != sorted(expected):
        return f"holds fields {sorted(outputs)}, expected {sorted(expected)}"
    for field, shape in expected.items():
        values = outputs[field]
        if not isinstance(values, torch.Tensor):
            return f"holds a {type(values).__name__} as {field}, not a tensor"
        if not values.is_floating_point():
            return f"holds {field} as {values.dtype}, expected floats"
        if tuple(values.shape) != shape:
            return f"has {field} of shape {tuple(values.shape)}, expected {shape} for this teacher and data"
        if checksums.get(field) != tensor_checksum(values):
            return f"fails its checksum ({field}: corrupt)"
    return None


def _read_entry(path: Path, expected: dict[str, tuple[int, ...]]) -> Optional[dict[str, torch.Tensor]]:
    """The entry's outputs if it is whole and fits `expected`; otherwise it is deleted (call with its
    lock held) and None returned, for the caller to rebuild it."""
    try:
        entry = load_checkpoint(path)
        fault = _entry_fault(entry, expected)
    except KDResearchError as error:
        if not path.exists():  # removed meanwhile (cache.max_gb clean-up of another job, --clear)
            log.info("teacher cache: %s was removed meanwhile; rebuilding", path)
            return None
        message = str(error)
        fault = message[len(f"checkpoint {path} "):] if message.startswith(f"checkpoint {path} ") \
            else f"is unreadable ({message})"
    if fault is None:
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return entry["outputs"]
    with contextlib.suppress(OSError):  # if it cannot be deleted, the rebuilt entry replaces it
        path.unlink(missing_ok=True)
    log.warning("teacher cache: %s %s; deleted, rebuilding it", path, fault.replace("\n", " "))
    return None


def _remove_stale_temp_files(folder: Path, older_than_s: float = 3600) -> None:
    """Temp files of writes killed midway (SIGKILL) are never renamed into place: delete them."""
    now = time.time()
    for temp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > older_than_s:
                temp.unlink()


def cache_entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(modification time, bytes, path) of every entry in `folder`, least recently used first."""
    entries = []
    for path in folder.glob("*.pt"):
        with contextlib.suppress(OSError):  # deleted meanwhile by another job
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    return sorted(entries)


def _enforce_size_limit(folder: Path, max_bytes: float) -> None:
    _remove_stale_temp_files(folder)
    entries = cache_entries(folder)
    total = sum(size for _, size, _ in entries)
    for _, size, path in entries[:-1]:  # never the entry just written
        if total <= max_bytes:
            break
        total -= size
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
            log.info("teacher cache: removed least recently used %s (cache.max_gb)", path.name)


def _cached(path: Path, expected: dict[str, tuple[int, ...]], compute, max_gb: float) -> Optional[dict]:
    """The entry at `path`: read when whole and fitting `expected`, else built with `compute()` and
    saved (parallel jobs build it once, under its lock). None when the cache cannot be used (a
    read-only or full file system): the caller runs the teacher online."""
    folder = path.parent
    # No time limit: the holder is building this very entry, a teacher pass that can take hours on
    # a large data set, and giving up would mean computing it a second time (what the lock is for)
    # or running the teacher online for the whole run. The wait ends with the build either way.
    lock_path = folder / ".locks" / f"{path.name}.lock"
    lock = InterruptibleLock(lock_path, timeout=None, on_wait=lambda: log.info(
        "teacher cache: waiting for another job that is building %s", lock_path.stem))
    try:
        lock.acquire()  # parallel jobs build it once
    except OSError as error:  # a read-only or full file system, no permission
        log.warning("teacher cache: cannot use %s (%s); running the teacher online", folder, error)
        return None
    try:
        outputs = _read_entry(path, expected) if path.is_file() else None
        if outputs is not None:
            log.info("teacher outputs: cached, read from %s", path)
            return outputs
        outputs = compute()
        size_gb = sum(t.numel() * t.element_size() for t in outputs.values()) / 1e9
        try:
            _save_entry(outputs, path)  # leaves no partial file when it fails
        except KDResearchError as error:
            # A full disk costs speed, never the run. The outputs just computed are dropped: the
            # job runs as one without a cache (tag teacher_cache=online) instead of holding up to
            # cache.max_gb of them in host memory for the whole run.
            log.warning("teacher cache: %s; running the teacher online", str(error).replace("\n", " "))
            return None
        _enforce_size_limit(folder, max_gb * 1e9)
        log.info("teacher outputs: cached, built and saved to %s (%.2f GB)", path, size_gb)
        return outputs
    finally:
        lock.release()


class ViewsTeacher:
    """Teacher outputs for the augmented views of each epoch (kdresearch.data.view_parameters),
    computed once per (teacher, data, augmentation seed, epoch) and shared by every job that sees
    the same views: the jobs of a sweep over anything but the augmentation seed. At the start of
    each epoch the epoch's entry is read, or built with one teacher pass over that epoch's views."""

    used_cache = True

    def __init__(self, teacher: nn.Module, fields: tuple[str, ...], data: Dataset, device: torch.device,
                 precision: str, channels_last: bool, augment_seed: int, path_of_epoch, max_gb: float,
                 view: str = WEAK):
        self.teacher, self.fields, self.data, self.view = teacher, fields, data, view
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.augment_seed, self.path_of_epoch, self.max_gb = augment_seed, path_of_epoch, max_gb
        self.expected = entry_shapes(teacher, fields, data.train_size)
        self.current: Optional[CachedTeacher | OnlineTeacher] = None
        self.counts = TeacherCounts()  # every epoch's, shared with the epoch's CachedTeacher or OnlineTeacher

    def start_epoch(self, epoch: int) -> None:
        batches = self.data.batches("train", 256, self.device, channels_last=self.channels_last, augment=True,
                                    augment_seed=self.augment_seed)
        batches.set_epoch(epoch)
        if self.view != WEAK:  # another view of each image (kdresearch.data.views) than the data's own
            batches.request_views((self.view,))
            batches = ((images[self.view], labels, index) for images, labels, index in batches)  # made when read
        outputs = _cached(self.path_of_epoch(epoch), self.expected,
                          lambda: _compute(self.teacher, self.fields, batches, self.device, self.precision,
                                           self.counts),
                          self.max_gb)
        if outputs is None:
            self.used_cache = False
            self.current = OnlineTeacher(self.teacher, self.device, self.precision, self.counts)
        else:
            self.current = CachedTeacher(outputs, self.device, len(self.teacher.stage_channels), self.counts)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ModelOutputs:
        return self.current(images, index)


class PerViewTeacher:
    """The teacher's outputs on each of several views of a batch (kdresearch.data.views): one
    online, cached or per-epoch provider per view, their counts added up."""

    def __init__(self, providers: dict):
        self.providers = providers
        self.counts = TeacherCounts()
        for provider in providers.values():  # fresh, before any epoch: a ViewsTeacher hands its counts on then
            provider.counts = self.counts

    @property
    def used_cache(self) -> bool:
        return all(provider.used_cache for provider in self.providers.values())

    def start_epoch(self, epoch: int) -> None:
        for provider in self.providers.values():
            provider.start_epoch(epoch)

    def __call__(self, images: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, ModelOutputs]:
        return {view: self.providers[view](images[view], index) for view in self.providers}


def teacher_outputs(teacher: nn.Module, fields: tuple[str, ...], data: Dataset, device: torch.device,
                    precision: str, channels_last: bool, augment: bool, cache_cfg, augment_seed: int = 0,
                    epochs: int = 1, views: tuple[str, ...] = ()):
    """What the loss reads from the teacher for this job: an `OnlineTeacher`, a `CachedTeacher`
    (built or read from disk) or, with augmentation, a `ViewsTeacher` (one entry per epoch); for a
    loss reading several `views` (augmented data only: `check_views`), a `PerViewTeacher` of one
    such per view, all decided once."""
    size_gb = cache_entry_bytes(teacher, fields, data.train_size, precision) / 1e9
    reason = None
    if not cache_cfg.enabled:
        reason = "cache.enabled=false"
    elif size_gb > cache_cfg.max_gb:
        reason = f"the outputs would take {size_gb:.1f} GB{' per epoch' if augment else ''}, " \
                 f"over cache.max_gb={cache_cfg.max_gb:g}"
    if reason:
        log.info("teacher outputs: computed online (%s)", reason)
        if views:
            return PerViewTeacher({view: OnlineTeacher(teacher, device, precision) for view in views})
        return OnlineTeacher(teacher, device, precision)
    folder = Path(cache_cfg.dir).expanduser() if cache_cfg.dir else DEFAULT_CACHE_DIR
    key = cache_key(teacher, data, precision, channels_last)
    if augment:
        shared_by = len(views) or 1  # the views of one epoch take the cache together
        _note_epochs_over_limit(size_gb * shared_by, epochs, shared_by, cache_cfg.max_gb)
        log.info("teacher outputs: computed once per epoch of augmented views (augmentation seed %d) and shared",
                 augment_seed)

        def of_view(view: str) -> ViewsTeacher:
            tag = CACHE_TAGS[view]  # "" for the weak view: its entries are every augmented job's
            return ViewsTeacher(teacher, fields, data, device, precision, channels_last, augment_seed,
                                lambda epoch: folder / f"{key}-views{augment_seed}{tag}-epoch{epoch}-{'-'.join(fields)}.pt",
                                cache_cfg.max_gb, view)

        return PerViewTeacher({view: of_view(view) for view in views}) if views else of_view(WEAK)
    path = folder / f"{key}-{'-'.join(fields)}.pt"
    expected = entry_shapes(teacher, fields, data.train_size)
    batches = data.batches("train", 256, device, channels_last=channels_last)
    counts = TeacherCounts()
    outputs = _cached(path, expected, lambda: _compute(teacher, fields, batches, device, precision, counts),
                      cache_cfg.max_gb)
    if outputs is None:
        return OnlineTeacher(teacher, device, precision, counts)
    return CachedTeacher(outputs, device, len(teacher.stage_channels), counts)


def _note_epochs_over_limit(epoch_gb: float, epochs: int, views: int, max_gb: float) -> None:
    """Say when the augmented views of every epoch (`epoch_gb` each, all `views` together) do not fit
    the cache: the folder is kept under max_gb, so later jobs may recompute evicted early epochs."""
    if epoch_gb * epochs > max_gb:
        log.info("teacher outputs: the %sviews of all %d epochs take %.1f GB, over cache.max_gb=%g: jobs after "
                 "this one may find early epochs evicted and compute them again",
                 f"{views} " if views > 1 else "", epochs, epoch_gb * epochs, max_gb)


def clear_cache(folder: Optional[Path] = None) -> int:
    """Delete every cached entry; returns the number of bytes freed."""
    folder = folder or DEFAULT_CACHE_DIR
    freed = 0
    for path in [*folder.glob("*.pt"), *folder.glob(".*.tmp")]:
        with contextlib.suppress(OSError):  # deleted meanwhile by a job's clean-up
            size = path.stat().st_size
            path.unlink()
            freed += size
    return freed
