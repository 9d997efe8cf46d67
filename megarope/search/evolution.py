"""LongRoPE's evolutionary search of per-frequency rescale factors (arXiv 2402.13753, Algorithm 1,
Table 4), independent of any model: the caller supplies the fitness (perplexity, lower is better).

A :class:`Candidate` is λ (one factor per frequency, ``rotary_dim / 2`` floats on a grid of step
``lambda_step`` in [1, ``lambda_max_ratio``·s]) plus n̂ (the first positions left
un-interpolated). Generation 0 is the seeds (PI, NTK, YaRN: ratios of the registry's inverse
frequencies, snapped to the grid) and mutants of them. Each later generation keeps the ``topk``
best of the previous one and adds ``mutations`` mutants and ``crossovers`` children of them; a
candidate already scored is never proposed again. One ``random.Random``, seeded with
``SearchConfig.seed`` and saved in the state file, drives every choice: a search and its resumed
twin draw the same numbers and, given a deterministic fitness, end identically.

Where the paper and its reference code (microsoft/LongRoPE) differ, the paper's choice is the
default and the code's is a setting: λ in [1, 1.25·s] (code: [1, 1+s], i.e.
``lambda_max_ratio=(1+s)/s``); seeds PI, NTK and YaRN (code: YaRN only, ``seeds=("yarn",)``).

Progressive extension (paper §3.2, the code's ``--init-factors``): a search may start from the
factors of an earlier, shorter extension (``prior_factors`` at ``prior_scale``). Generation 0 then
holds them as they are and rescaled to the new scale (:func:`rescale_prior`) beside the classic
seeds; with ``prior_bound`` each λ_i stays in [λ_prev,i, λ_prev,i · lambda_max_ratio · s/s_prev]
(λ = λ_prev × λ′, λ′ in [1, 1.25·s/s_prev], the paper's search of the fine-tuned model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Container, Optional, Sequence, Tuple

from megarope import dist, fields
from megarope.atomic import atomic_write_text
from megarope.errors import MegaropeError
from megarope.progress import Progress
from megarope.rope.config import RopeConfig, RopeConfigError

__all__ = [
    "Candidate",
    "LongRopeSearch",
    "SearchConfig",
    "SearchConfigError",
    "SearchResult",
    "crossover",
    "is_valid",
    "mutate",
    "read_factor_file",
    "seed_candidates",
    "seed_factors",
    "to_rope_config",
    "write_factor_file",
]

logger = logging.getLogger(__name__)

PAPER_N_HAT = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
SEED_METHODS = ("pi", "ntk", "yarn")
STATE_VERSION = 1
# Search settings that may differ between a run and its resume without changing the result.
RESUMABLE_CHANGES = ("iterations", "fitness_chunk")
# Top-level key of a factor file holding what the search adds to RopeConfig.to_hf() (its score...).
SEARCH_KEY = "megarope_search"


class SearchConfigError(MegaropeError):
    """Invalid search setting; ``field`` is ``search.<name>``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"search.{field}", message)


class SearchStopped(Exception):
    """The search stopped because ``stop_requested()`` said so; its state file holds everything
    scored so far (a new search on the same state path resumes it)."""

    def __init__(self, generation: int, evaluations: int):
        super().__init__(f"search stopped after generation {generation} with {evaluations} candidates scored")


@dataclass
class SearchConfig:
    """Every knob of the search; defaults are the paper's (Table 4 and §3.2).

    ``scale`` is s (target length / ``original_max_position_embeddings``); ``rotary_dim`` and
    ``rope_theta`` describe the model's RoPE. These four come from the model and the target length
    (:meth:`for_rope`): left unset (``scale`` and the window None), a SearchConfig holds settings
    only, as a run's ``search`` group does; a search needs them set. The first generation has
    ``population`` members, later ones ``topk + mutations + crossovers`` (64 = 32 + 16 + 16 in the
    paper). ``max_tries``: draws per mutant or crossover child before giving up (the reference
    code's ``max_crossover_try``). ``num_docs``: documents of the target length the caller's
    fitness scores per candidate (the search itself does not read it; it is part of the state so
    that a resume on other documents is refused). ``fitness_chunk``: candidates per fitness call,
    the state being saved after each call (0: one call per generation); it changes when progress
    is saved, never the result.

    ``lambda_max``: an absolute ceiling for λ replacing ``lambda_max_ratio``·s (short-context
    re-searches, whose best λ reach far beyond their nominal scale). ``prior_factors``,
    ``prior_scale``, ``prior_n_hat``: an earlier search's long factors, its scale and n̂, seeded in
    generation 0 as they are and rescaled (:func:`rescale_prior`); ``prior_bound`` bounds each λ_i
    by the prior (:attr:`bounds`). ``yarn_beta_fast``/``yarn_beta_slow``: the YaRN seed's ramp
    (transformers' 32/1; the reference code uses 128/2 for Mistral).

    A plain (mutable) dataclass so that OmegaConf/Hydra can use it as a structured config group.
    """

    scale: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    rotary_dim: int = 128
    rope_theta: float = 10_000.0
    population: int = 64
    iterations: int = 40
    mutations: int = 16
    crossovers: int = 16
    topk: int = 32
    mutation_prob: float = 0.3
    lambda_max_ratio: float = 1.25
    lambda_step: float = 0.01
    monotone: bool = True
    n_hat_candidates: Tuple[int, ...] = PAPER_N_HAT
    seeds: Tuple[str, ...] = SEED_METHODS
    seed: int = 0
    max_tries: int = 20
    num_docs: int = 4
    fitness_chunk: int = 0
    lambda_max: Optional[float] = None
    prior_factors: Optional[Tuple[float, ...]] = None
    prior_scale: Optional[float] = None
    prior_n_hat: int = 0
    prior_bound: bool = False
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    def __post_init__(self):
        # YAML, JSON and OmegaConf give lists
        self.n_hat_candidates = tuple(self.n_hat_candidates)
        self.seeds = tuple(self.seeds)
        if self.prior_factors is not None:
            self.prior_factors = tuple(float(v) for v in self.prior_factors)
        self._validate()

    @property
    def has_model(self) -> bool:
        """Whether the model's side (scale and original window) is set, as a search needs."""
        return self.scale is not None and self.original_max_position_embeddings is not None

    def _validate(self) -> None:
        if self.scale is not None and not self.scale >= 1:
            raise SearchConfigError("scale", f"must be >= 1, got {self.scale}")
        if self.original_max_position_embeddings is not None:
            _check_int(self.original_max_position_embeddings, "original_max_position_embeddings", 1)
        _check_int(self.rotary_dim, "rotary_dim", 4)  # NTK's exponent d/(d-2) needs d > 2
        if self.rotary_dim % 2:
            raise SearchConfigError("rotary_dim", f"must be even, got {self.rotary_dim}")
        if not self.rope_theta > 1:
            raise SearchConfigError("rope_theta", f"must be > 1, got {self.rope_theta}")
        for name in ("iterations", "mutations", "crossovers", "seed", "fitness_chunk"):
            _check_int(getattr(self, name), name, 0)
        for name in ("population", "topk", "max_tries", "num_docs"):
            _check_int(getattr(self, name), name, 1)
        if self.population < self.topk:
            raise SearchConfigError(
                "population",
                f"search.population ({self.population}) < search.topk ({self.topk}): need at least topk parents",
            )
        if self.crossovers and self.topk < 2:
            raise SearchConfigError("topk", f"crossovers need two parents, got search.topk = {self.topk}")
        if not 0 < self.mutation_prob <= 1:
            raise SearchConfigError("mutation_prob", f"must be in (0, 1], got {self.mutation_prob}")
        if not self.lambda_step > 0:
            raise SearchConfigError("lambda_step", f"must be > 0, got {self.lambda_step}")
        if self.scale is not None and not self.lambda_max_ratio * self.scale >= 1:
            raise SearchConfigError(
                "lambda_max_ratio", f"lambda_max_ratio * scale = {self.lambda_max_ratio * self.scale} must be >= 1"
            )
        if not self.n_hat_candidates:
            raise SearchConfigError("n_hat_candidates", "needs at least one value")
        for value in self.n_hat_candidates:
            _check_int(value, "n_hat_candidates", 0)
        if len(set(self.n_hat_candidates)) != len(self.n_hat_candidates):
            raise SearchConfigError("n_hat_candidates", f"values must be distinct, got {self.n_hat_candidates}")
        if not self.seeds:
            raise SearchConfigError("seeds", f"needs at least one of {SEED_METHODS}")
        unknown = [s for s in self.seeds if s not in SEED_METHODS]
        if unknown or len(set(self.seeds)) != len(self.seeds):
            raise SearchConfigError("seeds", f"must be distinct names among {SEED_METHODS}, got {self.seeds}")
        seeds = len(self.seeds) + (2 if self.prior_factors is not None else 0)
        if self.population < seeds:
            raise SearchConfigError("population", f"search.population ({self.population}) < number of seeds ({seeds})")
        if self.lambda_max is not None and not self.lambda_max >= 1:
            raise SearchConfigError("lambda_max", f"must be >= 1, got {self.lambda_max}")
        if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
            raise SearchConfigError("yarn_beta_fast", f"need 0 < yarn_beta_slow < yarn_beta_fast, got "
                                    f"{self.yarn_beta_slow} and {self.yarn_beta_fast}")
        self._validate_prior()

    def _validate_prior(self) -> None:
        _check_int(self.prior_n_hat, "prior_n_hat", 0)
        if self.prior_factors is None:
            # a settings-only config (a run's search group) may ask for the bound before the
            # stage fills the prior in; a complete one may not
            if self.prior_bound and self.has_model:
                raise SearchConfigError("prior_bound", "needs prior_factors (an earlier search's factors)")
            if self.prior_scale is not None and self.has_model:
                raise SearchConfigError("prior_scale", "given without prior_factors")
            return
        if self.prior_scale is None or not self.prior_scale >= 1:
            raise SearchConfigError("prior_scale", f"the scale prior_factors were searched for, >= 1; got "
                                    f"{self.prior_scale}")
        if len(self.prior_factors) != self.rotary_dim // 2:
            raise SearchConfigError("prior_factors", f"needs rotary_dim/2 = {self.rotary_dim // 2} entries, got "
                                    f"{len(self.prior_factors)}")
        if any(not v >= 1 for v in self.prior_factors):
            raise SearchConfigError("prior_factors", "entries must be >= 1 (interpolation factors)")
        if self.prior_bound and self.scale is not None and self.scale < self.prior_scale:
            raise SearchConfigError("prior_bound", f"the new scale {self.scale} is below the prior's "
                                    f"{self.prior_scale}: a bound above the prior cannot shrink the extension")

    @classmethod
    def for_rope(cls, base_rc: RopeConfig, scale: float, **overrides: Any) -> SearchConfig:
        """Settings ``overrides`` for extending the model whose RoPE is ``base_rc`` by ``scale``."""
        return cls(**overrides).extending(base_rc, scale)

    def extending(self, base_rc: RopeConfig, scale: float, **changes: Any) -> SearchConfig:
        """These settings with the model's side set: extending ``base_rc`` by ``scale``; ``changes``
        (e.g. the prior) are made in the same step, validated together."""
        return dataclasses.replace(
            self,
            scale=scale,
            original_max_position_embeddings=_original_window(base_rc),
            rotary_dim=base_rc.rotary_dim,
            rope_theta=base_rc.rope_theta,
            **changes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        return fields.from_dict(cls, values, SearchConfigError)

    # λ lives on the grid 1 + k·lambda_step, k = 0..grid_top; operators work on the integers k so
    # that equality (dedupe) and monotonicity are exact.
    @property
    def grid_top(self) -> int:
        if self.prior_bound:
            return max(high for _, high in self.bounds)
        top = self.lambda_max if self.lambda_max is not None else self.lambda_max_ratio * self.scale
        return self._floor_index(top)

    @property
    def top_lambda(self) -> float:
        """The largest λ the search can reach."""
        return self.grid_value(self.grid_top)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Grid-index range [low, high] of each λ_i: [0, grid_top] for all, or, with
        ``prior_bound``, [λ_prev,i, λ_prev,i · lambda_max_ratio · s/s_prev] (λ = λ_prev × λ′ with
        λ′ in the paper's [1, 1.25·s/s_prev]). Both ends of a monotone prior are monotone, so a
        monotone child between its neighbours always has a non-empty range."""
        if not self.prior_bound:
            return [(0, self.grid_top)] * (self.rotary_dim // 2)
        ratio = self.lambda_max_ratio * self.scale / self.prior_scale
        out, low_floor = [], 0
        for value in self.prior_factors:
            low = max(math.ceil((value - 1.0) / self.lambda_step - 1e-9), 0)
            if self.monotone:  # a non-monotone prior: its running maximum is the least monotone λ above it
                low = low_floor = max(low, low_floor)
            out.append((low, max(self._floor_index(value * ratio), low)))
        if self.monotone:  # upper ends monotone too (running maximum from the left)
            for i in range(1, len(out)):
                out[i] = (out[i][0], max(out[i][1], out[i - 1][1]))
        return out

    def _floor_index(self, value: float) -> int:
        return max(math.floor((value - 1.0) / self.lambda_step + 1e-9), 0)

    def grid_value(self, k: int) -> float:
        # rounded so that the same k always gives the same, shortest-printing float
        return round(1.0 + k * self.lambda_step, 10)

    def grid_index(self, value: float) -> int:
        return round((value - 1.0) / self.lambda_step)


def _original_window(base_rc: RopeConfig) -> int:
    """The window the model was trained with: its original one if already extended, else its own."""
    window = base_rc.original_max_position_embeddings or base_rc.max_position_embeddings
    if window is None:
        raise RopeConfigError(
            "max_position_embeddings",
            "the base RopeConfig sets neither original_max_position_embeddings nor max_position_embeddings",
        )
    return window


def _check_int(value: Any, field: str, minimum: int) -> None:
    fields.check_int(value, field, minimum, SearchConfigError)


@dataclass(frozen=True)
class Candidate:
    """λ_i for each frequency i (``rotary_dim / 2`` grid values) and n̂. Hashable: the score cache key."""

    factors: tuple[float, ...]
    n_hat: int = 0

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(float(v) for v in self.factors))
        object.__setattr__(self, "n_hat", int(self.n_hat))

    def to_json(self) -> list:
        return [list(self.factors), self.n_hat]

    @classmethod
    def from_json(cls, value: Sequence) -> Candidate:
        return cls(tuple(value[0]), value[1])


# --------------------------------------------------------------------------------- operators
def seed_factors(method: str, config: SearchConfig) -> tuple[float, ...]:
    """λ_i of a classic method (``pi``, ``ntk`` or ``yarn``), off the grid: the ratio of the
    unscaled to the method's inverse frequencies, both from the RoPE registry."""
    base = RopeConfig(head_dim=config.rotary_dim, rope_theta=config.rope_theta)
    ramp = {"beta_fast": config.yarn_beta_fast, "beta_slow": config.yarn_beta_slow}
    method_rc = {
        "pi": lambda: base.replace(rope_type="linear", factor=config.scale),
        "ntk": lambda: base.replace(rope_type="ntk", factor=config.scale),
        "yarn": lambda: base.replace(
            rope_type="yarn",
            factor=config.scale,
            original_max_position_embeddings=config.original_max_position_embeddings,
            **ramp,
        ),
    }
    if method not in method_rc:
        raise SearchConfigError("seeds", f"unknown seed method {method!r}; known: {SEED_METHODS}")
    return tuple((base.inv_freq() / method_rc[method]().inv_freq()).tolist())


def rescale_prior(factors: Sequence[float], prior_scale: float, scale: float) -> tuple[float, ...]:
    """An earlier search's λ carried to a new scale as the reference code does (``--init-factors``):
    λ' = 1 + (λ − 1)(s − 1)/(s_prev − 1), i.e. each factor's interpolation share grows with the
    scale; at s_prev = 1 (no interpolation to grow) λ is returned as is."""
    if prior_scale <= 1:
        return tuple(factors)
    return tuple(1.0 + (v - 1.0) * (scale - 1.0) / (prior_scale - 1.0) for v in factors)


def _snap(factors: Sequence[float], config: SearchConfig) -> list[int]:
    """Nearest grid indices, clamped to each dimension's range, then made monotone by a running
    maximum (which stays in range: both ends of the ranges are monotone)."""
    indices = [min(max(config.grid_index(v), low), high) for v, (low, high) in zip(factors, config.bounds)]
    if config.monotone:
        for i in range(1, len(indices)):
            indices[i] = max(indices[i], indices[i - 1])
    return indices


def _from_indices(indices: Sequence[int], n_hat: int, config: SearchConfig) -> Candidate:
    return Candidate(tuple(config.grid_value(k) for k in indices), n_hat)


def seed_candidates(config: SearchConfig) -> list[Candidate]:
    """The seeds on the grid: with a prior, first the prior as it is (with its n̂ where allowed)
    and rescaled to the new scale, then the configured classic seeds with the smallest allowed n̂
    (0 in the paper's set); seeds that coincide after snapping appear once."""
    n_hat = min(config.n_hat_candidates)
    factor_sets: list[tuple[Sequence[float], int]] = []
    if config.prior_factors is not None:
        prior_n_hat = config.prior_n_hat if config.prior_n_hat in config.n_hat_candidates else n_hat
        factor_sets += [(config.prior_factors, prior_n_hat),
                        (rescale_prior(config.prior_factors, config.prior_scale, config.scale), prior_n_hat)]
    factor_sets += [(seed_factors(method, config), n_hat) for method in config.seeds]
    seeds: list[Candidate] = []
    for factors, candidate_n_hat in factor_sets:
        candidate = _from_indices(_snap(factors, config), candidate_n_hat, config)
        if candidate not in seeds:
            seeds.append(candidate)
    return seeds


def is_valid(candidate: Candidate, config: SearchConfig) -> bool:
    """Right length, every λ on the grid and in range, monotone (if required), n̂ allowed."""
    factors = candidate.factors
    if len(factors) != config.rotary_dim // 2 or candidate.n_hat not in config.n_hat_candidates:
        return False
    indices = [config.grid_index(v) for v in factors]
    if any(not low <= k <= high or config.grid_value(k) != v
           for k, v, (low, high) in zip(indices, factors, config.bounds)):
        return False
    return not config.monotone or all(a <= b for a, b in zip(indices, indices[1:]))


def mutate(
    parent: Candidate, config: SearchConfig, rng: random.Random, seen: Container[Candidate] = ()
) -> Candidate | None:
    """A mutant of ``parent``, or None after ``max_tries`` draws that all gave ``parent`` or a
    member of ``seen``.

    Each draw visits the dimensions in order and, with probability ``mutation_prob``, redraws λ_i
    uniformly on the grid between its neighbours (the just-redrawn λ_{i-1} and λ_{i+1}; 1 and
    λ_max at the ends; the whole range without the monotone constraint), as the reference code
    does, within the dimension's own range (:attr:`SearchConfig.bounds`): the child is monotone
    and in range by construction, so only repeats are rejected.
    With the same probability n̂ becomes another allowed value, uniformly.
    """
    base = [config.grid_index(v) for v in parent.factors]
    bounds, p = config.bounds, config.mutation_prob
    other_n_hats = [v for v in config.n_hat_candidates if v != parent.n_hat]
    for _ in range(config.max_tries):
        indices = list(base)
        for i in range(len(indices)):
            if rng.random() < p:
                low, high = bounds[i]
                if config.monotone:
                    low = max(low, indices[i - 1]) if i > 0 else low
                    high = min(high, indices[i + 1]) if i + 1 < len(indices) else high
                indices[i] = rng.randint(low, high)
        n_hat = parent.n_hat
        if other_n_hats and rng.random() < p:
            n_hat = rng.choice(other_n_hats)
        child = _from_indices(indices, n_hat, config)
        if child != parent and child not in seen:
            return child
    return None


def crossover(
    a: Candidate, b: Candidate, config: SearchConfig, rng: random.Random, seen: Container[Candidate] = ()
) -> Candidate | None:
    """A child taking each λ_i, and n̂, from ``a`` or ``b`` with probability 1/2, or None after
    ``max_tries`` draws that were all non-monotone, a parent, or in ``seen``. Both parents being
    on the grid and in range, only monotonicity needs re-checking."""
    for _ in range(config.max_tries):
        factors = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors))
        n_hat = a.n_hat if rng.random() < 0.5 else b.n_hat
        child = Candidate(factors, n_hat)
        if config.monotone and any(x > y for x, y in zip(factors, factors[1:])):
            continue
        if child != a and child != b and child not in seen:
            return child
    return None


# --------------------------------------------------------------------------------- the search
Fitness = Callable[[list[Candidate]], Sequence[float]]


@dataclass
class SearchResult:
    """Where the search stands: ``population`` is the last finished generation, best first."""

    best: Candidate
    best_ppl: float
    generation: int
    history: list[dict[str, Any]]
    population: list[tuple[Candidate, float]]
    evaluations: int


class LongRopeSearch:
    """Algorithm 1 of the paper around a caller-supplied ``fitness(candidates) -> perplexities``.

    ``fitness`` must be deterministic for resumption to reproduce a run exactly; a NaN perplexity
    counts as +inf (a diverged candidate ranks last). With ``state_path``, the state is written
    atomically (main rank only) once a generation's children are drawn, after each
    ``fitness_chunk`` of scores and once the generation is ranked; a new instance with the same
    path resumes from it, re-scoring nothing already scored. ``on_generation(result)`` runs on
    every rank after each generation (generation 0 is the scored initial population).
    ``stop_requested()`` (collective: every rank calls it at the same points) is asked after each
    scored chunk and each generation; when it says yes the state is saved and :class:`SearchStopped`
    is raised, so a new instance on the same path continues exactly where this one stopped.

    Under torch.distributed every rank runs its own instance with the same config and a fitness
    built on :func:`~megarope.search.distributed.score_distributed`; ``is_main`` (default: global
    rank 0) selects the rank that logs and writes.
    """

    def __init__(
        self,
        config: SearchConfig,
        fitness: Fitness,
        state_path: str | os.PathLike | None = None,
        on_generation: Callable[[SearchResult], None] | None = None,
        *,
        is_main: bool | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ):
        if not config.has_model:
            missing = "scale" if config.scale is None else "original_max_position_embeddings"
            raise SearchConfigError(missing, "not set; a search needs the model's side (SearchConfig.for_rope / extending)")
        self.config = config
        self.fitness = fitness
        self.state_path = os.fspath(state_path) if state_path is not None else None
        self.on_generation = on_generation
        self.is_main = dist.is_rank0() if is_main is None else is_main
        self.stop_requested = stop_requested
        self._rng = random.Random(config.seed)
        self._scores: dict[Candidate, float] = {}
        self._population: list[Candidate] = []  # last finished generation, best first
        self._pending: list[Candidate] | None = None  # drawn, not yet ranked, members of the next one
        self._generation = -1  # last finished generation
        self._history: list[dict[str, Any]] = []
        self._elapsed = 0.0  # seconds spent in earlier sessions
        if self.state_path and os.path.exists(self.state_path):
            self._load()

    # ----------------------------------------------------------------------------- main loop
    def run(self) -> SearchResult:
        self._session_start = time.monotonic()
        # generation 0 is the initial population: iterations + 1 generations in all
        with Progress("search", self.config.iterations + 1, unit="generation", initial=self._generation + 1,
                      enabled=self.is_main) as bar:
            while self._generation < self.config.iterations:
                if self._pending is None:
                    self._pending = self._initial_population() if self._generation < 0 else self._children()
                    self._save()
                self._score_pending()
                self._finish_generation()
                entry = self._history[-1]
                bar.update(best_ppl=entry["best_ppl"], mean_ppl=entry["mean_ppl"], evaluated=entry["evaluations"])
                if self._generation < self.config.iterations:
                    self._stop_if_requested()
        return self.result()

    def result(self) -> SearchResult:
        if not self._population:
            raise RuntimeError("the search has not scored its initial population yet: call run()")
        best = self._population[0]
        return SearchResult(
            best=best,
            best_ppl=self._scores[best],
            generation=self._generation,
            history=[dict(h) for h in self._history],
            population=[(c, self._scores[c]) for c in self._population],
            evaluations=len(self._scores),
        )

    def _initial_population(self) -> list[Candidate]:
        """Seeds, then mutants of the seeds in turn up to ``population`` members."""
        seeds = seed_candidates(self.config)

        def mutant(j: int, seen: set[Candidate]) -> Candidate | None:
            return mutate(seeds[j % len(seeds)], self.config, self._rng, seen)

        return self._draw(self.config.population - len(seeds), mutant, list(seeds), set(seeds) | set(self._scores))

    def _children(self) -> list[Candidate]:
        """``mutations`` mutants of random parents, then ``crossovers`` children of random parent
        pairs; a failed crossover mutates its first parent instead (as the reference code)."""
        cfg, rng = self.config, self._rng
        parents = self._population[: cfg.topk]

        def child(j: int, seen: set[Candidate]) -> Candidate | None:
            if j < cfg.mutations or len(parents) < 2:
                return mutate(parents[rng.randrange(len(parents))], cfg, rng, seen)
            first, second = sorted(rng.sample(range(len(parents)), 2))
            made = crossover(parents[first], parents[second], cfg, rng, seen)
            return made if made is not None else mutate(parents[first], cfg, rng, seen)

        return self._draw(cfg.mutations + cfg.crossovers, child, [], set(self._scores))

    def _draw(
        self,
        count: int,
        make: Callable[[int, set[Candidate]], Candidate | None],
        batch: list[Candidate],
        seen: set[Candidate],
    ) -> list[Candidate]:
        """``batch`` plus up to ``count`` new candidates ``make(j, seen)`` (None: none found in
        ``max_tries`` draws, the generation is one smaller); ``seen`` grows with each."""
        for j in range(count):
            candidate = make(j, seen)
            if candidate is None:
                self._warn_no_child()
                continue
            batch.append(candidate)
            seen.add(candidate)
        return batch

    def _warn_no_child(self) -> None:
        if self.is_main:
            logger.warning(
                "search: no new candidate in %d tries (search space nearly exhausted?); the generation will be smaller",
                self.config.max_tries,
            )

    def _score_pending(self) -> None:
        todo = [c for c in self._pending if c not in self._scores]
        size = self.config.fitness_chunk or max(len(todo), 1)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            scores = list(self.fitness(chunk))
            if len(scores) != len(chunk):
                raise ValueError(f"fitness returned {len(scores)} scores for {len(chunk)} candidates")
            for candidate, score in zip(chunk, scores):
                score = float(score)
                self._scores[candidate] = math.inf if math.isnan(score) else score
            if self.config.fitness_chunk:
                self._save()
                self._stop_if_requested()

    def _stop_if_requested(self) -> None:
        if self.stop_requested is not None and self.stop_requested():
            self._save()
            raise SearchStopped(self._generation, len(self._scores))

    def _finish_generation(self) -> None:
        survivors = self._population[: self.config.topk] if self._generation >= 0 else []
        # stable sort: ties keep their order, so the ranking is deterministic
        self._population = sorted(survivors + self._pending, key=self._scores.__getitem__)
        self._pending = None
        self._generation += 1
        scores = [self._scores[c] for c in self._population]
        finite = [s for s in scores if math.isfinite(s)]
        self._history.append(
            {
                "generation": self._generation,
                "best_ppl": scores[0],
                "mean_ppl": sum(finite) / len(finite) if finite else math.inf,
                "evaluations": len(self._scores),
            }
        )
        self._save()
        if self.on_generation is not None:
            self.on_generation(self.result())

    # ----------------------------------------------------------------------------- state file
    def _state(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        elapsed = self._elapsed + time.monotonic() - self._session_start
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "generation": self._generation,
            "population": [c.to_json() for c in self._population],
            "pending": None if self._pending is None else [c.to_json() for c in self._pending],
            "scores": [[*c.to_json(), s] for c, s in self._scores.items()],
            "rng": [version, list(internal), gauss],
            "history": self._history,
            "elapsed_s": elapsed,
        }

    def _save(self) -> None:
        if self.state_path and self.is_main:
            atomic_write_text(self.state_path, json.dumps(self._state()))

    def _load(self) -> None:
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_path}: state version {state.get('version')}, expected {STATE_VERSION}")
        stored = SearchConfig.from_dict(state["config"])
        for f in dataclasses.fields(SearchConfig):
            if f.name not in RESUMABLE_CHANGES and getattr(stored, f.name) != getattr(self.config, f.name):
                raise SearchConfigError(
                    f.name,
                    f"{getattr(self.config, f.name)!r} differs from {getattr(stored, f.name)!r} in the state file "
                    f"{self.state_path}; resume with the same settings (only {RESUMABLE_CHANGES} may change) "
                    "or use a new state path",
                )
        self._generation = state["generation"]
        self._population = [Candidate.from_json(c) for c in state["population"]]
        pending = state["pending"]
        self._pending = None if pending is None else [Candidate.from_json(c) for c in pending]
        self._scores = {Candidate(factors, n_hat): score for factors, n_hat, score in state["scores"]}
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._history = state["history"]
        self._elapsed = state["elapsed_s"]
        if self.is_main:
            logger.info(
                "search: resuming from %s at generation %d/%d (%d candidates scored)",
                self.state_path,
                self._generation,
                self.config.iterations,
                len(self._scores),
            )


# --------------------------------------------------------------------------------- outputs
def to_rope_config(
    candidate: Candidate, base_rc: RopeConfig, scale: float, short_factor: Sequence[float] | None = None
) -> RopeConfig:
    """The ``longrope`` RopeConfig extending ``base_rc`` (the model's RoPE) by ``scale`` with the
    searched λ as ``long_factor`` and n̂. ``short_factor`` defaults to λ too, until the separate
    short-window search replaces it. ``factor`` = s, so the attention factor is sqrt(1 + ln s / ln L)."""
    window = _original_window(base_rc)
    return RopeConfig(
        rope_type="longrope",
        head_dim=base_rc.head_dim,
        rope_theta=base_rc.rope_theta,
        partial_rotary_factor=base_rc.partial_rotary_factor,
        max_position_embeddings=round(scale * window),
        original_max_position_embeddings=window,
        factor=float(scale),
        long_factor=candidate.factors,
        short_factor=candidate.factors if short_factor is None else tuple(short_factor),
        n_hat=candidate.n_hat,
    )


def write_factor_file(path: str | os.PathLike, rc: RopeConfig, extra: dict[str, Any] | None = None) -> None:
    """Write ``rc.to_hf()`` as JSON, atomically: the Hugging Face keys (``rope_parameters`` and
    ``rope_scaling`` with ``rope_type: longrope``, ``long_factor``, ``short_factor``, ``factor``,
    ``original_max_position_embeddings``), which vanilla transformers reads, plus, when n̂ > 0,
    the full RopeConfig with ``n_hat`` under the top-level ``megarope`` key (transformers has no
    n̂). ``extra`` (e.g. the search's perplexity and generation) goes under ``megarope_search``.
    :func:`read_factor_file` (``RopeConfig.from_hf``) reads it back."""
    if rc.rope_type != "longrope":
        raise RopeConfigError("rope_type", f"a factor file holds a 'longrope' RopeConfig, got {rc.rope_type!r}")
    data = rc.to_hf()
    if extra:
        data[SEARCH_KEY] = extra
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_factor_file(path: str | os.PathLike) -> RopeConfig:
    with open(path, encoding="utf-8") as f:
        return RopeConfig.from_hf(json.load(f))
