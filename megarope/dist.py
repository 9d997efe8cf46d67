"""Which process this is, for deciding who writes: the one rank helper of the package (level 0).

Before any process group exists (Hydra's start, the pipeline's first files) the launcher's
environment says it: ``RANK``/``WORLD_SIZE`` (torchrun and torchrun-like launchers), else
``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` (``srun`` without torchrun; set by srun for its step
only, not in the sbatch script, where a plain ``python`` is rank 0 of 1). Once a group is up,
torch.distributed's answer is used. A plain ``python`` is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Launch", "barrier", "is_rank0", "launch", "rank", "world_size"]


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun", "none", or "existing" (a group was already up)


def launch() -> Launch:
    """Where this process sits, read from the live group or else the launcher's environment."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Launch(rank, dist.get_world_size(), int(env.get("LOCAL_RANK", rank)), "existing")
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      "srun")
    return Launch(0, 1, 0, "none")


def rank() -> int:
    return launch().rank


def world_size() -> int:
    return launch().world_size


def is_rank0() -> bool:
    """Global rank 0: the only process that writes run files (metrics, summary, report, plots)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
