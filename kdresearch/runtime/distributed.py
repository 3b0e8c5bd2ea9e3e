"""Data-parallel training under torchrun or srun (DDP): which process is which, and what they share.

`torchrun --nproc_per_node=N train.py ...` starts N copies of the job; torch.distributed's env
variables (RANK, WORLD_SIZE, LOCAL_RANK) tell them apart. Under SLURM (`hydra/launcher=slurm`),
`srun` starts one task per GPU instead and SLURM's variables say the same (`slurm_env` maps them).
Every rank trains on its share of each global batch (so `batch_size` stays the global batch size)
and DDP averages the gradients; rank 0 alone talks to MLflow, writes checkpoints and prints. A
single process is the world of size 1, so the trainer has one code path.

`torchrun --max-restarts=N` starts every rank again when one fails; the restarted ranks know it
(`World.restart`) and continue the job from its newest complete checkpoint
(kdresearch.training.resume).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from kdresearch.errors import KDResearchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0  # torchrun's restarts of the job's processes so far (--max-restarts); 0: the first start

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device_type: str) -> World:
    """Join the process group of the job's processes (gloo on CPU, nccl on CUDA): torchrun's, or
    the tasks srun started (`slurm_env`); a world of 1 otherwise."""
    for key, value in slurm_env(os.environ).items():
        os.environ.setdefault(key, value)
    size, restart = int(os.environ.get("WORLD_SIZE", "1")), restart_count(os.environ)
    if size == 1:
        return World(restart=restart)
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), restart)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **_attempt_store(world))
    if not world.is_main:
        logging.getLogger("kdresearch").setLevel(logging.WARNING)  # one console voice: rank 0
    return world


# --- torchrun's restarts --------------------------------------------------------------------------

def restart_count(env: Mapping[str, str]) -> int:
    """How many times torchrun has restarted the job's processes (TORCHELASTIC_RESTART_COUNT)."""
    return int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)


def check_restartable(run_dir_setting: str, env: Mapping[str, str]) -> None:
    """A job torchrun may restart (--max-restarts) must find its folder again at every start:
    Hydra's default run folder, named by the time of the start (`${now:...}`), would be a new one."""
    if int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0 and "${now:" in run_dir_setting:
        raise KDResearchError(
            f"torchrun --max-restarts: give the job's folder, e.g. hydra.run.dir=outputs/my-job (the same on "
            f"every node); a restart continues the job from its newest checkpoint there, and hydra.run.dir="
            f"{run_dir_setting} names a new folder at every start"
        )


def _attempt_store(world: World) -> dict:
    """init_process_group's store for this start of the job. torchrun's agent serves one store for
    every start (TORCHELASTIC_USE_AGENT_STORE), and a restart would read the addresses the failed
    start's ranks left there (gloo then connects to ports nobody listens on): each start keeps its
    keys under a prefix of its own. {} (torch's env:// rendezvous) elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from torch.distributed.constants import default_pg_timeout

    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=default_pg_timeout)
    return {"store": dist.PrefixStore(f"kdresearch/start_{world.restart}", shared), "rank": world.rank,
            "world_size": world.size}


# --- srun's tasks ---------------------------------------------------------------------------------

SLURM_PORT_BASE = 20000  # MASTER_PORT from the job id: 20000-29999, below Linux's ephemeral ports


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a
    task that srun started as one of several (one per GPU: `hydra/launcher=slurm`), from SLURM's:
    SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the first node of the step's node list
    (where srun places task 0) and a port drawn from SLURM_JOB_ID (the same on every node, and
    different for jobs sharing a node). {} under torchrun (its variables win), outside SLURM,
    and in a step of one task, such as the batch script itself (SLURM_NTASKS counts the job's
    tasks there, not the step's)."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or tasks <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        raise KDResearchError("srun started this task as one of several, but SLURM_STEP_NODELIST and "
                              "SLURM_JOB_NODELIST are unset: cannot tell where rank 0 runs")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_node(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID") or 0) % 10000),
    }


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-010,012],cpu1" -> "gpu007" (the padding kept),
    "rack[2-3]-n[01-04]" -> "rack2-n01"."""
    match = re.match(r"([^\[,]*)(?:\[([^\]]*)\])?(.*)", nodelist.strip())
    prefix, ranges, rest = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + (first_node(rest) if rest and not rest.startswith(",") else "")


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
