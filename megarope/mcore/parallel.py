"""The one place that sets up distribution: process group, megatron's parallel state, seeds.

Launchers, in order of precedence:
- torchrun (or anything torchrun-like: ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
  set) -> ``env://``;
- ``srun`` without torchrun (``SLURM_STEP_NUM_TASKS`` > 1) -> rank/world size from ``SLURM_*``,
  ``MASTER_ADDR``/``MASTER_PORT`` from the sbatch script, then ``env://``;
- none (a plain ``python``) -> a one-rank group on an in-memory store, no port needed.

Backend: nccl when CUDA is available, gloo otherwise (with the CPU layer of ``compat`` enabled so
megatron's own training machinery runs on CPU tensors, from ``initialize`` until ``destroy``).
"""

import contextlib
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

from megarope.dist import Launch
from megarope.dist import launch as detect_launch  # re-exported: where this process sits
from megarope.mcore import compat

__all__ = ["Launch", "destroy", "detect_launch", "initialize"]

_created_process_group = False


def _validate(tp: int, pp: int, cp: int, launch: Launch) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    if launch.world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {launch.world_size} is not divisible by parallel.tp * parallel.pp * "
            f"parallel.cp = {tp} * {pp} * {cp} = {tp * pp * cp}"
        )
    if launch.launcher == "srun":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"under srun without torchrun, export {' and '.join(missing)} in the sbatch "
                "script (e.g. the first host of $SLURM_JOB_NODELIST and a free port)"
            )


def _init_process_group(launch: Launch) -> None:
    global _created_process_group
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(launch.local_rank)
    backend = "nccl" if cuda else "gloo"
    if launch.launcher == "none":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size
        )
    _created_process_group = True


@contextlib.contextmanager
def _stop_signals_to_main_thread():
    """Threads started inside (the process groups' communication threads) inherit a signal mask
    blocking SIGTERM/SIGUSR1, so the kernel delivers those to the main thread, where Python runs
    the handler. Delivered to a gloo thread instead, the signal interrupts its socket I/O mid-
    collective, and one rank can finish an all-reduce the other then waits on forever (seen on CPU
    when a requeue signal reaches every rank at once)."""
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def initialize(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> Launch:
    """Initialise torch.distributed (if needed), megatron's parallel state and all RNGs.

    Data-parallel size is what is left: world_size / (tp * pp * cp). Every rank gets the same
    ``seed`` for python/numpy/torch; megatron's tracker then derives the TP-rank-specific
    stream from it (``model_parallel_cuda_manual_seed``). Idempotent for the same sizes.
    Returns where this process sits (rank, world size, launcher).
    """
    from megatron.core import parallel_state, tensor_parallel

    launch = detect_launch()
    _validate(tp, pp, cp, launch)  # before anything changes state
    compat.enable_cpu_compat()
    compat.quiet_gpt_model_deprecation()

    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if current != (tp, pp, cp):
            raise RuntimeError(
                f"megatron parallel state already initialised with tp/pp/cp={current}; "
                "call megarope.mcore.parallel.destroy() first"
            )
    else:
        with _stop_signals_to_main_thread():
            if not dist.is_initialized():
                _init_process_group(launch)
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                context_parallel_size=cp,
            )

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch


def destroy() -> None:
    """Tear down megatron's parallel state, the process group ``initialize`` created and the CPU
    compatibility layer it switched on: the process's torch behaves as before ``initialize``."""
    global _created_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _created_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_process_group = False
    compat.disable_cpu_compat()
