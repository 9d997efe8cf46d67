"""LongRoPE search with its fitness spread over 2 gloo ranks vs one process."""

import json
import os
import random

import torch.distributed as dist
from _launch import run_distributed

from megarope.search.distributed import score_distributed
from megarope.search.evolution import LongRopeSearch, SearchConfig, mutate, seed_candidates

CONFIG = dict(
    scale=8.0,
    original_max_position_embeddings=64,
    rotary_dim=16,
    population=16,
    iterations=8,
    mutations=4,
    crossovers=4,
    topk=8,
    n_hat_candidates=(0, 2, 8, 32),
    seed=5,
)
TARGET = (1.0, 1.0, 1.5, 2.2, 3.9, 6.0, 8.1, 9.7)


def _score(candidate) -> float:
    """Synthetic perplexity: distance to a hidden monotone λ* plus an n̂ penalty."""
    return 1.0 + sum(abs(a - b) for a, b in zip(candidate.factors, TARGET)) + 0.01 * abs(candidate.n_hat - 8)


def _candidates(n: int):
    cfg = SearchConfig(**CONFIG)
    rng = random.Random(0)
    out = seed_candidates(cfg)
    while len(out) < n:
        out.append(mutate(out[-1], cfg, rng, set(out)))
    return out


def _score_on_ranks(candidates):
    """(scores, candidates scored here) over the world group, then over a group of one rank."""
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        # new_group is collective: every rank creates every group
        own = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
        out = []
        for group in (None, own):
            scored = []

            def score_one(c):
                scored.append(c)
                return _score(c)

            out.append((score_distributed(candidates, score_one, group), scored))
        return out
    finally:
        dist.destroy_process_group()


def _search_on_ranks(state_path):
    dist.init_process_group("gloo")
    try:
        search = LongRopeSearch(
            SearchConfig(**CONFIG), lambda cs: score_distributed(cs, _score), state_path=state_path
        )
        result = search.run()
        return result.best, result.best_ppl, result.history, result.population
    finally:
        dist.destroy_process_group()


def test_score_distributed_matches_one_process():
    candidates = _candidates(7)  # uneven: rank 0 scores 4, rank 1 scores 3
    expected = [_score(c) for c in candidates]
    for rank, (world, alone) in enumerate(run_distributed(_score_on_ranks, 2, candidates)):
        scores, scored = world
        assert scores == expected  # bit for bit, in input order, on every rank
        assert scored == candidates[rank::2]  # round-robin share, each scored once
        # a group of one rank (a data-parallel size of 1) scores everything itself
        assert alone == (expected, candidates)


def test_search_on_two_ranks_matches_one_process(tmp_path):
    state = str(tmp_path / "search_state.json")
    single = LongRopeSearch(SearchConfig(**CONFIG), lambda cs: [_score(c) for c in cs]).run()
    results = run_distributed(_search_on_ranks, 2, state)
    for best, best_ppl, history, population in results:
        assert (best, best_ppl, history, population) == (
            single.best,
            single.best_ppl,
            single.history,
            single.population,
        )
    assert single.best_ppl < min(_score(s) for s in seed_candidates(SearchConfig(**CONFIG)))
    # rank 0 alone wrote the state, atomically, and it holds the finished search
    with open(state) as f:
        assert json.load(f)["history"] == single.history
    assert os.listdir(tmp_path) == ["search_state.json"]
