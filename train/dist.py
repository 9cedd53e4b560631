"""Distributed identity from the environment, behind one paired init/cleanup.

Who am I comes from the launcher only: torchrun's RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE, or
SLURM's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS under srun (one task per GPU). The rendezvous
address is never chosen here: MASTER_ADDR/MASTER_PORT come from the launcher. With neither, this
is a plain single process (world size 1) and no process group is created.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Identity:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun" | "slurm" | "none"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: no process group (plain single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _tasks_on_node(spec: str, node_id: int) -> int | None:
    """SLURM's compressed tasks-per-node list ("2(x3),1") -> this node's task count."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def identity(env: Mapping[str, str]) -> Identity:
    """Read rank, local rank and sizes from launcher variables (torchrun's win over SLURM's:
    torchrun started inside an sbatch script sees both, and its own are the true ones)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Identity(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                        int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = _tasks_on_node(spec, int(env.get("SLURM_NODEID", 0))) if spec else None
        return Identity(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                        local_world or int(env.get("SLURM_NTASKS_PER_NODE", world)), "slurm")
    return Identity(0, 0, 1, 1, "none")


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        # Under srun with --gpus-per-task each task may see only its own GPU: wrap around.
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # torchrun, scancel and `cluster stop` send SIGTERM; turning it into an exception runs every
    # `finally` (destroy_process_group, heartbeat) instead of dying mid-flight.
    raise SystemExit(128 + signum)


def init(timeout_s: int, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Join the process group the launcher describes (NCCL on GPU, gloo on CPU)."""
    ident = identity(os.environ if environ is None else environ)
    device = _device_for(ident.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ident.launcher == "none":
        return DistEnv(0, 0, 1, 1, device, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{var} is not set: the launcher ({ident.launcher}) must give the rendezvous address")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method="env://", rank=ident.rank, world_size=ident.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None)
    return DistEnv(ident.rank, ident.local_rank, ident.world_size, ident.local_world_size, device, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(timeout_s: int) -> Iterator[DistEnv]:
    """init() ... cleanup() on every exit path, SIGTERM included."""
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield init(timeout_s)
    finally:
        cleanup()
        signal.signal(signal.SIGTERM, previous)


# Collectives that are no-ops in a plain single process.

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
