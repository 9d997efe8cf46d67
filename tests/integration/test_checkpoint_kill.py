"""A run killed (SIGKILL-like: ``os._exit``, no cleanup) at each file boundary of writing its second
checkpoint resumes from the last complete one and continues with the uninterrupted losses, bitwise.

The kill is placed by a runner that wraps the file operations checkpoint.save goes through (the
package itself has no hook for it): before megatron's dist_checkpointing writes the shards, after
it wrote them, before the checkpoint folder is renamed into place, before the ``latest`` marker is
written, between the marker's temporary file and its rename, and before the old checkpoint is
deleted.
"""

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from megarope.eval.metrics import read_metrics

FAST = ["recipe=tiny", "data.seq_len=64", "train.global_batch_size=4", "train.steps=6", "checkpoint.every=2",
        "stages=[{name: train, kind: train}]"]

RUNNER = r'''
import os, sys


def main():
    point = sys.argv[1]
    import megarope.run.checkpoint as checkpoint

    seen = {"checkpoints": 0}

    def kill():
        os._exit(137)

    def second():
        """True while the second checkpoint (step 4) is being written."""
        return seen["checkpoints"] == 2

    save = checkpoint.dist_checkpointing.save
    def dist_save(state, path, *args, **kwargs):
        seen["checkpoints"] += 1
        if point == "before-shards" and second():
            kill()
        out = save(state, path, *args, **kwargs)
        if point == "after-shards" and second():
            kill()
        return out
    checkpoint.dist_checkpointing.save = dist_save

    replace = os.replace
    def guarded_replace(src, dst):
        src, dst = str(src), str(dst)
        if second():
            if point == "before-rename" and src.endswith(".tmp") and os.path.isdir(src):
                kill()
            if point == "marker-tmp" and os.path.basename(dst) == checkpoint.LATEST:
                kill()
        return replace(src, dst)
    os.replace = guarded_replace

    write_text = checkpoint.atomic_write_text
    def marker(path, text):
        if point == "before-marker" and second():
            kill()
        return write_text(path, text)
    checkpoint.atomic_write_text = marker

    rmtree = checkpoint.shutil.rmtree
    def delete(path, *args, **kwargs):
        if point == "before-delete" and second() and not str(path).endswith(".tmp") and os.path.isdir(path):
            kill()
        return rmtree(path, *args, **kwargs)
    checkpoint.shutil.rmtree = delete

    sys.argv = ["megarope", *sys.argv[2:]]
    from megarope.__main__ import main as megarope_main
    megarope_main()


if __name__ == "__main__":
    main()
'''

POINTS = ["before-shards", "after-shards", "before-rename", "before-marker", "marker-tmp", "before-delete"]


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "train"]


def cli(run_dir):
    return subprocess.run([sys.executable, "-m", "megarope", *FAST, f"run.dir={run_dir}"], capture_output=True,
                          text=True, timeout=600)


def runner(tmp_path):
    """The runner as a script file: megatron's checkpoint writer starts a multiprocessing Manager,
    which re-imports the main script (a ``-c`` string cannot be)."""
    path = tmp_path / "kill_runner.py"
    path.write_text(RUNNER)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    proc = cli(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return train_losses(run_dir)


@pytest.mark.parametrize("point", POINTS)
def test_killed_while_checkpointing_resumes_from_the_last_good_one(point, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # its own process group, its output in a file: the killed process leaves megatron's writer
    # helper process behind, which holds inherited pipes open and is stopped with the group
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        killed = subprocess.Popen([sys.executable, runner(tmp_path), point, *FAST, f"run.dir={run_dir}"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert killed.wait(timeout=600) == 137, log.read_text()[-3000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(killed.pid, signal.SIGKILL)
    checkpoints = run_dir / "stages/train/checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    # the marker names a complete checkpoint: step 2, or step 4 once its rename and marker landed
    assert latest == ("step_00000004" if point == "before-delete" else "step_00000002")
    assert (checkpoints / latest / "metadata.json").is_file()
    resumed = cli(run_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed train from {checkpoints / latest}" in resumed.stdout + resumed.stderr
    assert train_losses(run_dir) == uninterrupted  # every step once, bitwise equal
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob(".*.tmp"))
