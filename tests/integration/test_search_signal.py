"""A search stage under torchrun (2 ranks) stopped by SIGTERM mid-generation, then run again,
ends with the uninterrupted run's factors and scores exactly (as a SLURM requeue would)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megarope.eval.metrics import read_metrics

SEARCH = ["stages=[{name: search, kind: search, target_length: 256}]", "search.population=4",
          "search.iterations=3", "search.mutations=2", "search.crossovers=2", "search.topk=2", "search.num_docs=1",
          "search.fitness_chunk=2", "data.seq_len=64"]


def torchrun_cmd(run_dir):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megarope", "recipe=tiny", f"run.dir={run_dir}", *SEARCH]


def run_to_end(run_dir):
    proc = subprocess.run(torchrun_cmd(run_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def outcome(run_dir):
    """What the search found and everything it scored, as written in the run folder."""
    state = json.loads((run_dir / "stages/search/search_state.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl")
            if r["stage"] == "search"]
    return (json.loads((run_dir / "stages/search/factors.json").read_text()), sorted(state["scores"]),
            state["history"], rows)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("search") / "run"
    run_to_end(run_dir)
    return outcome(run_dir)


def test_sigterm_mid_generation_then_rerun_gives_the_same_search(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    state = run_dir / "stages/search/search_state.json"
    # its own process group: the signal reaches torchrun and both ranks, as scancel/a time limit does
    proc = subprocess.Popen(torchrun_cmd(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def scored():
        try:
            return len(json.loads(state.read_text())["scores"])
        except (OSError, ValueError):
            return 0

    while scored() < 2:  # the first chunk of generation 0 is scored; a hang is pytest-timeout's
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert "search stopped after generation" in out and "stopped on signal 15" in out, out[-3000:]
    assert not (run_dir / "stages/search/factors.json").exists()
    stopped = json.loads(state.read_text())
    assert 2 <= len(stopped["scores"]) and stopped["generation"] < 3
    run_to_end(run_dir)
    assert outcome(run_dir) == uninterrupted
