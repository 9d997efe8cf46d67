"""Bad input fails before any work: every case below raises a MegaropeError naming the field as
the user wrote it, before the run folder exists (the Python API, in process); a sample of them
through the CLI exits 2 with ``error: <field>: ...`` and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megarope.__main__ import CONFIG_DIR, run
from megarope.errors import MegaropeError
from megarope.run.config import register_configs, validate
from megarope.run.pipeline import resolve_stages


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad data files and model folders, each with one thing wrong."""
    root = tmp_path_factory.mktemp("bad")
    good_line = json.dumps({"text": "word " * 400})
    (root / "bad_json.jsonl").write_text(f"{good_line}\n{good_line}\n{{not json\n")
    (root / "no_text.jsonl").write_text("\n".join(json.dumps({"body": "word " * 400}) for _ in range(4)) + "\n")
    (root / "empty_model").mkdir()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "no_weights")
    for weights in (root / "no_weights").glob("*.safetensors"):
        weights.unlink()
    LlamaForCausalLM(cfg).save_pretrained(root / "wrong_shapes")
    config = json.loads((root / "wrong_shapes" / "config.json").read_text())
    config["hidden_size"] = 64
    (root / "wrong_shapes" / "config.json").write_text(json.dumps(config))
    return {p.name: p for p in root.iterdir()}


SEARCH_STAGE = "stages=[{name: s, kind: search, target_length: 256}]"

# (id, overrides, field named in the error); "{name}" is a path from `files`
CASES = [
    # config
    ("steps", ["train.steps=0"], "train.steps"),
    ("epochs", ["train.epochs=-1"], "train.epochs"),
    ("batch", ["train.global_batch_size=0"], "train.global_batch_size"),
    ("lr", ["train.lr=-1"], "train.lr"),
    ("warmup", ["train.warmup_steps=-2"], "train.warmup_steps"),
    ("schedule", ["train.schedule=exponential"], "train.schedule"),
    ("checkpoint-every", ["checkpoint.every=-1"], "checkpoint.every"),
    ("checkpoint-keep", ["checkpoint.keep=0"], "checkpoint.keep"),
    ("log-every", ["train.log_every=0"], "train.log_every"),
    # stages
    ("stage-kind", ["stages=[{name: a, kind: bogus}]"], "stages[0].kind"),
    ("stage-name", ["stages=[{name: a, kind: train}, {name: a, kind: eval}]"], "stages[1].name"),
    ("stage-init", ["stages=[{name: e, kind: eval, init: nope}]"], "stages[0].init"),
    ("stage-factor-file", ["stages=[{name: e, kind: eval, factors: /no/such/factors.json}]"], "stages[0].factors"),
    ("stage-factors-later", ["stages=[{name: e, kind: eval, factors: s}, {name: s, kind: search, target_length: 256}]"],
     "stages[0].factors"),
    ("stage-target", ["stages=[{name: e, kind: eval, target_length: -128}]"], "stages[0].target_length"),
    # methods
    ("method-factor", ["method.rope_type=linear", "+method.factor=0.5"], "method.factor"),
    ("method-type", ["method.rope_type=nosuch"], "method.rope_type"),
    ("stage-method-factor", ["stages=[{name: e, kind: eval, method: {rope_type: linear, factor: 0.5}}]"],
     "stages[0].method.factor"),
    ("yarn-window", ["stages=[{name: e, kind: eval, target_length: 256, method: {rope_type: yarn, factor: 2.0, "
                     "original_max_position_embeddings: 262144}}]"],
     "stages[0].method.original_max_position_embeddings"),
    ("longrope-length", ["stages=[{name: e, kind: eval, target_length: 256, method: {rope_type: longrope, "
                         "long_factor: [1.0, 2.0], short_factor: [1.0, 1.0]}}]"], "stages[0].method.long_factor"),
    # search
    ("search-population", [SEARCH_STAGE, "search.population=2", "search.topk=8"], "search.population"),
    ("search-mutation-prob", [SEARCH_STAGE, "search.mutation_prob=2"], "search.mutation_prob"),
    ("search-docs", [SEARCH_STAGE, "search.num_docs=0"], "search.num_docs"),
    ("search-scale", [SEARCH_STAGE, "search.scale=4"], "search.scale"),
    ("search-target", ["stages=[{name: s, kind: search}]"], "stages.s.target_length"),
    # eval
    ("eval-length-zero", ["eval.lengths=[0]"], "eval.lengths[0]"),
    ("eval-length-huge", ["eval.lengths=[128,100000000]"], "eval.lengths[1]"),
    ("eval-docs", ["eval.num_docs=0"], "eval.num_docs"),
    ("passkey-depth", ["eval.passkey_lengths=[256]", "eval.passkey_depths=[1.5]"], "eval.passkey_depths"),
    ("passkey-short", ["eval.passkey_lengths=[8]"], "eval.passkey_lengths"),
    ("passkey-per-depth", ["eval.passkey_lengths=[256]", "eval.passkey_per_depth=0"], "eval.passkey_per_depth"),
    # data
    ("data-missing", ["data.source=/no/such/data.jsonl"], "data.source"),
    ("data-bad-json", ["data.source={bad_json.jsonl}"], "data.source"),  # names file:3, checked below
    ("data-text-key", ["data.source={no_text.jsonl}"], "data.text_key"),
    ("data-seq-len", ["data.seq_len=100000000"], "data.seq_len"),
    ("data-kind", ["data.kind=chat"], "data.kind"),
    ("tokenizer", ["data.tokenizer=/no/such/tokenizer"], "data.tokenizer"),
    # model folder
    ("model-missing", ["model.path=/no/such/checkpoint"], "model.path"),
    ("model-no-config", ["model.path={empty_model}"], "model.path"),
    ("model-no-weights", ["model.path={no_weights}"], "model.path"),
    ("model-wrong-shapes", ["model.path={wrong_shapes}"], "model.path"),
    # parallel (one process)
    ("tp-world", ["parallel.tp=2"], "parallel.tp"),
    ("micro-batch", ["parallel.micro_batch_size=3"], "train.global_batch_size"),
    ("cp-zero", ["parallel.cp=0"], "parallel.cp"),
]


def _config(overrides: list[str], run_dir: Path):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=tiny", f"run.dir={run_dir}", *overrides])
    return OmegaConf.to_object(cfg)


def _fill(overrides: list[str], files: dict[str, Path]) -> list[str]:
    for name, path in files.items():
        overrides = [o.replace("{" + name + "}", str(path)) for o in overrides]
    return overrides


def test_enough_distinct_cases():
    assert len({field for _, _, field in CASES}) >= 30 and len(CASES) == len({c[0] for c in CASES})


@pytest.mark.parametrize("overrides,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_before_any_work(overrides, field, files, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(MegaropeError) as err:
        run(_config(_fill(overrides, files), run_dir))
    assert field in [e.field for e in getattr(err.value, "errors", [err.value])], str(err.value)
    assert not run_dir.exists()


@pytest.mark.parametrize("world_size,overrides,field", [
    (2, ["parallel.cp=2", "data.seq_len=66"], "data.seq_len"),
    (3, ["parallel.pp=3"], "parallel.pp"),
    (4, ["parallel.tp=4", "parallel.sp=true", "eval.lengths=[130]"], "eval.lengths[0]"),
])
def test_parallel_settings_against_the_world_size(world_size, overrides, field, tmp_path):
    cfg = _config(overrides, tmp_path / "run")
    cfg.stages = resolve_stages(cfg.stages)
    with pytest.raises(MegaropeError) as err:
        validate(cfg, world_size=world_size)
    assert field in [e.field for e in getattr(err.value, "errors", [err.value])], str(err.value)


def test_a_bad_record_is_named_by_file_and_line(files, tmp_path):
    with pytest.raises(MegaropeError, match=r"bad_json.jsonl:3: not valid JSON"):
        run(_config([f"data.source={files['bad_json.jsonl']}"], tmp_path / "run"))


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(MegaropeError) as err:
        run(_config(["train.steps=0", "eval.lengths=[0]", "eval.passkey_lengths=[256]",
                     "eval.passkey_depths=[1.5]"], tmp_path / "run"))
    assert {"train.steps", "eval.lengths[0]", "eval.passkey_depths"} <= {e.field for e in err.value.errors}


@pytest.mark.parametrize("overrides,field", [
    (["eval.lengths=[0]"], "eval.lengths[0]"),
    (["model.path={empty_model}"], "model.path"),
    (["stages=[{name: e, kind: eval, method: {rope_type: linear, factor: 0.5}}]"], "stages[0].method.factor"),
], ids=["eval-length", "model-folder", "stage-method"])
def test_cli_exits_2_naming_the_field_without_traceback(overrides, field, files, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "megarope", "recipe=tiny", f"run.dir={run_dir}",
                           *_fill(overrides, files)], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"error: {field}: " in out and "Traceback" not in out
    assert not run_dir.exists()


def test_main_job_refuses_a_bad_later_stage_before_pre_training(tmp_path):
    """The search settings are the 9th stage's business; they fail before stage 1 trains."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "megarope", "recipe=main", f"run.dir={run_dir}",
                           "search.population=2", "search.topk=8"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "error: search.population: " in out and "Traceback" not in out
    assert "stage 1/" not in out and "pretrain" not in out and not run_dir.exists()
