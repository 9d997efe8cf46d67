"""The CLI end to end: config tree, bad input, and runs killed then resumed (bitwise on CPU)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from megarope.__main__ import CONFIG_DIR
from megarope.eval.metrics import read_metrics
from megarope.run.config import Config, register_configs

FAST = ["data.seq_len=64", "train.global_batch_size=4", "train.steps=6", "stages=[{name: train, kind: train}]"]


def megarope_cmd(*overrides, run_dir):
    return [sys.executable, "-m", "megarope", "recipe=tiny", f"run.dir={run_dir}", *overrides]


def run_cli(*overrides, run_dir, check=True, timeout=300):
    proc = subprocess.run(megarope_cmd(*overrides, run_dir=run_dir), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if r.get("stage") == "train"}


def test_compose_with_overrides():
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=tiny", "parallel.tp=2", "train.steps=3",
                                                       "checkpoint.every=1", "method=yarn", "+method.factor=8"])
    assert cfg.recipe == "tiny" and cfg.parallel.tp == 2 and cfg.train.steps == 3 and cfg.checkpoint.every == 1
    assert cfg.method.rope_type == "yarn" and cfg.method.factor == 8
    assert [s.kind for s in cfg.stages] == ["train", "eval"]
    assert cfg.run.dir.startswith("runs/tiny-")
    from omegaconf import OmegaConf

    assert isinstance(OmegaConf.to_object(cfg), Config)


def test_cfg_job_prints_full_config():
    out = subprocess.run([sys.executable, "-m", "megarope", "recipe=tiny", "--cfg", "job"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in ("model:", "method:", "parallel:", "data:", "train:", "eval:", "checkpoint:", "run:", "stages:"):
        assert key in out.stdout


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["recipe=no_such_recipe"], "recipe"),
        (["train.stepz=3"], "stepz"),
        (["train.steps=0"], "train.steps"),
        (["model.path=/no/such/checkpoint"], "model.path"),
        (["data.seq_len=100000000"], "data.seq_len"),
        (["method.rope_type=linear", "+method.factor=0.5"], "method.factor"),
    ],
    ids=["unknown-recipe", "unknown-key", "steps", "checkpoint-path", "too-few-tokens", "bad-factor"],
)
def test_bad_input_fails_early_naming_the_field(tmp_path, overrides, field):
    run_dir = tmp_path / "run"
    proc = run_cli(*overrides, run_dir=run_dir, check=False, timeout=180)
    assert proc.returncode != 0
    assert field in proc.stdout + proc.stderr
    # nothing half-written: no metrics, no checkpoints (the run folder holds at most the config)
    leftovers = [p for p in run_dir.rglob("*") if p.is_file() and p.name != "config.yaml"] if run_dir.exists() else []
    assert leftovers == []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_cli(*FAST, run_dir=run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 7))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["train"]["steps"] == 6
    return losses


def _start(run_dir, *extra):
    return subprocess.Popen(megarope_cmd(*FAST, *extra, run_dir=run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc):
    # ends when the run reaches the state or exits without it; a hang is pytest-timeout's
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(lambda: len(train_losses(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped_at = max(train_losses(run_dir))
    assert stopped_at < 6 and (run_dir / "stages/train/checkpoints/latest").is_file()
    assert not (run_dir / "summary.json").exists()
    run_cli(*FAST, run_dir=run_dir)
    assert train_losses(run_dir) == uninterrupted  # exact float equality at every step


def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "checkpoint.every=2")
    latest = run_dir / "stages/train/checkpoints/latest"
    _wait_for(lambda: latest.is_file(), proc)
    proc.kill()
    proc.wait()
    assert latest.read_text().strip() == "step_00000002" or latest.read_text().strip().startswith("step_")
    run_cli(*FAST, "checkpoint.every=2", run_dir=run_dir)
    assert train_losses(run_dir) == uninterrupted
    assert not list((run_dir / "stages/train/checkpoints").glob("*.tmp"))


def test_tiny_recipe_trains_and_evaluates(tmp_path):
    run_cli(run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r.get("stage") == "train"]
    # the work the smoke recipe stays small by: its 10 steps at batch 8 x 128 tokens, two eval lengths
    assert [r["step"] for r in train] == list(range(1, 11))
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in rows if r.get("stage") == "eval"]
    assert sorted(r["length"] for r in evals) == [128, 256] and all(r["ppl"] > 1 for r in evals)
    assert all(r["num_docs"] == 2 for r in evals)


def test_init_optimizer_stage_continues_from_the_saved_adam_state(tmp_path):
    """Through the CLI: a stage with ``init_optimizer`` starts from its init stage's weights and
    Adam moments under its own lr; a weights-only stage from the same init first agrees with it
    (same weights, same batch), then differs (fresh moments)."""
    run_dir = tmp_path / "run"
    steps = "train: {steps: 3, lr: 1.0e-3, warmup_steps: 0, schedule: constant}"
    run_cli("data.seq_len=64", "train.global_batch_size=4", "train.steps=3", "train.schedule=constant",
            "train.warmup_steps=0", "train.lr=3.0e-3",
            f"stages=[{{name: first, kind: train}},"
            f" {{name: adam, kind: train, init: first, init_optimizer: true, overrides: {{{steps}}}}},"
            f" {{name: fresh, kind: train, init: first, overrides: {{{steps}}}}}]", run_dir=run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    adam, fresh = ([r for r in rows if r.get("stage") == name] for name in ("adam", "fresh"))
    assert [r["step"] for r in adam] == [r["step"] for r in fresh] == [1, 2, 3]
    assert {r["lr"] for r in adam} == {1.0e-3}
    assert adam[0]["loss"] == fresh[0]["loss"]
    assert adam[1]["loss"] != fresh[1]["loss"] and adam[2]["loss"] != fresh[2]["loss"]


def test_dynamic_ntk_in_a_stage_scales_past_the_original_window(tmp_path):
    """A stage's dynamic NTK keeps the model's window as its own (transformers reads it from
    max_position_embeddings), so the scaling starts past 128 tokens, not past the target."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megarope import RopeConfig

    run_dir = tmp_path / "run"
    run_cli("eval.lengths=[128,1024]", "eval.num_docs=1",
            "stages=[{name: original, kind: eval}, {name: dynamic, kind: eval, target_length: 1024,"
            " method: {rope_type: dynamic}}]", run_dir=run_dir)
    original, dynamic = (json.loads((run_dir / f"stages/{s}/done.json").read_text()) for s in ("original", "dynamic"))
    assert dynamic["ppl"]["128"] == original["ppl"]["128"]  # inside the window: the unscaled RoPE
    assert dynamic["ppl"]["1024"] != original["ppl"]["1024"]
    rope = RopeConfig.from_dict(dynamic["rope"])
    assert rope.max_position_embeddings == 128 and rope.factor == 8.0
    hf = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=128,
                     rope_scaling={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10_000.0})
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, None, seq_len=1024)
    torch.testing.assert_close(rope.inv_freq(1024).float(), expected.float())
    assert not torch.allclose(rope.inv_freq(1024), rope.inv_freq(128))
