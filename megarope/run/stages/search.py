"""``search``: LongRoPE evolutionary search; writes ``factors.json`` (Hugging Face ``rope_scaling``
format), ``search_state.json`` (resume; ``search_state_<length>.json`` per length of a short
search) and ``plots/``.

The knobs are the run's ``search`` group (a :class:`~megarope.search.evolution.SearchConfig`,
per stage through ``overrides: {search: {...}}``, e.g. the paper's halved population beyond 512k);
the scale and original window it extends are the stage's (``target_length`` over the model's
window), never set by hand. Fitness: perplexity on documents of the held-out "fitness" split, in
an order drawn with ``search.seed``; evaluations read the disjoint "eval" split.

A long search (the default) searches ``long_factor`` and n̂ at ``target_length``. With
``factors`` (an earlier search stage, or a factor file) it extends that result progressively, as
the paper's 2048k step (§3.2): its long factors, scale and n̂ become the search's prior
(``SearchConfig.prior_*``: seeded as they are and rescaled to the new scale), and
``search.prior_bound: true`` keeps every λ_i in [λ_prev,i, λ_prev,i · lambda_max_ratio · s/s_prev].

With ``short: true`` (paper §3.3) it re-searches short-context sets, keeping the long factors and
n̂ of the stage's ``factors`` (or of a LongRoPE model): one set per length of ``short_lengths``
(default: the original window and twice it; ``target_length``, if given, alone), each with n̂
searched, λ up to ``short_lambda_max`` (default: the long set's largest λ, since the reference's
own short re-searches of 256k models reach λ ≈ 62–64), and generation 0 seeded with the long
factors (as they are and rescaled down) beside PI/NTK/YaRN at ``short_scale`` × length / window.
The file it writes holds them as ``length_sets`` (the set of the original window also as
``short_factor``, the one transformers reads): an input uses the first set whose length holds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable, List, Optional

from megarope import dist
from megarope.data.samples import eval_documents, lm_sample
from megarope.data.sources import load_documents
from megarope.rope.config import RopeConfig
from megarope.run import checkpoint
from megarope.run.config import ConfigError, StageConfig
from megarope.run.context import StageContext, StageKind, check_rope
from megarope.search.distributed import score_distributed
from megarope.search.evolution import (
    Candidate,
    LongRopeSearch,
    SearchConfig,
    SearchResult,
    SearchStopped,
    to_rope_config,
    write_factor_file,
)
from megarope.search.plots import plot_search

log = logging.getLogger(__name__)

# filled in from the stage's `factors` link, never set by hand
_PRIOR_FIELDS = ("prior_factors", "prior_scale", "prior_n_hat")
_DEFAULTS = {f.name: f.default for f in fields(SearchConfig)}


@dataclass
class SearchStage(StageConfig):
    short: bool = False  # re-search short-context sets, keeping the long factors
    short_scale: float = 2.0  # the classic seeds' scale at the original window (x length / window beyond)
    short_lengths: Optional[List[int]] = None  # None: [window, 2 x window], or [target_length] when given
    short_lambda_max: Optional[float] = None  # None: the long set's largest λ


@dataclass
class _Search:
    """One search of a stage: its settings, fitness length, the RoPE a candidate is scored with,
    its state file and plot folder (names under the stage folder)."""

    settings: SearchConfig
    length: int
    rope_of: Callable[[Candidate], RopeConfig]
    state: str
    plots: str


def _where(ctx: StageContext) -> str:
    return f"stages.{ctx.stage.name}"


def _short_lengths(ctx: StageContext) -> list[int]:
    stage, window = ctx.stage, ctx.run.window
    if stage.target_length:
        if stage.target_length > window:
            raise ConfigError(f"{_where(ctx)}.target_length", f"a short search with one length scores the set of "
                              f"the original window {window} or below, got {stage.target_length}; longer short "
                              f"sets are {_where(ctx)}.short_lengths")
        return [stage.target_length]
    lengths = list(stage.short_lengths) if stage.short_lengths is not None else [window, 2 * window]
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths) \
            or lengths != sorted(set(lengths)):
        raise ConfigError(f"{_where(ctx)}.short_lengths", f"distinct ascending positive lengths, got {lengths}")
    return lengths


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
    s, stage = ctx.cfg.search, ctx.stage
    for key in ("scale", "original_max_position_embeddings"):
        if getattr(s, key) is not None:
            raise ConfigError(f"search.{key}", f"set by the stage ({_where(ctx)}.target_length over the model's "
                              "window), not by hand")
    for key in _PRIOR_FIELDS:
        if getattr(s, key) != _DEFAULTS[key]:
            raise ConfigError(f"search.{key}", f"set from the stage's factors link ({_where(ctx)}.factors: an "
                              "earlier search stage or factor file), not by hand")
    if s.prior_bound and (stage.short or not stage.factors):
        raise ConfigError("search.prior_bound", f"bounds a long search by the factors it extends: needs "
                          f"{_where(ctx)}.factors and no short: true")
    if stage.short:
        _short_lengths(ctx)
        if stage.short_lambda_max is not None and not stage.short_lambda_max >= 1:
            raise ConfigError(f"{_where(ctx)}.short_lambda_max", f"must be >= 1, got {stage.short_lambda_max}")
        if not stage.factors:
            _long_rope(ctx)
    else:
        if not stage.target_length:
            raise ConfigError(f"{_where(ctx)}.target_length", "a search stage needs its target length")
        for key in ("short_lengths", "short_lambda_max"):
            if getattr(stage, key) is not None:
                raise ConfigError(f"{_where(ctx)}.{key}", "a short-search setting: needs short: true")
    check_rope(ctx)


def _short_plan(ctx: StageContext) -> tuple[list[_Search], RopeConfig, Callable, dict]:
    stage, knobs, window = ctx.stage, ctx.cfg.search, ctx.run.window
    long_rc = _long_rope(ctx)
    lengths = _short_lengths(ctx)
    if lengths[-1] >= long_rc.max_position_embeddings:
        raise ConfigError(f"{_where(ctx)}.short_lengths", f"short sets must be shorter than the long factors' "
                          f"target {long_rc.max_position_embeddings}, got {lengths[-1]}")
    ceiling = stage.short_lambda_max if stage.short_lambda_max is not None else max(long_rc.long_factor)
    searches = []
    for length in lengths:
        settings = knobs.extending(long_rc, stage.short_scale * length / window, lambda_max=ceiling,
                                   prior_factors=long_rc.long_factor, prior_scale=long_rc.scale,
                                   prior_n_hat=long_rc.n_hat)
        searches.append(_Search(
            settings, length,
            # scored alone: an input of `length` tokens picks this set
            lambda c, length=length: long_rc.replace(length_sets=((length, c.n_hat, c.factors),)),
            f"search_state_{length}.json", "plots" if len(lengths) == 1 else f"plots/{length}"))

    def combine(results: list[SearchResult]) -> RopeConfig:
        sets = tuple((s.length, r.best.n_hat, r.best.factors) for s, r in zip(searches, results))
        at_window = [entry for entry in sets if entry[0] <= window]
        short = {"short_factor": at_window[-1][2], "short_n_hat": at_window[-1][1]} if at_window else {}
        return long_rc.replace(length_sets=sets, **short)

    return searches, long_rc, combine, {"short": True, "short_scale": stage.short_scale, "lengths": lengths}


def _long_plan(ctx: StageContext) -> tuple[list[_Search], RopeConfig, Callable, dict]:
    stage, base, knobs = ctx.stage, ctx.run.base_rope, ctx.cfg.search
    start = ctx.rope if (stage.method or stage.factors) else base
    scale = stage.target_length / ctx.run.window
    on = start if start.rope_type == "longrope" else start.replace(rope_type="default",
                                                                   max_position_embeddings=ctx.run.window)
    prior, extra = {}, {"short": False}
    if stage.factors:
        if start.rope_type != "longrope":
            raise ConfigError(f"{_where(ctx)}.factors", f"a search extends LongRoPE factors, got {start.rope_type!r}")
        prior = {"prior_factors": start.long_factor, "prior_scale": start.scale, "prior_n_hat": start.n_hat}
        extra["prior"] = {"factors": stage.factors, "scale": start.scale, "bound": knobs.prior_bound}
    settings = knobs.extending(on, scale, **prior)

    def rope_of(candidate: Candidate) -> RopeConfig:
        return to_rope_config(candidate, base, scale)

    search = _Search(settings, stage.target_length, rope_of, "search_state.json", "plots")
    return [search], start, lambda results: rope_of(results[0].best), extra


def run(ctx: StageContext) -> dict:
    """Search with fitness = perplexity at each planned length; write the result as ``factors.json``
    and the plots."""
    searches, start, combine, extra = (_short_plan if ctx.stage.short else _long_plan)(ctx)
    engine = ctx.engine(start)
    # held-out documents of the "fitness" split, in an order drawn with the search's seed (the
    # paper's random validation documents); evaluations read the disjoint "eval" split
    seed = ctx.cfg.search.seed
    docs = load_documents(ctx.cfg.data, "fitness").shuffle(seed=seed)
    results, sets, fitness_docs = [], [], []
    for s in searches:
        used: list = []
        rows = eval_documents(docs, ctx.tokenizer, s.length + 1, s.settings.num_docs, ctx.cfg.data.text_key, used)
        samples = [lm_sample(row) for row in rows]
        fitness_docs += [d for d in used if d not in fitness_docs]

        def score_one(candidate, s=s, samples=samples):
            engine.set_rope(s.rope_of(candidate))
            return engine.perplexity(samples, split_over_dp=False)

        def record(result, s=s, used=used):
            last = result.history[-1]
            ctx.metrics.write({"stage": "search", "run_stage": ctx.stage.name, "generation": last["generation"],
                               "best_ppl": last["best_ppl"], "mean_ppl": last["mean_ppl"], "length": s.length,
                               "split": "fitness", "fitness_docs": used, "fitness_seed": seed})

        # candidates spread over the data-parallel replicas, each scoring on all documents
        with checkpoint.StopSignal() as stop:
            search = LongRopeSearch(s.settings, lambda cands, f=score_one: score_distributed(cands, f, engine.dp_group),
                                    state_path=ctx.dir / s.state, on_generation=record, stop_requested=stop.requested)
            # every rank has read the state file before rank 0 can rewrite it: a rank that read it
            # later resumed from a newer state and ran different collectives (a hung requeued search)
            dist.barrier()
            try:
                result = search.run()
            except SearchStopped as stopped:
                log.warning("%s: %s", ctx.stage.name, stopped)
                raise checkpoint.Interrupted(stop.received) from stopped
        results.append(result)
        sets.append({"length": s.length, "n_hat": result.best.n_hat, "best_ppl": result.best_ppl,
                     "generation": result.generation, "factors": list(result.best.factors)})
        if dist.is_rank0():
            plot_search(result, s.settings, ctx.dir / s.plots)
    extra.update(fitness_docs=fitness_docs, fitness_seed=seed)
    first = results[0]
    if dist.is_rank0():
        info = {"ppl": first.best_ppl, "generation": first.generation, "target_length": searches[0].length, **extra}
        if ctx.stage.short:
            info["sets"] = [{k: v for k, v in entry.items() if k != "factors"} for entry in sets]
        write_factor_file(ctx.dir / "factors.json", combine(results), info)
    dist.barrier()
    out = {"kind": "search", "best_ppl": first.best_ppl, "length": searches[0].length, "n_hat": first.best.n_hat,
           "factors": list(first.best.factors), **extra}
    if ctx.stage.short:
        out["sets"] = sets
    return out


KIND = StageKind(SearchStage, run, check)
