"""Device selection and the speed/determinism switches of the `device` config group."""

from __future__ import annotations

import contextlib
import os

import torch

from kdresearch.errors import KDResearchError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


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
    if kind not in ("cuda", "mps"):
        raise KDResearchError(f"device.type must be auto, cpu, cuda or mps, got {kind!r}")
    return torch.device(kind)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise KDResearchError(f"device.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


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
