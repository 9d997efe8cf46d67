"""A real one-machine SLURM cluster as a session-scoped pytest fixture.

It starts a private ``munged``, ``slurmctld`` and two ``slurmd`` (fake nodes n1 and n2 on
127.0.0.1), all in a temporary directory with free ports, so several test sessions on one machine
do not collide and nothing under /etc is touched. Install SLURM with ``.ci/install_slurm.sh``;
without it the tests that use the fixture are skipped.

    def test_x(slurm_cluster):
        job = slurm_cluster.submit("slurm/x.sh", "key=value", sbatch_args=["-N2"], env={...})
        slurm_cluster.wait_for(job, "COMPLETED")
        print(slurm_cluster.output(job))
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Daemons live in /usr/sbin, which is not on every user's PATH.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_NODES = ("n1", "n2")
_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "PREEMPTED", "BOOT_FAIL", "DEADLINE"}

SLURM_CONF_TEMPLATE = """\
ClusterName=megarope-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={state}/ctld
SlurmctldPidFile={state}/slurmctld.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdPidFile={state}/slurmd-%n.pid
SlurmdSpoolDir={state}/slurmd-%n
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# A requeued job only becomes eligible after cred_expire; rescan pending jobs every second
# instead of every 60 s so it restarts promptly.
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Fast tests: kill quickly, notice dead daemons quickly, keep finished jobs queryable.
KillWait=5
MessageTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=3600
GresTypes=gpu
NodeName=DEFAULT CPUs=1 RealMemory=1000 Gres=gpu:8 State=UNKNOWN
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""

# Fake GPUs (empty files) so recipe scripts keep their real --gpus-per-node header; slurmd only
# counts the files, and task/none never constrains access to them.
GRES_CONF = "AutoDetect=off\nName=gpu File={root}/gpu[0-7]\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_missing() -> str | None:
    """Why the cluster cannot start here, or None when every binary is installed."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
               if shutil.which(b, path=_PATH) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh"
    return None


class SlurmCluster:
    """Daemons plus helpers; ``env`` is the environment every SLURM client call needs."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.conf = root / "slurm.conf"
        # Variables from an enclosing SLURM job (CI may itself run under SLURM) would leak into
        # sbatch/srun and point them at the wrong job.
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env = {**clean, "PATH": _PATH, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.state.mkdir(mode=0o700)
        munge_dir = self.root / "munge"
        # munged insists on a private key and a socket directory only its owner can write.
        munge_dir.mkdir(mode=0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge_dir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}",
                               f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                               f"--log-file={munge_dir}/munged.log",
                               f"--seed-file={munge_dir}/munged.seed"])
        _wait(lambda: socket_path.exists(), 10, "munged socket", self)

        ports = [free_port() for _ in range(1 + len(_NODES))]
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            host=host, ctld_port=ports[0],
            munge_socket=socket_path, state=self.state, nodes=",".join(_NODES),
            node_lines="\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p}"
                                  for n, p in zip(_NODES, ports[1:])),
        ))
        (self.root / "gres.conf").write_text(GRES_CONF.format(root=self.root))
        for i in range(8):
            (self.root / f"gpu{i}").touch()
        for node in _NODES:
            (self.state / f"slurmd-{node}").mkdir()

        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in _NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        _wait(self._nodes_idle, 60, "both nodes idle in sinfo", self)

    def stop(self) -> None:
        """Cancel leftover jobs (their slurmstepd outlive slurmd), then stop the daemons."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._procs):
            self.run("scancel", "--partition=debug", check=False)
            try:
                _wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 30,
                      "jobs to leave the queue", self)
            except TimeoutError:
                pass  # Stop the daemons anyway; the test result already holds the failure.
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stderr", "wb")
        self._procs.append((name, subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)))
        log.close()

    def _nodes_idle(self) -> bool:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in _NODES}

    def logs(self) -> str:
        """Tail of every daemon's output (in -D mode it repeats its log file), for failures."""
        parts = []
        for path in sorted(self.root.glob("*.stderr")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- helpers for tests ---------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=60, **kw)

    def submit(self, script: str | Path, *args: str, sbatch_args: list[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        """sbatch SCRIPT ARGS...; ``env`` adds to the job's (exported) environment. Returns id."""
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script), *args,
                       env={**self.env, **(env or {})}, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, StdOut, ExitCode, ...)."""
        # under heavy load scontrol now and then dies of SIGPIPE on its own socket: ask again
        for _ in range(5):
            out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
            if out.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", out.stdout))
            time.sleep(0.5)
        raise RuntimeError(f"scontrol show job {job_id} failed: {out.returncode} {out.stderr}")

    def wait_for(self, job_id: str, state: str, timeout: float = 60, restarts: int | None = None
                 ) -> dict[str, str]:
        """Wait until the job is in ``state`` (after ``restarts`` requeues, if given)."""
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            if info["JobState"] == state and restarts in (None, int(info["Restarts"])):
                return True
            if info["JobState"] in _FINAL_STATES:
                raise AssertionError(
                    f"job {job_id} ended {info['JobState']} after {info['Restarts']} restarts, "
                    f"not {state} after {restarts}:\n{self.output(job_id)}\n{self.logs()}")
            return False

        _wait(reached, timeout, f"job {job_id} to reach {state}", self,
              detail=lambda: f"{info}\n{self.output(job_id)}")
        return info

    def output(self, job_id: str) -> str:
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else f"(no output at {path})"


def _wait(cond, timeout: float, what: str, cluster: SlurmCluster, detail=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            extra = detail() if detail else cluster.logs()
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root (SlurmUser=root)")
    # Under /tmp, not tmp_path_factory: munge's socket path must fit in sockaddr_un (108 bytes).
    with tempfile.TemporaryDirectory(prefix="slurm-") as tmp:
        cluster = SlurmCluster(Path(tmp))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
