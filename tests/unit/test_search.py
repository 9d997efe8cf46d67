"""LongRoPE evolutionary search without a model: operators, determinism, resume, outputs."""

import json
import logging
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from megarope import RopeConfig
from megarope.errors import MegaropeError
from megarope.search.distributed import score_distributed
from megarope.search.evolution import (
    PAPER_N_HAT,
    Candidate,
    LongRopeSearch,
    SearchConfig,
    SearchConfigError,
    SearchStopped,
    crossover,
    is_valid,
    mutate,
    read_factor_file,
    seed_candidates,
    seed_factors,
    to_rope_config,
    write_factor_file,
)
from megarope.search.plots import plot_search

# 8 frequencies and a 16-member population keep a whole search in ~0.1 s.
SMALL = dict(
    scale=8.0,
    original_max_position_embeddings=64,
    rotary_dim=16,
    population=16,
    iterations=12,
    mutations=4,
    crossovers=4,
    topk=8,
    n_hat_candidates=(0, 1, 2, 4, 8, 16),
    seed=3,
)


def small(**overrides) -> SearchConfig:
    return SearchConfig(**{**SMALL, **overrides})


class Synthetic:
    """A perplexity-like fitness with a known optimum: 1 + mean |λ − λ*| + 0.05·|log2((n̂+1)/(n̂*+1))|,
    λ* a hidden monotone grid vector. Counts its evaluations and can fail after ``fail_after``
    of them, like a job killed in the middle of a generation."""

    def __init__(self, config: SearchConfig, fail_after: int | None = None):
        rng = random.Random(1234)
        dims = config.rotary_dim // 2
        self.target = [config.grid_value(k) for k in sorted(rng.randint(0, config.grid_top) for _ in range(dims))]
        self.n_hat = 4
        self.fail_after = fail_after
        self.calls: list[list[Candidate]] = []
        self.evaluated = 0

    def one(self, c: Candidate) -> float:
        distance = sum(abs(a - b) for a, b in zip(c.factors, self.target)) / len(self.target)
        return 1.0 + distance + 0.05 * abs(math.log2((c.n_hat + 1) / (self.n_hat + 1)))

    def __call__(self, candidates):
        self.calls.append(list(candidates))
        out = []
        for c in candidates:
            if self.fail_after is not None and self.evaluated >= self.fail_after:
                raise KeyboardInterrupt("killed")  # not an Exception: nothing may swallow it
            self.evaluated += 1
            out.append(self.one(c))
        return out


def _population(config: SearchConfig, n: int, seed: int = 0) -> list[Candidate]:
    """Seeds and chains of mutants: varied, valid parents for the operator property checks."""
    rng = random.Random(seed)
    out = seed_candidates(config)
    while len(out) < n:
        child = mutate(out[rng.randrange(len(out))], config, rng, set(out))
        out.append(child)
    return out


# ------------------------------------------------------------------------------- config
def test_defaults_are_the_papers():
    cfg = SearchConfig(scale=512, original_max_position_embeddings=4096)
    assert (cfg.population, cfg.iterations, cfg.mutations, cfg.crossovers, cfg.topk) == (64, 40, 16, 16, 32)
    assert cfg.mutation_prob == 0.3 and cfg.lambda_step == 0.01 and cfg.monotone
    assert cfg.n_hat_candidates == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256) == PAPER_N_HAT
    assert cfg.seeds == ("pi", "ntk", "yarn")
    assert cfg.top_lambda == 640.0  # 1.25 · s
    # the reference code's [1, 1 + s]
    assert SearchConfig(scale=8, original_max_position_embeddings=4096, lambda_max_ratio=9 / 8).top_lambda == 9.0


@pytest.mark.parametrize(
    "overrides, field, text",
    [
        ({"population": 8, "topk": 16}, "population", "search.population (8) < search.topk (16)"),
        ({"scale": 0.5}, "scale", ">= 1"),
        ({"rotary_dim": 15}, "rotary_dim", "even"),
        ({"mutation_prob": 0.0}, "mutation_prob", "(0, 1]"),
        ({"lambda_step": 0.0}, "lambda_step", "> 0"),
        ({"seeds": ("pi", "rope")}, "seeds", "among"),
        ({"seeds": ()}, "seeds", "at least one"),
        ({"n_hat_candidates": (0, 0)}, "n_hat_candidates", "distinct"),
        ({"n_hat_candidates": (0, -1)}, "n_hat_candidates", ">= 0"),
        ({"topk": 1, "population": 4}, "topk", "two parents"),
        ({"iterations": -1}, "iterations", ">= 0"),
        ({"population": 2, "topk": 2}, "population", "number of seeds"),
    ],
)
def test_validation_names_the_field(overrides, field, text):
    with pytest.raises(SearchConfigError, match=f"^search.{field}:") as err:
        small(**overrides)
    assert err.value.field == f"search.{field}" and text in str(err.value)
    assert isinstance(err.value, MegaropeError)


def test_settings_only_config_is_a_structured_config_group():
    """A run's ``search`` group can be SearchConfig itself: OmegaConf structures and merges it, the
    model's side stays unset until ``extending``, and a search refuses to start without it."""
    group = OmegaConf.merge(
        OmegaConf.structured(SearchConfig), OmegaConf.from_dotlist(["population=8", "topk=4", "seeds=[yarn]"])
    )
    settings = OmegaConf.to_object(group)
    assert settings.scale is None and settings.seeds == ("yarn",) and settings.n_hat_candidates == PAPER_N_HAT
    with pytest.raises(SearchConfigError, match="^search.scale:"):
        LongRopeSearch(settings, lambda candidates: [1.0] * len(candidates))
    base = RopeConfig(head_dim=64, max_position_embeddings=256)
    assert settings.extending(base, 4.0) == SearchConfig.for_rope(base, 4.0, population=8, topk=4, seeds=["yarn"])


def test_config_dict_round_trip_and_for_rope():
    cfg = small()
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(SearchConfigError, match="^search.popsize:"):
        SearchConfig.from_dict({**cfg.to_dict(), "popsize": 3})
    base = RopeConfig(head_dim=128, rope_theta=500_000.0, partial_rotary_factor=0.5, max_position_embeddings=8192)
    derived = SearchConfig.for_rope(base, 16, iterations=3)
    assert (derived.rotary_dim, derived.rope_theta, derived.original_max_position_embeddings) == (64, 500_000.0, 8192)
    assert derived.iterations == 3 and derived.scale == 16


# ------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("scale, rotary_dim", [(2.0, 16), (8.0, 128), (32.0, 64), (512.0, 128), (1.3, 32)])
def test_seeds_are_monotone_on_grid_in_bounds(scale, rotary_dim):
    cfg = SearchConfig(scale=scale, original_max_position_embeddings=4096, rotary_dim=rotary_dim)
    seeds = seed_candidates(cfg)
    assert 1 <= len(seeds) <= 3
    for seed in seeds:
        assert is_valid(seed, cfg)
        assert len(seed.factors) == rotary_dim // 2 and seed.n_hat == 0
        assert all(1.0 <= v <= cfg.top_lambda for v in seed.factors)
        assert list(seed.factors) == sorted(seed.factors)
    pi = seed_candidates(SearchConfig(**{**cfg.to_dict(), "seeds": ["pi"]}))[0]
    assert pi.factors == (cfg.grid_value(cfg.grid_index(scale)),) * (rotary_dim // 2)


def test_pi_seed_is_s_everywhere_and_ntk_yarn_match_their_closed_forms():
    cfg = SearchConfig(scale=8, original_max_position_embeddings=4096, rotary_dim=128)
    pi, ntk, yarn = seed_candidates(cfg)
    assert pi.factors == (8.0,) * 64
    d = 128
    # NTK base·s^(d/(d−2)) divides frequency i by s^(2i/(d−2)): 1 at i = 0, s at the last one
    closed = [8 ** (2 * i / (d - 2)) for i in range(d // 2)]
    assert seed_factors("ntk", cfg) == pytest.approx(closed, rel=1e-12)
    assert ntk.factors == tuple(round(v, 2) for v in closed)
    # YaRN keeps the fastest frequencies (λ = 1) and fully interpolates the slowest (λ = s)
    assert yarn.factors[0] == 1.0 and yarn.factors[-1] == 8.0
    assert seed_factors("yarn", cfg) == pytest.approx(
        (RopeConfig(head_dim=128).inv_freq() / RopeConfig(rope_type="yarn", head_dim=128, factor=8.0,
         original_max_position_embeddings=4096).inv_freq()).tolist()
    )


def test_seeds_are_clamped_to_a_narrow_range():
    # λ_max = 1.25 < s = 2: PI's λ = 2 is clamped to the bound
    cfg = small(scale=2.0, lambda_max_ratio=0.625)
    for seed in seed_candidates(cfg):
        assert is_valid(seed, cfg) and max(seed.factors) <= 1.25


# ------------------------------------------------------------------------------- operators
@pytest.mark.parametrize("monotone", [True, False])
def test_mutation_keeps_constraints(monotone):
    cfg = small(monotone=monotone)
    parents = _population(cfg, 40)
    rng = random.Random(7)
    seen = set(parents)
    n_hats = set()
    changed_dims = 0
    for i in range(3000):
        parent = parents[i % len(parents)]
        child = mutate(parent, cfg, rng, seen)
        assert child is not None
        assert is_valid(child, cfg), child
        assert child != parent and child not in seen
        seen.add(child)
        n_hats.add(child.n_hat)
        changed_dims += sum(a != b for a, b in zip(child.factors, parent.factors))
    assert n_hats == set(cfg.n_hat_candidates)  # n̂ moves across the whole allowed set
    assert changed_dims > 3000  # several dimensions per mutant, not single-step moves


def test_mutation_reports_exhausted_space():
    # one grid point (λ_max = 1) and one n̂: no mutant can differ from its parent
    cfg = small(scale=1.0, lambda_max_ratio=1.0, n_hat_candidates=(0,), seeds=("pi",))
    (seed,) = seed_candidates(cfg)
    assert seed.factors == (1.0,) * 8
    assert mutate(seed, cfg, random.Random(0)) is None


def test_crossover_keeps_constraints():
    cfg = small()
    parents = _population(cfg, 40)
    rng = random.Random(11)
    seen = set(parents)
    made = 0
    for _ in range(2000):
        a, b = rng.sample(parents, 2)
        child = crossover(a, b, cfg, rng, seen)
        if child is None:
            continue
        made += 1
        assert is_valid(child, cfg) and child not in seen
        assert all(x in (p, q) for x, p, q in zip(child.factors, a.factors, b.factors))
        assert child.n_hat in (a.n_hat, b.n_hat)
        seen.add(child)
    assert made > 200


def test_crossover_of_identical_parents_gives_up():
    cfg = small()
    a = seed_candidates(cfg)[0]
    assert crossover(a, a, cfg, random.Random(0)) is None


# ------------------------------------------------------------------------------- search
def test_same_seed_same_search_and_other_seed_differs():
    first = LongRopeSearch(small(), Synthetic(small())).run()
    again = LongRopeSearch(small(), Synthetic(small())).run()
    other = LongRopeSearch(small(seed=4), Synthetic(small())).run()
    assert (first.best, first.history, first.population) == (again.best, again.history, again.population)
    assert first.population != other.population


def test_finds_a_candidate_better_than_every_seed():
    cfg = small(iterations=25)
    fitness = Synthetic(cfg)
    result = LongRopeSearch(cfg, fitness).run()
    seed_scores = [fitness.one(s) for s in seed_candidates(cfg)]
    assert result.best_ppl < min(seed_scores) - 0.5
    assert result.best_ppl == fitness.one(result.best)
    assert is_valid(result.best, cfg)
    # elitism: the best never gets worse; generation 0 plus one entry per iteration
    best = [h["best_ppl"] for h in result.history]
    assert best == sorted(best, reverse=True) and len(best) == 26
    assert [h["generation"] for h in result.history] == list(range(26))
    # the initial population and each generation's children are scored in one call each, once
    assert [len(c) for c in fitness.calls] == [16] + [8] * 25
    assert result.evaluations == fitness.evaluated == len({c for call in fitness.calls for c in call})
    assert [c for c, _ in result.population] == sorted((c for c, _ in result.population), key=fitness.one)


@pytest.mark.parametrize(
    "fail_after, chunk",
    [
        (5, 0),  # inside the initial population
        (16, 0),  # right after the initial population
        (43, 0),  # inside generation 4
        (43, 3),  # inside generation 4, scores saved every 3 evaluations
        (95, 5),
    ],
)
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, fail_after, chunk):
    cfg = small(fitness_chunk=chunk)
    reference = LongRopeSearch(cfg, Synthetic(cfg)).run()

    state = tmp_path / "search_state.json"
    killed = Synthetic(cfg, fail_after=fail_after)
    with pytest.raises(KeyboardInterrupt):
        LongRopeSearch(cfg, killed, state_path=state).run()
    resumed_fitness = Synthetic(cfg)
    resumed = LongRopeSearch(cfg, resumed_fitness, state_path=state).run()

    assert resumed.best == reference.best and resumed.best_ppl == reference.best_ppl
    assert resumed.history == reference.history
    assert resumed.population == reference.population
    # only the evaluations lost with the kill are repeated: up to one fitness call
    lost = killed.evaluated + resumed_fitness.evaluated - reference.evaluations
    assert 0 <= lost < (chunk or cfg.population)
    # a finished search resumes to its result without evaluating anything
    done = Synthetic(cfg)
    assert LongRopeSearch(cfg, done, state_path=state).run().history == reference.history
    assert done.evaluated == 0


def test_state_file_format_and_longer_resume(tmp_path):
    state = tmp_path / "state.json"
    short = LongRopeSearch(small(iterations=4), Synthetic(small()), state_path=state).run()
    data = json.loads(state.read_text())
    keys = {"version", "config", "generation", "population", "pending", "scores", "rng", "history", "elapsed_s"}
    assert set(data) == keys
    assert data["generation"] == 4 and data["pending"] is None and len(data["history"]) == 5
    assert [Candidate.from_json(c) for c in data["population"]] == [c for c, _ in short.population]
    assert len(data["scores"]) == short.evaluations
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    # more iterations may be asked for on resume, and equal a search run that long from the start
    longer = LongRopeSearch(small(), Synthetic(small()), state_path=state).run()
    assert longer.history == LongRopeSearch(small(), Synthetic(small())).run().history
    with pytest.raises(SearchConfigError, match="^search.mutation_prob:.*differs"):
        LongRopeSearch(small(mutation_prob=0.5), Synthetic(small()), state_path=state)


def test_only_the_main_rank_writes_and_logs(tmp_path, caplog):
    state = tmp_path / "state.json"
    with caplog.at_level(logging.INFO, logger="megarope"):
        LongRopeSearch(small(iterations=2), Synthetic(small()), state_path=state, is_main=False).run()
        assert not state.exists() and not caplog.records
        seen = []
        LongRopeSearch(small(iterations=2), Synthetic(small()), state_path=state, on_generation=seen.append).run()
    messages = [r.getMessage() for r in caplog.records]
    # generation 0 (the initial population) counts: 3 generations for iterations=2
    assert [m.split(" | ")[0] for m in messages] == [f"search {i}/3 generations" for i in range(1, 4)]
    assert "best_ppl" in messages[-1] and "mean_ppl" in messages[-1] and "eta" in messages[-1]
    assert [r.generation for r in seen] == [0, 1, 2] and [len(r.history) for r in seen] == [1, 2, 3]


def test_nan_perplexity_ranks_last():
    cfg = small(iterations=1)
    synthetic = Synthetic(cfg)
    pi = seed_candidates(cfg)[0]
    generations = []
    fitness = lambda cs: [math.nan if c == pi else synthetic.one(c) for c in cs]  # noqa: E731
    LongRopeSearch(cfg, fitness, on_generation=generations.append).run()
    initial = generations[0]
    assert initial.population[-1] == (pi, math.inf)
    assert initial.history[0]["mean_ppl"] == pytest.approx(sum(s for _, s in initial.population[:-1]) / 15)


def test_fitness_must_return_one_score_per_candidate():
    with pytest.raises(ValueError, match="returned 1 scores for 16"):
        LongRopeSearch(small(), lambda cs: [1.0]).run()


def test_score_distributed_without_a_process_group():
    cfg = small()
    fitness = Synthetic(cfg)
    candidates = _population(cfg, 9)
    assert score_distributed(candidates, fitness.one) == [fitness.one(c) for c in candidates]


# ------------------------------------------------------------------------------- outputs
def test_rope_config_and_factor_file(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = small()
    best = Candidate(seed_candidates(cfg)[2].factors, 8)
    base = RopeConfig(head_dim=16, rope_theta=10_000.0, max_position_embeddings=64)
    rc = to_rope_config(best, base, cfg.scale)
    assert rc.rope_type == "longrope" and rc.long_factor == rc.short_factor == best.factors
    assert (rc.n_hat, rc.factor, rc.original_max_position_embeddings, rc.max_position_embeddings) == (8, 8.0, 64, 512)
    short = (1.0,) * 8
    assert to_rope_config(best, base, cfg.scale, short_factor=short).short_factor == short

    path = tmp_path / "factors" / "longrope.json"
    write_factor_file(path, rc, {"perplexity": 3.5, "generation": 12})
    data = json.loads(path.read_text())
    scaling = data["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["long_factor"] == list(best.factors)
    assert scaling["original_max_position_embeddings"] == 64 and scaling["factor"] == 8.0
    assert data["megarope"]["n_hat"] == 8 and data["megarope_search"] == {"perplexity": 3.5, "generation": 12}
    assert read_factor_file(path) == rc
    # vanilla transformers computes the same long frequencies and attention factor from the file
    hf_keys = {k: v for k, v in data.items() if not k.startswith("megarope")}
    hf = LlamaConfig(**hf_keys, hidden_size=64, num_attention_heads=4)
    inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", 512)
    torch.testing.assert_close(inv_freq.double(), rc.inv_freq(512), rtol=1e-6, atol=0)
    assert attention == pytest.approx(rc.attention_factor(512))
    with pytest.raises(ValueError, match="^rope_type:"):
        write_factor_file(tmp_path / "x.json", base)
    with pytest.raises(ValueError, match="^max_position_embeddings:"):
        to_rope_config(best, RopeConfig(head_dim=16), cfg.scale)


def test_plots_are_written(tmp_path):
    cfg = small(iterations=3)
    result = LongRopeSearch(cfg, Synthetic(cfg)).run()
    paths = plot_search(result, cfg, tmp_path / "plots")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["search_history.png", "search_factors.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob(".*"))


def test_exhausted_search_space_shrinks_generations(caplog):
    # one grid point and two n̂ values: only two candidates exist
    cfg = small(scale=1.0, lambda_max_ratio=1.0, n_hat_candidates=(0, 1), population=4, topk=2, iterations=2)
    with caplog.at_level(logging.WARNING, logger="megarope.search.evolution"):
        result = LongRopeSearch(cfg, Synthetic(cfg)).run()
    assert result.evaluations == 2 and len(result.population) == 2
    assert "no new candidate" in caplog.text


@pytest.mark.parametrize("stop_at", [1, 2, 5])
def test_a_stopped_search_resumes_to_the_uninterrupted_result(tmp_path, stop_at):
    """stop_requested is asked after every scored chunk and generation; the n-th yes stops the
    search with its state saved, and a new search on that state ends as one never stopped."""
    cfg = small(iterations=3, fitness_chunk=2)
    whole = LongRopeSearch(cfg, Synthetic(cfg)).run()
    asked = []

    def stop_requested():
        asked.append(1)
        return len(asked) == stop_at

    state = tmp_path / "state.json"
    with pytest.raises(SearchStopped):
        LongRopeSearch(cfg, Synthetic(cfg), state_path=state, stop_requested=stop_requested).run()
    saved = json.loads(state.read_text())
    assert 0 < len(saved["scores"]) < whole.evaluations  # what was scored before the stop is kept
    resumed = LongRopeSearch(cfg, Synthetic(cfg), state_path=state).run()
    assert resumed.history == whole.history and resumed.population == whole.population
    assert resumed.best == whole.best and resumed.evaluations == whole.evaluations


# ------------------------------------------------------------------------------- progressive extension
PRIOR = (1.0, 1.0, 1.2, 1.5, 2.0, 2.6, 3.3, 4.0)  # a monotone 4x result, on the grid


def test_generation_0_holds_the_prior_as_is_and_rescaled():
    from megarope.search.evolution import rescale_prior

    cfg = small(prior_factors=PRIOR, prior_scale=4.0, prior_n_hat=4)
    fitness = Synthetic(cfg)
    LongRopeSearch(cfg, fitness).run()
    first = fitness.calls[0]
    rescaled = rescale_prior(PRIOR, 4.0, 8.0)
    # the reference's rule: λ' - 1 grows by (s - 1)/(s_prev - 1) = 7/3
    assert rescaled[-1] == pytest.approx(1 + 3.0 * 7 / 3)
    assert Candidate(PRIOR, 4) in first
    assert Candidate(tuple(round(v, 2) for v in rescaled), 4) in first
    assert {seed for seed in seed_candidates(small())} <= set(first)  # PI, NTK, YaRN still seeded


def test_prior_bound_keeps_every_candidate_between_the_prior_and_its_ceiling():
    cfg = small(prior_factors=PRIOR, prior_scale=4.0, prior_bound=True, iterations=15)

    class FavoursPrior(Synthetic):
        """Optimum just below the prior: the best the bounded search can do is the prior itself."""

        def __init__(self, config):
            super().__init__(config)
            self.target = [max(v - 0.3, 1.0) for v in PRIOR]

    fitness = FavoursPrior(cfg)
    result = LongRopeSearch(cfg, fitness).run()
    ceiling = [v * 1.25 * 8.0 / 4.0 for v in PRIOR]
    for batch in fitness.calls:
        for c in batch:
            assert all(p - 1e-9 <= v <= top + 1e-9 for v, p, top in zip(c.factors, PRIOR, ceiling))
            assert is_valid(c, cfg)
    assert all(v >= p for v, p in zip(result.best.factors, PRIOR))
    assert result.best.factors == PRIOR  # the favoured factors won
    assert cfg.top_lambda == pytest.approx(ceiling[-1])


@pytest.mark.parametrize("overrides, field", [
    ({"prior_bound": True}, "search.prior_bound"),  # a complete config (scale and window set)
    ({"prior_factors": PRIOR}, "search.prior_scale"),
    ({"prior_factors": PRIOR[:-1], "prior_scale": 4.0}, "search.prior_factors"),
    ({"prior_factors": PRIOR, "prior_scale": 16.0, "prior_bound": True}, "search.prior_bound"),
    ({"lambda_max": 0.5}, "search.lambda_max"),
    ({"yarn_beta_fast": 1.0}, "search.yarn_beta_fast"),
])
def test_bad_prior_settings_fail_naming_the_field(overrides, field):
    with pytest.raises(SearchConfigError) as err:
        small(**overrides)
    assert err.value.field == field


def test_lambda_max_is_an_absolute_ceiling_and_yarn_seed_takes_its_ramp():
    assert small(lambda_max=64.0).top_lambda == 64.0
    mistral = small(yarn_beta_fast=128.0, yarn_beta_slow=2.0)
    rc = RopeConfig(rope_type="yarn", head_dim=16, factor=8.0, original_max_position_embeddings=64,
                    beta_fast=128.0, beta_slow=2.0)
    expected = (RopeConfig(head_dim=16).inv_freq() / rc.inv_freq()).tolist()
    assert seed_factors("yarn", mistral) == pytest.approx(expected)
    assert seed_factors("yarn", mistral) != seed_factors("yarn", small())
