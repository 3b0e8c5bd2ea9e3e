"""Device selection and the speed/determinism switches of the `device` config group."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import Mapping

import torch

from kdresearch.config import validators
from kdresearch.errors import KDResearchError

log = logging.getLogger(__name__)

DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
SWITCHES = ("channels_last", "compile", "keep_freed_memory", "deterministic")  # the group's true/false keys

# glibc's mallopt parameters (malloc.h) and the size under which freed memory stays in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def resolve_device(kind: str) -> torch.device:
    """`auto` is the tutorial's rule: torch.accelerator's device if there is one, else the CPU."""
    if kind == "auto":
        if torch.accelerator.is_available():
            return torch.device(torch.accelerator.current_accelerator().type)
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise KDResearchError("device=cuda but no CUDA device is available here; use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise KDResearchError("device=mps but MPS is not available here; use device=auto or device=cpu")
    return torch.device(validators.choice("device.type", kind, DEVICE_TYPES))


def check_options(device: Mapping[str, object]) -> None:
    """Every key of the `device` group, before anything starts."""
    validators.choice("device.type", device["type"], DEVICE_TYPES)
    check_precision(device["precision"])
    for key in SWITCHES:
        validators.switch(f"device.{key}", device[key])


def check_precision(precision: str) -> None:
    validators.choice("device.precision", precision, PRECISIONS)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass; fp32 is a no-op context."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_deterministic(enabled: bool) -> None:
    """torch's deterministic algorithms plus the CUDA settings they need (cuBLAS workspace, cuDNN)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # The call imports torch._inductor (~1.5 s of CPU): skip it when there is nothing to change.
    if enabled or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def keep_freed_memory(enabled: bool) -> bool:
    """Let glibc keep freed blocks of up to 1 GiB for reuse instead of returning them to the OS.

    By default glibc serves every block over 32 MiB with its own mmap and unmaps it on free, and a
    DeepNN training step allocates and frees many such activations (128x128x32x32 fp32 is 64 MiB)
    every step, so each step page-faults and zero-fills them anew: 20-25 % of a DeepNN step on this
    project's CPU (scripts/benchmark.py). Raising the mmap and trim thresholds makes the second
    step reuse the first step's memory. The cost is that the process keeps up to 1 GiB of freed
    memory mapped; its peak stays the same. Returns whether the setting took effect (glibc only).
    """
    if not enabled:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        applied = False
    if not applied:
        log.debug("device.keep_freed_memory: not applied (no glibc mallopt here)")
    return applied
