"""Spreading the search's fitness evaluations over data-parallel ranks.

Every rank runs the same :class:`~megarope.search.evolution.LongRopeSearch` with the same seed;
only the perplexity evaluations are shared out. As long as every rank receives the same scores,
every rank makes the same choices, so no search state needs to be broadcast.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["score_distributed"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def score_distributed(
    candidates: Sequence[Any],
    score_one: Callable[[Any], float],
    group: dist.ProcessGroup | None = None,
) -> list[float]:
    """Scores of ``candidates`` (input order) on every rank of ``group`` (default: the world).

    Rank r of the group scores candidates r, r+W, r+2W, ... with ``score_one``. Pass the
    data-parallel group when each model replica spans several ranks (TP/PP/CP): every rank of a
    replica then scores the same candidates, and ``score_one`` must return the same value on all
    of them (e.g. the loss after the model's own reductions, broadcast from the last pipeline
    stage). Without an initialized process group every candidate is scored here.

    Collective: all ranks of ``group`` must call it with the same candidates. A rank whose
    ``score_one`` raises leaves the others waiting in the collective until the launcher stops them.
    """
    if not _distributed():
        return [float(score_one(c)) for c in candidates]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    # Each slot is written by exactly one rank, zeros elsewhere: a float64 sum returns every score
    # bit for bit (x + 0 == x, inf and nan included) with one tensor collective, which NCCL and
    # gloo both support, unlike all_gather_object's pickling.
    scores = torch.zeros(len(candidates), dtype=torch.float64)
    for i in range(rank, len(candidates), world):
        scores[i] = float(score_one(candidates[i]))
    scores = scores.to(device)
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)
    return scores.cpu().tolist()
