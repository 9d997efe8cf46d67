"""The pipeline: a recipe's stages run in order, each writing its outputs under ``<run.dir>/stages/<name>``.

A stage that finished has ``done.json``; a requeued or restarted job skips it and resumes the
first unfinished stage (training from its latest checkpoint, a search from its state file).
Stage kinds:

- ``train``: fine-tune (or pre-train) with the stage's RoPE method; checkpoints in ``checkpoints/``;
  ``train.epochs`` > 0 derives the step count from the number of training samples;
- ``eval``: perplexity at ``eval.lengths`` and passkey retrieval at ``eval.passkey_lengths``;
- ``search``: LongRoPE evolutionary search at ``target_length``; ``factors.json`` (Hugging Face
  ``rope_scaling`` format), ``search_state.json`` (resume) and ``plots/``. With ``search.short`` it
  searches ``short_factor`` at the original window instead, keeping the long factors and n̂ of the
  stage's ``factors`` (or of a LongRoPE model) in the file it writes;
- ``export``: a Hugging Face folder (``model/``, with the tokenizer) whose config.json carries the
  stage's RoPE keys;
- ``report``: ``report.md`` and plots from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megarope.atomic import atomic_write_text
from megarope.rope.config import RopeConfig, RopeConfigError
from megarope.rope.methods import METHODS
from megarope.run import checkpoint
from megarope.run.config import Config, ConfigError, StageConfig
from megarope.run.data import DataConfig, DataIterator, build_samples, eval_documents, load_documents
from megarope.run.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Pipeline:
    def __init__(self, cfg: Config):
        from megarope.eval.metrics import MetricsWriter

        self.cfg = cfg
        self.dir = Path(cfg.run.dir)
        self.tokenizer = load_tokenizer(cfg.model.path or cfg.data.tokenizer)
        self.metrics = MetricsWriter(self.dir / "metrics.jsonl", enabled=is_rank0())
        self.base_rope = self._base_rope()
        self._samples: dict[str, Any] = {}

    # ------------------------------------------------------------------------- configuration
    def _base_rope(self) -> RopeConfig:
        """The model's own RoPE (checkpoint config.json, or the tiny model's plain RoPE)."""
        if self.cfg.model.path:
            from megarope.hf.convert import read_hf_config, rope_from_hf_config

            return rope_from_hf_config(read_hf_config(self.cfg.model.path))
        m = self.cfg.model
        return RopeConfig(head_dim=m.hidden_size // m.num_attention_heads, rope_theta=m.rope_theta,
                          max_position_embeddings=m.window)

    @property
    def window(self) -> int:
        return self.base_rope.original_max_position_embeddings or self.base_rope.max_position_embeddings

    def stage_config(self, stage: StageConfig) -> Config:
        """The run config with the stage's ``overrides`` merged in."""
        base = OmegaConf.structured(self.cfg)
        merged = OmegaConf.merge(base, OmegaConf.create(dict(stage.overrides)))
        return OmegaConf.to_object(merged)

    def factor_file(self, ref: str) -> Path:
        """``factors`` of a stage: an earlier search stage's ``factors.json``, or a factor file path."""
        return Path(ref) if ref.endswith(".json") else self.stage_dir(ref) / "factors.json"

    def rope_for(self, stage: StageConfig, cfg: Config) -> RopeConfig:
        """The stage's RoPE: a factor file (of an earlier search), or ``method`` over the model's base.
        A method that needs ``factor`` and leaves it out gets target_length / window."""
        if stage.factors:
            return RopeConfig.from_hf(json.loads(self.factor_file(stage.factors).read_text()))
        method = {**cfg.method, **stage.method}
        rope_type = method.get("rope_type", "default")
        if rope_type == "default" and len(method) <= 1:
            return self.base_rope
        if stage.target_length and "factor" not in method and rope_type in METHODS \
                and "factor" in METHODS[rope_type].required:
            method["factor"] = stage.target_length / self.window
        values: dict[str, Any] = {
            "head_dim": self.base_rope.head_dim,
            "rope_theta": self.base_rope.rope_theta,
            "partial_rotary_factor": self.base_rope.partial_rotary_factor,
            "original_max_position_embeddings": self.window,
            "max_position_embeddings": stage.target_length or self.window,
        }
        values.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in method.items()})
        try:
            return RopeConfig.from_dict(values)
        except RopeConfigError as err:
            raise ConfigError(f"method.{err}") from err

    def stage_dir(self, name: str) -> Path:
        return self.dir / "stages" / name

    def _done(self, stage: StageConfig) -> bool:
        return (self.stage_dir(stage.name) / "done.json").is_file()

    def _mark_done(self, stage: StageConfig, info: dict) -> None:
        if is_rank0():
            atomic_write_text(self.stage_dir(stage.name) / "done.json", json.dumps(info, indent=2) + "\n")
        _barrier()

    # ------------------------------------------------------------------------- running
    def train_samples(self, stage: StageConfig, cfg: Config):
        """The stage's training samples (cached: the preflight builds them once)."""
        seq_len = stage.target_length or cfg.data.seq_len
        data_cfg = DataConfig(**{**asdict(cfg.data), "seq_len": seq_len})
        key = json.dumps(asdict(data_cfg), sort_keys=True)
        if key not in self._samples:
            samples = build_samples(data_cfg, "train", self.tokenizer)
            if len(samples) < cfg.train.global_batch_size:
                raise ConfigError(f"data.seq_len: only {len(samples)} training samples of {seq_len} tokens, fewer than "
                                  f"train.global_batch_size={cfg.train.global_batch_size}")
            self._samples[key] = samples
        return self._samples[key]

    def preflight(self) -> None:
        """Everything that can fail on bad input, before any stage writes anything."""
        for stage in self.cfg.stages:
            if self._done(stage):
                continue
            cfg = self.stage_config(stage)
            if stage.kind != "report" and not stage.factors:
                self.rope_for(stage, cfg)
            if stage.kind == "train":
                self.train_samples(stage, cfg)
            if stage.kind == "search" and cfg.search.short:
                self._short_length(stage)
                if not stage.factors:
                    self._long_factors(stage)

    def run(self) -> dict:
        start = time.monotonic()
        self.preflight()
        if is_rank0():
            self.dir.mkdir(parents=True, exist_ok=True)
            config = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
            atomic_write_text(self.dir / "config.yaml", config)
        log.info("run.dir = %s", self.dir)
        results = {}
        for i, stage in enumerate(self.cfg.stages):
            if self._done(stage):
                log.info("stage %d/%d %s: already done, skipped", i + 1, len(self.cfg.stages), stage.name)
                results[stage.name] = json.loads((self.stage_dir(stage.name) / "done.json").read_text())
                continue
            log.info("stage %d/%d %s (%s)", i + 1, len(self.cfg.stages), stage.name, stage.kind)
            if is_rank0():
                self.stage_dir(stage.name).mkdir(parents=True, exist_ok=True)
            _barrier()
            info = getattr(self, f"_{stage.kind}")(stage, self.stage_config(stage))
            self._mark_done(stage, info)
            results[stage.name] = info
        summary = {"recipe": self.cfg.recipe, "run_dir": str(self.dir), "stages": results,
                   "elapsed_s": round(time.monotonic() - start, 2)}
        if is_rank0():
            atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _engine(self, stage: StageConfig, cfg: Config, rope: RopeConfig, train_steps: int | None = None):
        from megarope.run.engine import Engine

        engine = Engine(cfg, rope, self.tokenizer.vocab_size, train_steps=train_steps)
        if stage.init:
            ckpt = checkpoint.latest(self.stage_dir(stage.init) / "checkpoints")
            if ckpt is None:
                raise ConfigError(f"stages.{stage.name}.init: stage {stage.init!r} left no checkpoint")
            checkpoint.load(engine, ckpt, model_only=True)
            engine.set_rope(rope)  # the checkpoint carries the init stage's RoPE; this stage's wins
        return engine

    def _train(self, stage: StageConfig, cfg: Config) -> dict:
        rope = self.rope_for(stage, cfg)
        seq_len = stage.target_length or cfg.data.seq_len
        samples = self.train_samples(stage, cfg)
        steps = cfg.train.steps
        if cfg.train.epochs:
            steps = cfg.train.epochs * (len(samples) // cfg.train.global_batch_size)
            log.info("%s: %d epochs of %d samples at batch %d = %d steps", stage.name, cfg.train.epochs,
                     len(samples), cfg.train.global_batch_size, steps)
        engine = self._engine(stage, cfg, rope, train_steps=steps)
        per_rank = cfg.train.global_batch_size // engine.dp_size
        batches = DataIterator(samples, per_rank, seed=cfg.train.seed, dp_rank=engine.dp_rank, dp_size=engine.dp_size)
        ckpt_root = self.stage_dir(stage.name) / "checkpoints"
        step = 0
        resume = checkpoint.latest(ckpt_root)
        if resume is not None:
            common = checkpoint.load(engine, resume)
            step = common["step"]
            batches.load_state_dict(common["data"])
            log.info("resumed %s from %s (step %d)", stage.name, resume, step)
        mbs = cfg.parallel.micro_batch_size
        tokens_per_step = cfg.train.global_batch_size * seq_len
        loss = float("nan")
        with checkpoint.StopSignal() as stop:
            started = time.monotonic()
            first = step
            while step < steps:
                batch = next(batches)
                micro = [{k: v[i : i + mbs] for k, v in batch.items() if k != "cu_seqlens"}
                         for i in range(0, per_rank, mbs)]
                out = engine.train_step(micro)
                step += 1
                loss = out["loss"]
                elapsed = time.monotonic() - started
                rate = tokens_per_step * (step - first) / max(elapsed, 1e-9)
                self.metrics.write({"stage": stage.name, "step": step, "loss": loss, "lr": engine.lr,
                                    "grad_norm": out["grad_norm"], "tokens_per_s": rate})
                if step % cfg.train.log_every == 0 or step == steps:
                    eta = (steps - step) * elapsed / (step - first)
                    log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s eta %.0fs", stage.name, step,
                             steps, loss, engine.lr, rate, eta)
                final = step == steps
                stopping = stop.requested()
                if final or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    checkpoint.save(engine, ckpt_root, step, {"data": batches.state_dict()}, keep=cfg.checkpoint.keep)
                if stopping and not final:
                    raise checkpoint.Interrupted(stop.received)
        return {"kind": "train", "steps": step, "final_loss": loss, "rope": rope.to_dict()}

    def _eval(self, stage: StageConfig, cfg: Config) -> dict:
        from megarope.eval.passkey import passkey_samples
        from megarope.run.engine import lm_sample

        rope = self.rope_for(stage, cfg)
        engine = self._engine(stage, cfg, rope)
        docs = load_documents(cfg.data, "eval")
        table = {}
        for length in cfg.eval.lengths:
            rows = eval_documents(docs, self.tokenizer, length + 1, cfg.eval.num_docs, cfg.data.text_key)
            ppl = engine.perplexity(lm_sample(row) for row in rows)
            table[length] = ppl
            self.metrics.write({"stage": "eval", "run_stage": stage.name, "method": stage.name, "length": length,
                                "ppl": ppl, "num_docs": len(rows)})
            log.info("%s length %d ppl %.3f", stage.name, length, ppl)
        passkey = {}
        for length in cfg.eval.passkey_lengths:
            samples = passkey_samples(self.tokenizer, length + 1, cfg.eval.passkey_depths, cfg.eval.passkey_per_depth,
                                      cfg.eval.seed)
            scored = engine.score([_passkey_sample(s) for s in samples])
            for depth in cfg.eval.passkey_depths:
                idx = [i for i, s in enumerate(samples) if s["depth"] == depth]
                accuracy = sum(scored[i, 2].item() == 0 for i in idx) / len(idx)
                passkey[f"{length}@{depth}"] = accuracy
                self.metrics.write({"stage": "passkey", "run_stage": stage.name, "method": stage.name,
                                    "length": length, "depth": depth, "accuracy": accuracy, "num_samples": len(idx)})
        return {"kind": "eval", "ppl": table, "passkey": passkey, "rope": rope.to_dict()}

    def _search(self, stage: StageConfig, cfg: Config) -> dict:
        from megarope.search.evolution import SearchConfig, to_rope_config

        s = cfg.search
        # the run's search knobs that SearchConfig shares (n̂ candidates depend on the kind of search)
        shared = {f.name for f in fields(SearchConfig)} - {"n_hat_candidates"}
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in asdict(s).items() if k in shared}
        if s.short:
            # paper §3.3: the long factors and n̂ stay; short_factor is searched where transformers
            # uses it (inputs up to the original window), with a lower maximum λ
            long_rc = self.rope_for(stage, cfg) if stage.factors else self._long_factors(stage)
            search_cfg = SearchConfig.for_rope(long_rc, s.short_scale, n_hat_candidates=(long_rc.n_hat,), **knobs)
            return self._run_search(stage, cfg, search_cfg, long_rc, self._short_length(stage),
                                    lambda candidate: long_rc.replace(short_factor=candidate.factors),
                                    {"short": True, "short_scale": s.short_scale})
        if not stage.target_length:
            raise ConfigError(f"stages.{stage.name}.target_length: a search stage needs its target length")
        base = self.rope_for(stage, cfg) if (stage.method or stage.factors) else self.base_rope
        scale = stage.target_length / self.window
        search_cfg = SearchConfig.for_rope(
            base.replace(rope_type="default", max_position_embeddings=self.window) if base.rope_type != "longrope"
            else base, scale, n_hat_candidates=tuple(s.n_hat_candidates), **knobs)
        model_base = self.base_rope
        return self._run_search(stage, cfg, search_cfg, base, stage.target_length,
                                lambda candidate: to_rope_config(candidate, model_base, scale), {"short": False})

    def _short_length(self, stage: StageConfig) -> int:
        length = stage.target_length or self.window
        if length > self.window:
            raise ConfigError(f"stages.{stage.name}.target_length: a short search (search.short) scores short factors "
                              f"at the original window {self.window} or below, got {length}; longer inputs use the "
                              "long factors")
        return length

    def _long_factors(self, stage: StageConfig) -> RopeConfig:
        """The model's own LongRoPE configuration, for a short search without ``factors``."""
        if self.base_rope.rope_type != "longrope":
            raise ConfigError(f"stages.{stage.name}.factors: a short search (search.short) keeps the long factors of "
                              "an earlier search stage or factor file, or of a LongRoPE model (model.path), but the "
                              f"model's RoPE is {self.base_rope.rope_type!r}")
        return self.base_rope

    def _run_search(self, stage: StageConfig, cfg: Config, search_cfg, start_rope: RopeConfig, length: int,
                    rope_of, extra: dict) -> dict:
        """Search with fitness = perplexity at ``length`` of ``rope_of(candidate)``; write the best
        as ``factors.json`` and the plots."""
        from megarope.run.engine import lm_sample
        from megarope.search.distributed import score_distributed
        from megarope.search.evolution import LongRopeSearch, write_factor_file
        from megarope.search.plots import plot_search

        engine = self._engine(stage, cfg, start_rope)
        rows = eval_documents(load_documents(cfg.data, "eval"), self.tokenizer, length + 1, cfg.search.num_docs,
                              cfg.data.text_key)
        samples = [lm_sample(row) for row in rows]

        def score_one(candidate):
            engine.set_rope(rope_of(candidate))
            return engine.perplexity(samples, split_over_dp=False)

        def fitness(candidates):
            # candidates spread over the data-parallel replicas, each scoring on all documents
            return score_distributed(candidates, score_one, group=engine.dp_group)

        def record(result):
            last = result.history[-1]
            self.metrics.write({"stage": "search", "run_stage": stage.name, "generation": last["generation"],
                                "best_ppl": last["best_ppl"], "mean_ppl": last["mean_ppl"], "length": length})

        out_dir = self.stage_dir(stage.name)
        search = LongRopeSearch(search_cfg, fitness, state_path=out_dir / "search_state.json", on_generation=record)
        result = search.run()
        rope = rope_of(result.best)
        if is_rank0():
            write_factor_file(out_dir / "factors.json", rope, {"ppl": result.best_ppl, "generation": result.generation,
                                                               "target_length": length, **extra})
            plot_search(result, search_cfg, out_dir / "plots")
        _barrier()
        return {"kind": "search", "best_ppl": result.best_ppl, "length": length, "n_hat": result.best.n_hat,
                "factors": list(result.best.factors), **extra}

    def _export(self, stage: StageConfig, cfg: Config) -> dict:
        from megarope.hf.convert import read_hf_config, to_hf

        rope = self.rope_for(stage, cfg)
        engine = self._engine(stage, cfg, rope)
        hf_config = read_hf_config(cfg.model.path) if cfg.model.path else self._tiny_hf_config(cfg)
        if is_rank0():
            folder = to_hf(engine.model, self.stage_dir(stage.name) / "model", hf_config, rope)
            self.tokenizer.save_pretrained(folder)  # a complete folder: later runs load it as model.path
        _barrier()
        return {"kind": "export", "path": str(self.stage_dir(stage.name) / "model"), "rope": rope.to_dict()}

    def _tiny_hf_config(self, cfg: Config):
        from transformers import LlamaConfig

        from megarope.run.engine import padded_vocab

        m = cfg.model
        return LlamaConfig(vocab_size=padded_vocab(self.tokenizer.vocab_size, cfg.parallel.tp), hidden_size=m.hidden_size,
                           intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                           num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                           max_position_embeddings=m.window, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id)

    def _report(self, stage: StageConfig, cfg: Config) -> dict:
        from megarope.eval.report import write_report

        if is_rank0():
            ropes = {}
            for other in self.cfg.stages:
                done = self.stage_dir(other.name) / "done.json"
                if other.kind == "eval" and done.is_file():
                    ropes[other.name] = json.loads(done.read_text())["rope"]
            write_report(self.dir, title=f"megarope {self.cfg.recipe}", rope_configs=ropes)
        _barrier()
        return {"kind": "report", "path": str(self.dir / "report.md")}


def _passkey_sample(sample: dict) -> dict:
    from megarope.run.engine import lm_sample

    mask = torch.zeros(sample["tokens"].numel())
    mask[torch.as_tensor(sample["answer_positions"])] = 1.0
    return lm_sample(sample["tokens"], mask)


def default_stages(cfg: Config) -> list[StageConfig]:
    """Without ``stages``: one training stage and one evaluation of its result."""
    return [StageConfig(name="train", kind="train"), StageConfig(name="eval", kind="eval", init="train")]
