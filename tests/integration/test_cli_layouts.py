"""Every parallel layout trains the same model as one process, through the real CLI under torchrun.

The tiny recipe's per-step training losses under TP2, PP2, CP2, SP(+TP2), DP2, TP2xCP2 and
TP2xPP2 equal the single-process run's within 1e-5 relative (fp32): same initial weights (drawn
per parameter by global name, vocabulary padded independently of TP), same data, same updates.
``metrics.jsonl`` is read as written (no dedupe): each step appears exactly once, from rank 0.
A one-process run stopped after its step-2 checkpoint resumes under TP2 and under PP2 with the
uninterrupted run's losses.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megarope.eval.metrics import read_metrics

STEPS = 4
RTOL = 1e-5
# few short steps; every layout below divides these (CP2 chunks of 2*cp, SP over TP, PP over 4 layers)
# an eval of the trained model too: its perplexity goes through the gathered (unsharded) logits
FAST = ["recipe=tiny", "data.seq_len=64", "train.global_batch_size=4", f"train.steps={STEPS}", "eval.lengths=[64]",
        "eval.num_docs=2", "stages=[{name: train, kind: train}, {name: eval, kind: eval, init: train}]"]

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "cp2": (2, ["parallel.cp=2"]),
    "sp_tp2": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "dp2": (2, []),
    "tp2_cp2": (4, ["parallel.tp=2", "parallel.cp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


def cli(nproc: int, *overrides: str, run_dir: Path) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "megarope"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megarope"]
    # ranks share the cores: one thread each instead of all cores each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *FAST, *overrides, f"run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row, in file order, as written (no dedupe)."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "train"]


def eval_ppl(run_dir: Path) -> float:
    (row,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "eval"]
    return row["ppl"]


def assert_same_losses(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step exactly once, in order
    worst = max(abs(g - w) / abs(w) for (_, g), (_, w) in zip(got, want))
    print(f"max relative loss difference {worst:.2e}")  # shown with -s / -rP
    assert worst <= RTOL, f"max relative loss difference {worst:.2e}: {got} vs {want}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run every layout is compared with; it keeps its step-2 checkpoint for the
    resume tests (checkpointing does not change the losses)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    cli(1, "checkpoint.every=2", "checkpoint.keep=2", run_dir=run_dir)
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return run_dir, losses, eval_ppl(run_dir)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(tmp_path, single, layout):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    cli(nproc, *overrides, "log.tensorboard=true", run_dir=run_dir)
    assert_same_losses(train_losses(run_dir), single[1])
    assert eval_ppl(run_dir) == pytest.approx(single[2], rel=RTOL)  # written once, padding ids masked
    # the dashboard has one writer too
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def _stopped_at_step_2(single_dir: Path, run_dir: Path) -> None:
    """``run_dir`` as the one-process run left it had it been killed right after its step-2
    checkpoint: checkpoint 2 latest, metrics up to step 2, stage not done, no summary."""
    shutil.copytree(single_dir, run_dir)
    ckpts = run_dir / "stages/train/checkpoints"
    shutil.rmtree(ckpts / f"step_{STEPS:08d}")
    (ckpts / "latest").write_text("step_00000002")
    shutil.rmtree(run_dir / "stages/eval")
    (run_dir / "stages/train/done.json").unlink()
    (run_dir / "summary.json").unlink()
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]))


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_resume_one_process_checkpoint_under(tmp_path, single, layout):
    run_dir = tmp_path / "run"
    _stopped_at_step_2(single[0], run_dir)
    nproc, overrides = LAYOUTS[layout]
    cli(nproc, *overrides, run_dir=run_dir)
    assert_same_losses(train_losses(run_dir), single[1])
    assert eval_ppl(run_dir) == pytest.approx(single[2], rel=RTOL)


def test_resume_of_another_model_names_the_field(tmp_path, single):
    run_dir = tmp_path / "run"
    _stopped_at_step_2(single[0], run_dir)
    cmd = [sys.executable, "-m", "megarope", *FAST, "model.num_layers=2", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: model.num_layers: checkpoint" in proc.stdout + proc.stderr
    assert [s for s, _ in train_losses(run_dir)] == [1, 2]  # nothing written by the refused run
