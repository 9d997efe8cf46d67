"""What the stages of one run share (:class:`RunContext`), what one stage gets (:class:`StageContext`)
and what a stage kind is (:class:`StageKind`, the entries of ``megarope.run.stages.STAGES``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from megarope import dist
from megarope.data.config import DataConfig
from megarope.data.samples import build_samples
from megarope.data.tokenizer import load_tokenizer
from megarope.eval.metrics import MetricsWriter, TensorBoardSink, WandbSink
from megarope.rope.config import RopeConfig, RopeConfigError
from megarope.rope.methods import METHODS
from megarope.run import checkpoint
from megarope.run.config import Config, ConfigError, StageConfig


class RunContext:
    """The run's config, folder, tokenizer, metrics file and the model's own RoPE; the stages'
    derived inputs (their RoPE, training samples, engine) are built here, once per request."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.run.dir)
        self.tokenizer = load_tokenizer(cfg.model.path or cfg.data.tokenizer)
        # one writer, decided from the launcher's environment: rank 0 of the whole job
        self.metrics = MetricsWriter(self.dir / "metrics.jsonl", enabled=dist.is_rank0(), sinks=self._sinks())
        self.base_rope = self._base_rope()
        self._samples: dict[str, Any] = {}
        self.checked: set[str] = set()  # settings a stage check passed (stages sharing them skip it)

    def _sinks(self) -> list:
        """The dashboards ``log`` switches on (created at the first metrics row)."""
        log, sinks = self.cfg.log, []
        if log.tensorboard:
            sinks.append(lambda: TensorBoardSink(self.dir / "tensorboard"))
        if log.wandb:
            sinks.append(lambda: WandbSink(self.dir / "wandb", project=log.wandb_project, name=self.dir.name,
                                           mode=log.wandb_mode))
        return sinks

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
        """The model's pre-training window."""
        return self.base_rope.original_max_position_embeddings or self.base_rope.max_position_embeddings

    def stage_dir(self, name: str) -> Path:
        return self.dir / "stages" / name

    def done_info(self, name: str) -> dict | None:
        """What stage ``name`` returned when it finished (its ``done.json``), None if it has not."""
        path = self.stage_dir(name) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def factor_file(self, ref: str) -> Path:
        """``factors`` of a stage: an earlier search stage's ``factors.json``, or a factor file path."""
        return Path(ref) if ref.endswith(".json") else self.stage_dir(ref) / "factors.json"

    def stage(self, stage: StageConfig) -> StageContext:
        """The context of ``stage``: the run config with the stage's ``overrides`` merged in."""
        base = OmegaConf.structured(replace(self.cfg, stages=[]))
        merged = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(dict(stage.overrides))))
        return StageContext(run=self, stage=stage, cfg=merged)


@dataclass
class StageContext:
    """One stage: its typed entry, the run config as this stage sees it, and the run's shared parts."""

    run: RunContext
    stage: StageConfig
    cfg: Config

    @property
    def dir(self) -> Path:
        return self.run.stage_dir(self.stage.name)

    @property
    def metrics(self) -> MetricsWriter:
        return self.run.metrics

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def factors_pending(self) -> bool:
        """``factors`` names a stage of this run that has not finished yet: its factor file does not
        exist before that stage runs, so the preflight checks the link, not the file."""
        ref = self.stage.factors
        return bool(ref) and not ref.endswith(".json") and self.run.done_info(ref) is None

    @cached_property
    def rope(self) -> RopeConfig:
        """The stage's RoPE: a factor file (of an earlier search), or ``method`` over the model's
        base. A method that needs ``factor`` and leaves it out gets target_length / window; the
        field a method reads as its original window (``Method.window_field``) gets the model's."""
        stage, base = self.stage, self.run.base_rope
        if stage.factors:
            return RopeConfig.from_hf(json.loads(self.run.factor_file(stage.factors).read_text()))
        method = {**self.cfg.method, **stage.method}
        rope_type = method.get("rope_type", "default")
        if rope_type == "default" and len(method) <= 1:
            return base
        if stage.target_length and "factor" not in method and rope_type in METHODS \
                and "factor" in METHODS[rope_type].required:
            method["factor"] = stage.target_length / self.run.window
        values: dict[str, Any] = {
            "head_dim": base.head_dim, "rope_theta": base.rope_theta,
            "partial_rotary_factor": base.partial_rotary_factor, "original_max_position_embeddings": self.run.window,
            "max_position_embeddings": stage.target_length or self.run.window,
        }
        if rope_type in METHODS:
            # the field the method reads as its original window gets the model's, whatever the
            # target: dynamic NTK's is max_position_embeddings, and a target there would leave
            # every length up to the target unscaled
            values[METHODS[rope_type].window_field] = self.run.window
        values.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in method.items()})
        try:
            return RopeConfig.from_dict(values)
        except RopeConfigError as err:
            # named where the user wrote it: the stage's own `method`, else the run's
            index = [s.name for s in self.run.cfg.stages].index(stage.name)
            where = f"stages[{index}].method" if err.field in stage.method else "method"
            raise ConfigError(f"{where}.{err.field}", err.message) from err

    @property
    def seq_len(self) -> int:
        """Training length: the stage's target length, else ``data.seq_len``."""
        return self.stage.target_length or self.cfg.data.seq_len

    def train_samples(self):
        """The stage's training samples (cached on the run: the preflight builds them once)."""
        data_cfg = DataConfig(**{**asdict(self.cfg.data), "seq_len": self.seq_len})
        key = json.dumps(asdict(data_cfg), sort_keys=True)
        if key not in self.run._samples:
            samples = build_samples(data_cfg, "train", self.tokenizer)
            batch = self.cfg.train.global_batch_size
            if len(samples) < batch:
                raise ConfigError("data.seq_len", f"only {len(samples)} training samples of {self.seq_len} tokens, "
                                  f"fewer than train.global_batch_size={batch}")
            self.run._samples[key] = samples
        return self.run._samples[key]

    def engine(self, rope: RopeConfig | None = None, train_steps: int | None = None, init_optimizer: bool = False):
        """The model with ``rope`` (default: the stage's), from the ``init`` stage's final weights
        (and its optimizer state with ``init_optimizer``)."""
        from megarope.run.engine import Engine

        rope = rope or self.rope
        engine = Engine(self.cfg, rope, self.tokenizer.vocab_size, train_steps=train_steps)
        if self.stage.init:
            ckpt = checkpoint.latest(self.run.stage_dir(self.stage.init) / "checkpoints")
            if ckpt is None:
                raise ConfigError(f"stages.{self.stage.name}.init", f"stage {self.stage.init!r} left no checkpoint")
            checkpoint.load(engine, ckpt, model_only=not init_optimizer, schedule=False)
            engine.set_rope(rope)  # the checkpoint carries the init stage's RoPE; this stage's wins
        return engine


def check_rope(ctx: StageContext) -> None:
    """The check of a kind whose only bad input is its RoPE: derive it now, unless it is the factor
    file of a stage that has not run yet (read when this stage runs)."""
    if not ctx.factors_pending:
        _ = ctx.rope  # raises ConfigError naming the bad method field


@dataclass(frozen=True)
class StageKind:
    """A stage kind: its config (a StageConfig subclass with the kind's own settings), ``run``
    (does the work, returns what ``done.json`` and ``summary.json`` record) and ``check`` (every
    failure bad input can cause, before any stage of the run writes anything)."""

    config: type
    run: Callable[[StageContext], dict]
    check: Callable[[StageContext], None] = check_rope
