"""Structured configs of a megarope run: the single source of defaults (YAML only selects and overrides).

Groups: ``model``, ``method`` (the RoPE method, a RopeConfig as a dict), ``parallel``, ``data``,
``train``, ``eval``, ``checkpoint``, ``run``, ``log``, ``search``, ``stages`` (the recipe's pipeline) and
``vars`` (named values the recipe's stages interpolate as ``${vars.NAME}``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megarope.data.config import DataConfig
from megarope.errors import MegaropeError, raise_all
from megarope.search.evolution import SearchConfig


@dataclass
class ModelConfig:
    path: Optional[str] = None  # Hugging Face checkpoint folder; None: the built-in tiny Llama-style model
    # the built-in tiny model (ignored with `path`)
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 352
    rope_theta: float = 10_000.0
    window: int = 128  # its pre-training window (the original_max_position_embeddings of every method)
    init_std: float = 0.02
    # attention kernel without Transformer Engine (either model): "sdpa" (torch's
    # scaled_dot_product_attention, memory linear in length) or "local" (megatron's
    # DotProductAttention, which materialises [heads, s, s] scores: the plain reference)
    core_attention: str = "sdpa"
    # how RoPE (rotation, attention factor, query scale) is applied: "eager" (one fused function in
    # plain torch) or "compile" (the same through torch.compile; falls back to eager, with a log
    # line, where compilation fails; also megatron's compiled SwiGLU, bias_activation_fusion).
    # eager by default for runs, as the README's main-job timing was measured; the requeued-search
    # hang once blamed on compile was a race on the search state file (megarope.run.stages.search),
    # with either setting
    rope_fusion: str = "eager"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    micro_batch_size: int = 1


@dataclass
class TrainConfig:
    steps: int = 20
    epochs: int = 0  # > 0: steps = epochs x (training samples // global_batch_size), replacing `steps`
    global_batch_size: int = 8
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"  # linear | cosine | constant (decay from lr to min_lr over `steps`)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_every: int = 1
    bf16: Optional[bool] = None  # None: bf16 on GPU, fp32 on CPU


@dataclass
class EvalConfig:
    lengths: List[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    num_docs: int = 4
    passkey_lengths: List[int] = field(default_factory=list)
    passkey_depths: List[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_per_depth: int = 2
    seed: int = 0


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end of a stage and on SIGTERM/SIGUSR1)
    keep: int = 1  # finished checkpoints kept per stage


@dataclass
class RunConfig:
    # identical on every rank: derived from the recipe and SLURM_JOB_ID, never from a timestamp
    dir: str = "runs/${recipe}-${oc.env:SLURM_JOB_ID,local}"
    log_level: str = "INFO"


@dataclass
class LogConfig:
    """Dashboards beside ``metrics.jsonl`` (written by rank 0 under ``run.dir``)."""

    tensorboard: bool = False  # <run.dir>/tensorboard (needs the tensorboard package)
    wandb: bool = False  # Weights & Biases under <run.dir>/wandb (needs wandb)
    wandb_mode: str = "offline"  # offline: no network, `wandb sync` later; online needs a login
    wandb_project: str = "megarope"


@dataclass
class StageConfig:
    """What every step of a recipe has. ``kind`` names a module of ``megarope.run.stages``, whose
    config subclasses this one with the kind's own settings (``short`` of a search stage, ...).

    ``method`` is merged over the top-level ``method``; ``init`` names an earlier stage whose final
    weights start this one; ``factors`` names an earlier search stage whose factors this one uses,
    or a factor file (a path ending in ``.json``);
    ``overrides`` replaces any top-level group (``train``, ``data``, ``eval``, ``search``) for this
    stage only.
    """

    name: str = "train"
    kind: str = "train"
    method: Dict[str, Any] = field(default_factory=dict)
    init: Optional[str] = None
    factors: Optional[str] = None
    target_length: Optional[int] = None
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    recipe: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # the search knobs; scale and original window stay unset: a search stage derives them
    search: SearchConfig = field(default_factory=SearchConfig)
    # entries are StageConfig subclasses chosen by `kind` (megarope.run.stages), so the schema
    # takes any mapping here and the pipeline types and checks each entry
    stages: List[Any] = field(default_factory=list)
    # recipe variables (lengths, step counts) that stages interpolate: one override rescales a recipe
    vars: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="megarope_schema", node=Config)
    # `key: ${required:}` in a recipe or group: fails naming the key unless the command line sets it.
    # (`???` cannot do this: merged over a schema default such as model.path=None, it leaves the default.)
    OmegaConf.register_new_resolver("required", _required, replace=True)


def _required(*, _node_) -> None:
    raise ConfigError(_node_._get_full_key(None), "required, set it on the command line")


class ConfigError(MegaropeError):
    """Bad run configuration; ``field`` is the dotted key (``train.steps``, ``stages[2].init``)."""


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Checks that need no data: fail before any work, naming the field; every failed check is
    reported (:class:`~megarope.errors.MegaropeErrors` when more than one)."""
    errors: list[MegaropeError] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(ConfigError(key, message))

    _check_settings(cfg, need)
    _check_layout(cfg, world_size, need)
    _check_model(cfg, need)
    raise_all(errors)


def _check_settings(cfg: Config, need) -> None:
    """Training, checkpoint and evaluation values on their own."""
    need(cfg.train.steps > 0, "train.steps", f"must be > 0, got {cfg.train.steps}")
    need(cfg.train.lr > 0, "train.lr", f"must be > 0, got {cfg.train.lr}")
    need(0 <= cfg.train.min_lr <= cfg.train.lr, "train.min_lr", f"must be in [0, train.lr], got {cfg.train.min_lr}")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {cfg.train.warmup_steps}")
    need(cfg.train.log_every >= 1, "train.log_every", f"must be >= 1, got {cfg.train.log_every}")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    need(cfg.eval.num_docs >= 1, "eval.num_docs", f"must be >= 1, got {cfg.eval.num_docs}")
    need(cfg.eval.passkey_per_depth >= 1, "eval.passkey_per_depth", f"must be >= 1, got {cfg.eval.passkey_per_depth}")
    need(all(0 <= d <= 1 for d in cfg.eval.passkey_depths), "eval.passkey_depths",
         f"depths are shares of the context, in [0, 1]; got {list(cfg.eval.passkey_depths)}")
    for key, values in (("eval.lengths", cfg.eval.lengths), ("eval.passkey_lengths", cfg.eval.passkey_lengths)):
        for i, n in enumerate(values):
            need(n >= 1, f"{key}[{i}]", f"must be >= 1 token, got {n}")
    for i, stage in enumerate(cfg.stages):
        need(stage.target_length is None or stage.target_length >= 1, f"stages[{i}].target_length",
             f"must be >= 1 token, got {stage.target_length}")
    need(cfg.train.epochs >= 0, "train.epochs", f"must be >= 0, got {cfg.train.epochs}")
    need(cfg.train.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    need(cfg.train.schedule in ("linear", "cosine", "constant"), "train.schedule",
         f"one of linear|cosine|constant, got {cfg.train.schedule!r}")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")


def _check_layout(cfg: Config, world_size: int | None, need) -> None:
    """The parallel layout against the launch size and every sequence length."""
    for key in ("tp", "pp", "cp", "micro_batch_size"):
        need(getattr(cfg.parallel, key) >= 1, f"parallel.{key}", "must be >= 1")
    if any(getattr(cfg.parallel, key) < 1 for key in ("tp", "pp", "cp", "micro_batch_size")):
        return  # every check below divides by these
    if world_size is not None:
        model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
        need(world_size % model_parallel == 0, "parallel.tp",
             f"world size {world_size} is not divisible by parallel.tp*pp*cp = {model_parallel}")
        dp = world_size // model_parallel
        need(dp == 0 or cfg.train.global_batch_size % (dp * cfg.parallel.micro_batch_size) == 0,
             "train.global_batch_size", f"{cfg.train.global_batch_size} is not divisible by data-parallel size "
             f"{dp} x parallel.micro_batch_size {cfg.parallel.micro_batch_size}")
    # CP cuts every sequence into 2*cp equal chunks; SP then splits a CP rank's share over TP
    p = cfg.parallel
    multiple = math.lcm(2 * p.cp if p.cp > 1 else 1, p.cp * p.tp if p.sp else 1)
    why = ([f"2*parallel.cp={2 * p.cp} chunks for context parallelism"] if p.cp > 1 else []) + \
        ([f"parallel.cp*parallel.tp={p.cp * p.tp} for sequence parallelism"] if p.sp else [])
    lengths = [("data.seq_len", cfg.data.seq_len)]
    lengths += [(f"eval.lengths[{i}]", n) for i, n in enumerate(cfg.eval.lengths)]
    lengths += [(f"eval.passkey_lengths[{i}]", n) for i, n in enumerate(cfg.eval.passkey_lengths)]
    lengths += [(f"stages[{i}].target_length", s.target_length) for i, s in enumerate(cfg.stages) if s.target_length]
    for key, length in lengths:
        need(length % multiple == 0, key, f"{length} tokens is not a multiple of {multiple} ({', '.join(why)})")
    if cfg.data.reset_position_ids:
        # packed (thd) micro-batches: padding per document changes their length, which the
        # pipeline's fixed p2p shapes and SP's even split over TP do not allow
        need(p.pp == 1, "parallel.pp", "packed batches (data.reset_position_ids=true) need parallel.pp=1")
        need(not p.sp, "parallel.sp", "packed batches (data.reset_position_ids=true) need parallel.sp=false")


def _check_model(cfg: Config, need) -> None:
    """Sinks, attention kernel and the model (checkpoint folder, or the tiny model's shape against TP/PP)."""
    for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        need(not getattr(cfg.log, key) or importlib.util.find_spec(module) is not None, f"log.{key}",
             f"the {module} package is not installed (pip install {module})")
    need(cfg.log.wandb_mode in ("offline", "online"), "log.wandb_mode",
         f"offline or online, got {cfg.log.wandb_mode!r}")
    need(cfg.model.core_attention in ("sdpa", "local"), "model.core_attention",
         f"one of sdpa|local, got {cfg.model.core_attention!r}")
    need(cfg.model.rope_fusion in ("compile", "eager"), "model.rope_fusion",
         f"one of compile|eager, got {cfg.model.rope_fusion!r}")
    if cfg.model.path is not None:
        from megarope.hf.convert import CheckpointError, check_hf_folder

        try:
            check_hf_folder(cfg.model.path)
        except CheckpointError as err:
            need(False, err.field, err.message)
    else:
        need(cfg.model.num_attention_heads % cfg.parallel.tp == 0, "parallel.tp",
             f"model.num_attention_heads={cfg.model.num_attention_heads} is not divisible by parallel.tp={cfg.parallel.tp}")
        need(cfg.model.num_query_groups % cfg.parallel.tp == 0, "parallel.tp",
             f"model.num_query_groups={cfg.model.num_query_groups} is not divisible by parallel.tp={cfg.parallel.tp}")
        from megarope.mcore.weights import VOCAB_MULTIPLE

        need(VOCAB_MULTIPLE % cfg.parallel.tp == 0, "parallel.tp",
             f"the tiny model's vocabulary is padded to a multiple of {VOCAB_MULTIPLE}, which parallel.tp="
             f"{cfg.parallel.tp} does not divide")
        need(cfg.model.num_layers % cfg.parallel.pp == 0, "parallel.pp",
             f"model.num_layers={cfg.model.num_layers} is not divisible by parallel.pp={cfg.parallel.pp}")
