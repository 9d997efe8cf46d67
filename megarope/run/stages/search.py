"""``search``: LongRoPE evolutionary search; writes ``factors.json`` (Hugging Face ``rope_scaling``
format), ``search_state.json`` (resume) and ``plots/``.

The knobs are the run's ``search`` group (a :class:`~megarope.search.evolution.SearchConfig`,
per stage through ``overrides: {search: {...}}``); the scale and original window it extends are
the stage's (``target_length`` over the model's window), never set by hand. A long search (the
default) searches ``long_factor`` and n̂ at ``target_length``. With ``short: true`` (paper §3.3) it
searches ``short_factor`` at the original window instead, seeding PI/NTK/YaRN at ``short_scale``
with λ up to ``lambda_max_ratio * short_scale``, and keeps the long factors and n̂ of the stage's
``factors`` (or of a LongRoPE model) in the file it writes.

A long search with ``factors`` (an earlier search stage, or a factor file) extends that stage's
result progressively, as the paper's 2048k step (§3.2): its long factors, scale and n̂ become the
search's prior (``SearchConfig.prior_*``, seeded as they are and rescaled to the new scale), and
``search.prior_bound: true`` keeps every λ_i in [λ_prev,i, λ_prev,i · lambda_max_ratio · s/s_prev].
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

from megarope import dist
from megarope.data.samples import eval_documents, lm_sample
from megarope.data.sources import load_documents
from megarope.rope.config import RopeConfig
from megarope.run.config import ConfigError, StageConfig
from megarope.run.context import StageContext, StageKind, check_rope
from megarope.search.distributed import score_distributed
from megarope.search.evolution import LongRopeSearch, SearchConfig, to_rope_config, write_factor_file

# filled in from the stage's `factors` link, never set by hand
_PRIOR_FIELDS = ("prior_factors", "prior_scale", "prior_n_hat")
_DEFAULTS = {f.name: f.default for f in fields(SearchConfig)}
from megarope.search.plots import plot_search


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
    for key in _PRIOR_FIELDS:
        if getattr(s, key) != _DEFAULTS[key]:
            raise ConfigError(f"search.{key}", f"set from the stage's factors link ({_where(ctx)}.factors: an "
                              "earlier search stage or factor file), not by hand")
    if s.prior_bound and (ctx.stage.short or not ctx.stage.factors):
        raise ConfigError("search.prior_bound", f"bounds a long search by the factors it extends: needs "
                          f"{_where(ctx)}.factors and no short: true")
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
    settings, extra = knobs.extending(on, scale), {"short": False}
    if stage.factors:
        if start.rope_type != "longrope":
            raise ConfigError(f"{_where(ctx)}.factors", f"a search extends LongRoPE factors, got {start.rope_type!r}")
        settings = replace(settings, prior_factors=start.long_factor, prior_scale=start.scale,
                           prior_n_hat=start.n_hat)
        extra["prior"] = {"factors": stage.factors, "scale": start.scale, "bound": settings.prior_bound}
    return (settings, start, stage.target_length, lambda candidate: to_rope_config(candidate, base, scale), extra)


def run(ctx: StageContext) -> dict:
    """Search with fitness = perplexity at the planned length; write the best as ``factors.json``
    and the plots."""
    settings, start, length, rope_of, extra = _plan(ctx)
    engine = ctx.engine(start)
    # held-out documents of the "fitness" split, in an order drawn with the search's seed (the
    # paper's random validation documents); evaluations read the disjoint "eval" split
    docs = load_documents(ctx.cfg.data, "fitness").shuffle(seed=settings.seed)
    used: list = []
    rows = eval_documents(docs, ctx.tokenizer, length + 1, settings.num_docs, ctx.cfg.data.text_key, used)
    samples = [lm_sample(row) for row in rows]
    extra["fitness_docs"], extra["fitness_seed"] = used, settings.seed

    def score_one(candidate):
        engine.set_rope(rope_of(candidate))
        return engine.perplexity(samples, split_over_dp=False)

    def record(result):
        last = result.history[-1]
        ctx.metrics.write({"stage": "search", "run_stage": ctx.stage.name, "generation": last["generation"],
                           "best_ppl": last["best_ppl"], "mean_ppl": last["mean_ppl"], "length": length,
                           "split": "fitness", "fitness_docs": used, "fitness_seed": settings.seed})

    # candidates spread over the data-parallel replicas, each scoring on all documents
    search = LongRopeSearch(settings, lambda candidates: score_distributed(candidates, score_one, engine.dp_group),
                            state_path=ctx.dir / "search_state.json", on_generation=record)
    result = search.run()
    if dist.is_rank0():
        write_factor_file(ctx.dir / "factors.json", rope_of(result.best),
                          {"ppl": result.best_ppl, "generation": result.generation, "target_length": length, **extra})
        plot_search(result, settings, ctx.dir / "plots")
    dist.barrier()
    return {"kind": "search", "best_ppl": result.best_ppl, "length": length, "n_hat": result.best.n_hat,
            "factors": list(result.best.factors), **extra}


KIND = StageKind(SearchStage, run, check)
