"""PNG plots of a LongRoPE search: perplexity per generation, and the best factors per dimension
beside the classic methods' (PI, NTK, YaRN).

Figures are saved by ``megarope.plotting.save_figure`` (Agg canvas, atomic files).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from matplotlib.figure import Figure

from megarope.plotting import save_figure
from megarope.search.evolution import SEED_METHODS, Candidate, SearchConfig, SearchResult, seed_factors

__all__ = ["plot_candidate_factors", "plot_history", "plot_search"]

_SEED_STYLE = {"pi": ("PI", "tab:blue"), "ntk": ("NTK", "tab:green"), "yarn": ("YaRN", "tab:orange")}


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> str:
    """Best and mean perplexity of each generation (``SearchResult.history``)."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    generations = [h["generation"] for h in history]
    best = [h["best_ppl"] for h in history]
    mean = [h["mean_ppl"] for h in history]
    ax.plot(generations, best, marker="o", markersize=3, label="best")
    ax.plot(generations, mean, marker="o", markersize=3, label="population mean (finite)")
    finite = [v for v in best + mean if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 10:
        ax.set_yscale("log")  # seeds can be orders of magnitude worse than the result
    ax.set_xlabel("generation")
    ax.set_ylabel("perplexity")
    ax.set_title("LongRoPE search")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_candidate_factors(candidate: Candidate, config: SearchConfig, path: str | os.PathLike) -> str:
    """λ_i per frequency index i of ``candidate`` beside PI, NTK and YaRN's (off-grid) factors."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    dims = range(len(candidate.factors))
    for method in SEED_METHODS:
        label, color = _SEED_STYLE[method]
        ax.plot(dims, seed_factors(method, config), color=color, linestyle="--", linewidth=1, label=label)
    label = f"searched (n̂ = {candidate.n_hat})"
    ax.plot(dims, candidate.factors, color="black", marker="o", markersize=2.5, label=label)
    ax.axhline(config.top_lambda, color="grey", linewidth=0.6, linestyle=":", label="search bound")
    ax.set_yscale("log")  # λ spans 1..s, several octaves for large extensions
    ax.set_xlabel("frequency index i (high to low frequency)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_title(f"LongRoPE factors, s = {config.scale:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def plot_search(result: SearchResult, config: SearchConfig, out_dir: str | os.PathLike) -> list[str]:
    """Both plots as ``search_history.png`` and ``search_factors.png`` in ``out_dir``."""
    return [
        plot_history(result.history, os.path.join(out_dir, "search_history.png")),
        plot_candidate_factors(result.best, config, os.path.join(out_dir, "search_factors.png")),
    ]
