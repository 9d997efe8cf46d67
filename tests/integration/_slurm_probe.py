"""Stand-in for `python -m megarope` under slurm/launch.sh (MEGAROPE_MODULE=_slurm_probe).

Takes the same `key=value` argv, joins the gloo group torchrun set up, and writes what it saw to
`run.dir/rank<R>-restart<N>.json`. With `probe.wait_for_signal=true` it behaves like training
interrupted by the time-limit signal: on a first run each rank waits for SIGUSR1, writes a
checkpoint marker and exits; a run that finds every rank's marker finishes at once.
"""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
    signalled = []
    # torchrun and srun may both deliver the signal: the handler must be idempotent.
    signal.signal(signal.SIGUSR1, lambda *_: signalled.append(time.time()))

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.ones(1)
    dist.all_reduce(total)
    run_dir = Path(overrides["run.dir"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    markers = sorted(p.name for p in run_dir.glob("checkpoint-rank*"))
    report = {
        "argv": sys.argv[1:],
        "rank": rank,
        "world_size": world,
        "all_reduce": total.item(),
        "node": os.environ.get("SLURMD_NODENAME"),
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart_count": restart,
        "checkpoints_found": markers,
    }
    (run_dir / f"rank{rank}-restart{restart}.json").write_text(json.dumps(report))
    # Everyone has read the markers before anyone could write new ones.
    dist.barrier()
    if overrides.get("probe.wait_for_signal") == "true" and len(markers) < world:
        (run_dir / f"started-rank{rank}").touch()
        deadline = time.time() + 90
        while not signalled and time.time() < deadline:
            time.sleep(0.1)
        if not signalled:
            sys.exit("probe: no SIGUSR1 within 90 s")
        (run_dir / f"checkpoint-rank{rank}").write_text(str(restart))
        print(f"probe rank {rank}: SIGUSR1 -> checkpoint written", flush=True)
        sys.exit(0)
    dist.destroy_process_group()
    print(f"probe rank {rank}/{world} on {report['node']}: done", flush=True)


if __name__ == "__main__":
    main()
