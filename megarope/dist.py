"""Where this process sits, and the one barrier: the only place that asks "am I rank 0".

Level 0 (torch.distributed only). Before the process group exists (logging setup, config checks)
the launcher's environment decides, so every rank agrees on rank 0 from the first line of a run.
Launchers, in order of precedence:

- torchrun (or anything torchrun-like: ``RANK`` and ``WORLD_SIZE`` set);
- ``srun`` without torchrun (``SLURM_STEP_NUM_TASKS`` > 1): ``SLURM_PROCID`` and friends;
- none (a plain ``python``): rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun", "none", or "existing" (a group was already up)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def detect_launch() -> Launch:
    """Where this process sits, read from the live group or else the launcher's environment."""
    env = os.environ
    if initialized():
        rank = dist.get_rank()
        return Launch(rank, dist.get_world_size(), int(env.get("LOCAL_RANK", rank)), "existing")
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    # SLURM_STEP_NUM_TASKS is set by srun for its step only, not in the sbatch batch script,
    # where a plain `python` must not mistake the job's task count for its own world.
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                      int(env.get("SLURM_LOCALID", 0)), "srun")
    return Launch(0, 1, 0, "none")


def rank() -> int:
    return detect_launch().rank


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    """All ranks wait here; a no-op in a plain process."""
    if initialized() and dist.get_world_size() > 1:
        dist.barrier()
