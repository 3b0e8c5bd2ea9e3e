"""Checkpoints: a dict of state_dicts and plain data, written atomically, read with weights_only.

Layout (format 1): {"format", "model_class", "run_id", "teacher_run_id", "epoch", "model",
"optimizer", "scheduler", "loss" (what the loss owns: connectors, heads, memory banks), "rng",
"config", "identity" (kdresearch.identity), "num_classes", "metrics" (this epoch's), "history" ({epoch:
metrics} of every epoch so far, so a resumed job can log what never reached MLflow)}. Everything
is tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it and a crafted pickle cannot run code. The one class
allowed besides is `argparse.Namespace`: RepDistiller's `*_last.pth` files keep their command
line under `opt`, and a Namespace only sets attributes.
"""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdresearch.errors import KDResearchError

FORMAT = 1  # the "format" field of the checkpoints a job writes
# Classes a checkpoint may hold besides tensors and plain data (see the module docstring).
SAFE_CLASSES = (argparse.Namespace,)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` so that a crash mid-write leaves the previous file intact:
    write a temp file in the same folder, fsync, then rename over the target (atomic on POSIX)."""
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as RuntimeError('[enforce fail ...]') with the OSError as context.
        if temp_name:
            Path(temp_name).unlink(missing_ok=True)
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        raise KDResearchError(f"could not write checkpoint {path}: {cause.strerror or cause}") from None
    except BaseException:
        if temp_name:
            Path(temp_name).unlink(missing_ok=True)
        raise


def _unsafe_reason(error: Exception) -> str | None:
    """torch's weights_only refusal names the forbidden global; other unpickling errors mean damage."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()
    return None


# Opcodes by which a pickle imports a Python object (what unpickling can run code with).
IMPORTING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST"}


def _plain_pickle_imports(path: Path) -> Optional[bool]:
    """For a file that is one whole plain pickle (pickle.dump, not torch.save): whether it imports
    Python objects. None for anything else. Only reads the opcodes: nothing is unpickled."""
    try:
        with open(path, "rb") as stream:
            opcodes = {opcode.name for opcode, _, _ in pickletools.genops(stream)}
            whole = stream.read(1) == b""  # torch's legacy format is several pickles and raw bytes
    except (ValueError, EOFError, OSError):  # not a pickle, or a cut one
        return None
    return bool(opcodes & IMPORTING_OPCODES) if whole else None


def _unreadable(path: Path, cause: str) -> KDResearchError:
    """The error for a file torch could not read: a plain pickle is named as such, else damage."""
    imports = None if zipfile.is_zipfile(path) else _plain_pickle_imports(path)
    if imports is None:
        return KDResearchError(f"checkpoint {path} is truncated or corrupt ({cause})")
    if imports:
        return KDResearchError(
            f"refusing to load {path}: it is a plain Python pickle, not a torch checkpoint (torch.save), "
            f"and it imports Python objects, which could run code"
        )
    return KDResearchError(f"checkpoint {path} is a plain Python pickle, not a torch checkpoint; "
                           f"write it with torch.save")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (or a bare state_dict, or a benchmark
    suite's file); never executes code."""
    path = Path(path)
    if not path.is_file():
        raise KDResearchError(f"checkpoint {path} does not exist")
    try:
        if zipfile.is_zipfile(path):  # torch's reader skips CRCs: check them here (legacy files have none)
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise KDResearchError(f"checkpoint {path} is truncated or corrupt (bad checksum in {damaged})")
        with torch.serialization.safe_globals(list(SAFE_CLASSES)), warnings.catch_warnings():
            # torch's note on a pickle protocol other than its own: noise before our one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except KDResearchError:
        raise
    except pickle.UnpicklingError as error:
        reason = _unsafe_reason(error)
        if reason is None:
            raise _unreadable(path, "unreadable pickle") from None
        raise KDResearchError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, which "
            f"could run code ({reason})"
        ) from None
    except Exception as error:  # BadZipFile, EOFError, RuntimeError, KeyError from garbage, ...
        raise _unreadable(path, type(error).__name__) from None
    if not isinstance(state, dict):
        raise KDResearchError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    return state


STATE_DICT_KEYS = ("model", "net", "state_dict")  # where the benchmark suites' files keep the weights


def model_state(checkpoint: dict) -> dict:
    """The model's state_dict from one of our checkpoints, a benchmark suite's file (RepDistiller and
    mdistiller keep it under `model`; others use `net` or `state_dict`) or a bare state_dict.
    A `module.` prefix left by DataParallel/DDP is dropped."""
    state = checkpoint
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: value for name, value in state.items()}
    return state


# --- RNG state as plain data (np.random.get_state() is not weights_only-loadable as is) ---------

def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for key, generator in generators.items():
        generator.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_last(folder: Path, pattern: str, keep: Optional[int]) -> None:
    """Delete all but the newest `keep` files matching `pattern` (by name order: epoch-numbered)."""
    if keep is None or keep <= 0:
        return
    files = sorted(folder.glob(pattern))
    for old in files[:-keep]:
        old.unlink(missing_ok=True)
