"""Data-parallel training under torchrun (DDP): which process is which, and what they share.

`torchrun --nproc_per_node=N train.py ...` starts N copies of the job; torch.distributed's env
variables (RANK, WORLD_SIZE, LOCAL_RANK) tell them apart. Every rank trains on its share of each
global batch (so `batch_size` stays the global batch size) and DDP averages the gradients; rank 0
alone talks to MLflow, writes checkpoints and prints. A single process is the world of size 1,
so the trainer has one code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device_type: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); world of 1 otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if not world.is_main:
        logging.getLogger("kdresearch").setLevel(logging.WARNING)  # one console voice: rank 0
    return world


def device_for(world: World, device: torch.device) -> torch.device:
    if world.active and device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def broadcast_object(world: World, value=None):
    """Rank 0's `value` on every rank (a picklable object: strings, ids, small dicts)."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(world: World, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's `module`."""
    if world.active:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average(world: World, values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of per-rank averages (each rank saw an equal share of every batch)."""
    if not world.active:
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[key] for key in keys], dtype=torch.float64)
    dist.all_reduce(stacked)
    return {key: value / world.size for key, value in zip(keys, stacked.tolist())}


def wrap(world: World, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around a module with parameters to train; the module itself in a world of 1."""
    if not world.active or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
