"""Run a function in N fresh processes, torchrun-style, and collect what each rank returns.

    from _launch import run_distributed
    results = run_distributed(fn, 2, arg1, arg2)   # [fn(arg1, arg2) on rank 0, ... on rank 1]

Each child gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` in its
environment but no process group: ``megarope.mcore.parallel.initialize`` (or
``torch.distributed.init_process_group("gloo")``) picks them up. ``fn`` must be importable by
name (a module-level function) and its return value picklable. A failing rank raises here with
the child's traceback; the other ranks are stopped.
"""

import os
import pickle
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, fn, world_size, port, out_dir, args):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # N processes share the machine's cores; torch's default (all cores each) oversubscribes.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    result = fn(*args)
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return the results in rank order."""
    with tempfile.TemporaryDirectory(prefix="megarope-dist-") as out_dir:
        ctx = mp.spawn(
            _child,
            args=(fn, world_size, _free_port(), out_dir, args),
            nprocs=world_size,
            join=False,
        )
        try:
            # join() returns when any rank exits; it raises ProcessRaisedException /
            # ProcessExitedException with the failing child's traceback after stopping the rest.
            deadline = time.monotonic() + timeout
            while not ctx.join(max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout} s")
        except ProcessException as e:
            # Re-raised bare so pytest shows the child's traceback, not spawn's join loop.
            raise RuntimeError(f"{fn.__name__} on {world_size} ranks failed:{e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
