"""``search``: LongRoPE evolutionary search; writes ``factors.json`` (Hugging Face ``rope_scaling``
format), ``search_state.json`` (resume) and ``plots/``.

The knobs are the run's ``search`` group (a :class:`~megarope.search.evolution.SearchConfig`,
per stage through ``overrides: {search: {...}}``); the scale and original window it extends are
the stage's (``target_length`` over the model's window), never set by hand. A long search (the
default) searches ``long_factor`` and n̂ at ``target_length``. With ``short: true`` (paper §3.3) it
searches ``short_factor`` at the original window instead, seeding PI/NTK/YaRN at ``short_scale``
with λ up to ``lambda_max_ratio * short_scale``, and keeps the long factors and n̂ of the stage's
``factors`` (or of a LongRoPE model) in the file it writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

from megarope import dist
from megarope.data.samples import eval_documents, lm_sample
from megarope.data.sources import load_documents
from megarope.rope.config import RopeConfig
from megarope.run import checkpoint
from megarope.run.config import ConfigError, StageConfig
from megarope.run.context import StageContext, StageKind, check_rope
from megarope.search.distributed import score_distributed
from megarope.search.evolution import (LongRopeSearch, SearchConfig, SearchStopped, to_rope_config,
                                       write_factor_file)
from megarope.search.plots import plot_search

log = logging.getLogger(__name__)


@dataclass
class SearchStage(StageConfig):
    short: bool = False  # search short_factor at the original window, keeping the long factors
    short_scale: float = 2.0  # the scale the short search's seeds and maximum λ are set for


def _where(ctx: StageContext) -> str:
    return f"stages.{ctx.stage.name}"


def _short_length(ctx: StageContext) -> int:
    length, window = ctx.stage.target_length or ctx.run.window, ctx.run.window
    if length > window:
        raise ConfigError(f"{_where(ctx)}.target_length", f"a short search scores short factors at the original "
                          f"window {window} or below, got {length}; longer inputs use the long factors")
    return length


def _long_rope(ctx: StageContext) -> RopeConfig:
    """The long factors a short search keeps: the stage's ``factors``, or a LongRoPE model's own."""
    if ctx.stage.factors:
        return ctx.rope
    if ctx.run.base_rope.rope_type != "longrope":
        raise ConfigError(f"{_where(ctx)}.factors", "a short search keeps the long factors of an earlier search "
                          "stage or factor file, or of a LongRoPE model (model.path), but the model's RoPE is "
                          f"{ctx.run.base_rope.rope_type!r}")
    return ctx.run.base_rope


def check(ctx: StageContext) -> None:
    s = ctx.cfg.search
    for key in ("scale", "original_max_position_embeddings"):
        if getattr(s, key) is not None:
            raise ConfigError(f"search.{key}", f"set by the stage ({_where(ctx)}.target_length over the model's "
                              "window), not by hand")
    if ctx.stage.short:
        _short_length(ctx)
        if not ctx.stage.factors:
            _long_rope(ctx)
    elif not ctx.stage.target_length:
        raise ConfigError(f"{_where(ctx)}.target_length", "a search stage needs its target length")
    check_rope(ctx)


def _plan(ctx: StageContext) -> tuple[SearchConfig, RopeConfig, int, Callable, dict]:
    """What to search: settings, the RoPE the model starts with, the fitness length, the RoPE of a
    candidate, and what the factor file and done.json record about the kind of search."""
    stage, base, knobs = ctx.stage, ctx.run.base_rope, ctx.cfg.search
    if stage.short:
        long_rc = _long_rope(ctx)
        settings = replace(knobs, n_hat_candidates=(long_rc.n_hat,)).extending(long_rc, stage.short_scale)
        return (settings, long_rc, _short_length(ctx),
                lambda candidate: long_rc.replace(short_factor=candidate.factors),
                {"short": True, "short_scale": stage.short_scale})
    start = ctx.rope if (stage.method or stage.factors) else base
    scale = stage.target_length / ctx.run.window
    on = start if start.rope_type == "longrope" else start.replace(rope_type="default",
                                                                   max_position_embeddings=ctx.run.window)
    return (knobs.extending(on, scale), start, stage.target_length,
            lambda candidate: to_rope_config(candidate, base, scale), {"short": False})


def run(ctx: StageContext) -> dict:
    """Search with fitness = perplexity at the planned length; write the best as ``factors.json``
    and the plots."""
    settings, start, length, rope_of, extra = _plan(ctx)
    engine = ctx.engine(start)
    rows = eval_documents(load_documents(ctx.cfg.data, "eval"), ctx.tokenizer, length + 1, settings.num_docs,
                          ctx.cfg.data.text_key)
    samples = [lm_sample(row) for row in rows]

    def score_one(candidate):
        engine.set_rope(rope_of(candidate))
        return engine.perplexity(samples, split_over_dp=False)

    def record(result):
        last = result.history[-1]
        ctx.metrics.write({"stage": "search", "run_stage": ctx.stage.name, "generation": last["generation"],
                           "best_ppl": last["best_ppl"], "mean_ppl": last["mean_ppl"], "length": length})

    # candidates spread over the data-parallel replicas, each scoring on all documents
    with checkpoint.StopSignal() as stop:
        search = LongRopeSearch(settings, lambda candidates: score_distributed(candidates, score_one, engine.dp_group),
                                state_path=ctx.dir / "search_state.json", on_generation=record,
                                stop_requested=stop.requested)
        try:
            result = search.run()
        except SearchStopped as stopped:
            log.warning("%s: %s", ctx.stage.name, stopped)
            raise checkpoint.Interrupted(stop.received) from stopped
    if dist.is_rank0():
        write_factor_file(ctx.dir / "factors.json", rope_of(result.best),
                          {"ppl": result.best_ppl, "generation": result.generation, "target_length": length, **extra})
        plot_search(result, settings, ctx.dir / "plots")
    dist.barrier()
    return {"kind": "search", "best_ppl": result.best_ppl, "length": length, "n_hat": result.best.n_hat,
            "factors": list(result.best.factors), **extra}


KIND = StageKind(SearchStage, run, check)
