"""slurm/launch.sh and the recipe scripts on a real two-node SLURM cluster (see slurm_cluster.py).

Each job runs the recipe script unchanged (its #SBATCH header included) with sbatch -N2 on fake
nodes n1 and n2, one CPU rank per node.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import _FINAL_STATES, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The module torchrun runs under the launcher; "megarope" once the CLI can run a tiny recipe.
ENTRY_MODULE = "_slurm_probe"

@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def launch(slurm_cluster, runs, tmp_path):
    """Submit slurm/<recipe>.sh from the repo root, as users do, with CPU-sized knobs."""
    env = {
        "MEGAROPE_MODULE": ENTRY_MODULE,
        "MEGAROPE_PYTHON": sys.executable,
        "MEGAROPE_RUNS_DIR": str(runs),
        "GPUS_PER_NODE": "1",
        # Another test session on this machine may hold the default port.
        "MEGAROPE_RDZV_PORT": str(free_port()),
        "PYTHONPATH": str(HERE),
    }

    def submit(recipe: str, *overrides: str) -> str:
        return slurm_cluster.submit(
            REPO / "slurm" / f"{recipe}.sh", *overrides, cwd=REPO, env=env,
            sbatch_args=["-N2", f"--output={tmp_path}/%x-%j.out"])

    return submit


def reports(run_dir: Path, restart: int) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}-restart{restart}.json").read_text()) for r in (0, 1)]


def _wait_while_live(slurm_cluster, job: str, reached) -> None:
    """Until ``reached()``; fails if the job ends first. No clock: on a loaded machine a job is
    slow, not wrong; a hang is left to pytest-timeout."""
    while not reached():
        state = slurm_cluster.job(job)["JobState"]
        assert state not in _FINAL_STATES, f"job {job} ended {state}:\n{slurm_cluster.output(job)}"
        time.sleep(0.2)


@pytest.mark.slurm
def test_two_nodes_torchrun_rendezvous(slurm_cluster, launch, runs):
    job = launch("longrope_2048k", "train.lr=3e-4", "model.name=tiny llama")
    slurm_cluster.wait_for(job, "COMPLETED", timeout=120)

    run_dir = runs / f"longrope_2048k-{job}"
    ranks = reports(run_dir, restart=0)
    assert {r["node"] for r in ranks} == {"n1", "n2"}
    for rank, r in enumerate(ranks):
        assert (r["rank"], r["world_size"], r["all_reduce"]) == (rank, 2, 2.0)
        assert r["argv"] == ["recipe=longrope_2048k", f"run.dir={run_dir}",
                             "train.lr=3e-4", "model.name=tiny llama"]
        assert r["job_id"] == job


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, launch, runs):
    job = launch("entropy_abf_16k", "probe.wait_for_signal=true")
    run_dir = runs / f"entropy_abf_16k-{job}"
    _wait_while_live(slurm_cluster, job, lambda: len(list(run_dir.glob("started-rank*"))) >= 2)

    # What `#SBATCH --signal=B:USR1@300` does near the time limit, without waiting for it.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm_cluster.wait_for(job, "COMPLETED", timeout=150, restarts=1)
    log = slurm_cluster.output(job)

    first, second = reports(run_dir, restart=0), reports(run_dir, restart=1)
    assert all(r["checkpoints_found"] == [] for r in first)
    # Each rank got the signal and checkpointed during the first run.
    assert [(run_dir / f"checkpoint-rank{r}").read_text() for r in (0, 1)] == ["0", "0"], log
    for r in second:
        assert r["job_id"] == job and r["restart_count"] == 1
        assert r["checkpoints_found"] == ["checkpoint-rank0", "checkpoint-rank1"]
        assert r["all_reduce"] == 2.0
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    # --open-mode=append keeps both runs in one log.
    assert "SIGUSR1 received" in log and f"requeueing job {job}" in log
    assert f"launch.sh: job {job} restart 1 " in log


def test_launcher_refuses_to_run_outside_a_job():
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), "tiny"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "must run inside a SLURM job" in out.stderr


# ------------------------------------------------------------------------------------------------
# The real CLI: the tiny version of longrope_2048k on two nodes (gloo, one CPU rank per node).

TINY_2048K = ["+recipe/tiny_overrides=longrope_2048k", "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny stand-in for a Hugging Face checkpoint (recipe=tiny_base, a short pre-training)."""
    run_dir = tmp_path_factory.mktemp("tiny_base") / "run"
    proc = subprocess.run([sys.executable, "-m", "megarope", "recipe=tiny_base", f"run.dir={run_dir}",
                           "train.steps=10"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "stages" / "export" / "model"


@pytest.fixture
def launch_megarope(slurm_cluster, runs, tmp_path, tiny_checkpoint):
    env = {"MEGAROPE_MODULE": "megarope", "MEGAROPE_PYTHON": sys.executable, "MEGAROPE_RUNS_DIR": str(runs),
           "GPUS_PER_NODE": "1", "MEGAROPE_RDZV_PORT": str(free_port())}

    def submit(*overrides: str) -> str:
        return slurm_cluster.submit(
            REPO / "slurm" / "longrope_2048k.sh", *TINY_2048K, f"model.path={tiny_checkpoint}", *overrides,
            cwd=REPO, env=env, sbatch_args=["-N2", f"--output={tmp_path}/%x-%j.out"])

    return submit


def final_metrics(run_dir: Path) -> list[dict]:
    from megarope.eval.metrics import read_metrics

    return [{k: v for k, v in row.items() if k not in ("time", "tokens_per_s")}
            for row in read_metrics(run_dir / "metrics.jsonl")]


_PLAIN: dict[str, Path] = {}  # the uninterrupted run, shared by the requeue tests of this module


def plain_run(slurm_cluster, launch_megarope, runs) -> Path:
    if "dir" not in _PLAIN:
        plain = launch_megarope()
        slurm_cluster.wait_for(plain, "COMPLETED", timeout=900)
        _PLAIN["dir"] = runs / f"longrope_2048k-{plain}"
        assert (_PLAIN["dir"] / "summary.json").is_file(), slurm_cluster.output(plain)
        assert (_PLAIN["dir"] / "stages/export/model/config.json").is_file()
    return _PLAIN["dir"]


@pytest.mark.slurm
@pytest.mark.parametrize("stage,resumed", [
    # signalled once both ranks are in the stage's loop: a fine-tune has taken a step, a search
    # has finished its first generation (it stops after the generation it is scoring)
    ("finetune_ft1", ("resumed finetune_ft1", "finetune_ft1: already done")),
    ("search_ft1", ("search: resuming from", "search_ft1: already done")),
], ids=["train", "search"])
def test_longrope_2048k_tiny_on_two_nodes_requeued_equals_uninterrupted(slurm_cluster, launch_megarope, runs,
                                                                        stage, resumed):
    plain_dir = plain_run(slurm_cluster, launch_megarope, runs)
    job = launch_megarope()
    run_dir = runs / f"longrope_2048k-{job}"
    _wait_while_live(slurm_cluster, job, lambda: any(r.get("run_stage", r.get("stage")) == stage
                                                     for r in final_metrics(run_dir)))
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm_cluster.wait_for(job, "COMPLETED", timeout=900, restarts=1)
    log = slurm_cluster.output(job)
    assert info["Restarts"] == "1" and f"requeueing job {job}" in log, log[-4000:]
    assert any(text in log for text in resumed), log[-4000:]
    assert final_metrics(run_dir) == final_metrics(plain_dir)
