"""Samples → deterministic, resumable batches, each data-parallel rank taking its slice.

A batch from :class:`DataIterator` stacks samples to ``[b, s]``; its ``cu_seqlens`` are the document
offsets over the ``b*s`` tokens flattened row by row, as a packed THD path takes them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megarope.data.config import DataError

# what a saved iterator must agree on to resume, and the setting each comes from
_RESUME_FIELDS = {"seed": "train.seed", "num_samples": "data.num_samples", "global_batch": "train.global_batch_size"}

def collate(items: list[dict]) -> dict:
    """Stack samples to ``[b, s]``; ``cu_seqlens`` become offsets over the flattened ``b*s`` tokens."""
    batch = {k: torch.stack([x[k] for x in items]) for k in items[0] if k != "cu_seqlens"}
    if "cu_seqlens" in items[0]:
        s = items[0]["tokens"].shape[0]
        parts = [x["cu_seqlens"][:-1] + i * s for i, x in enumerate(items)]
        batch["cu_seqlens"] = torch.cat(parts + [torch.tensor([len(items) * s], dtype=torch.int32)])
    return batch


def micro_batches(batch: dict, size: int) -> list[dict]:
    """``batch`` cut into micro-batches of ``size`` rows; ``cu_seqlens`` cut with them (every row
    starts a sequence of its own, so the row boundaries are among the offsets)."""
    rows, out = batch["tokens"].shape[0], []
    s = batch["tokens"].shape[1]
    for first in range(0, rows, size):
        micro = {k: v[first : first + size] for k, v in batch.items() if k != "cu_seqlens"}
        if "cu_seqlens" in batch:
            cu = batch["cu_seqlens"]
            lo, hi = first * s, min(first + size, rows) * s
            micro["cu_seqlens"] = cu[(cu >= lo) & (cu <= hi)] - lo
        out.append(micro)
    return out


class DataIterator:
    """Endless batches in a seeded shuffled order per epoch.

    Each step consumes one global batch of ``batch_size * dp_size`` samples of the epoch's order; rank
    ``dp_rank`` takes its contiguous slice. The tail that cannot fill a global batch is dropped, so all
    ranks take the same number of steps. ``state_dict()`` is identical on every rank.

    Samples (or parts of a ``ConcatDataset``) with a ``set_step`` method are a curriculum
    (``data.copy_gap_ramp``): each is told the step of the batch before it is drawn, so a resumed
    iterator makes the same batches as an uninterrupted one.
    """

    def __init__(self, samples: Sequence[dict], batch_size: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError("data.num_samples", f"{len(samples)} samples cannot fill one global batch of "
                            f"batch_size={batch_size} x dp_size={dp_size}")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            # A seed sequence of (seed, epoch) gives independent orders per epoch.
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.dp_rank * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        step = self.epoch * self.steps_per_epoch + self.position
        for part in getattr(self.samples, "datasets", [self.samples]):
            if hasattr(part, "set_step"):  # a curriculum (data.copy_gap_ramp): samples depend on the step
                part.set_step(step)
        self.position += 1
        return collate([self.samples[int(i)] for i in indices])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": len(self.samples),
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch the saved iterator gave; the data must be the same."""
        mine = self.state_dict()
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != mine[key]:
                raise DataError(_RESUME_FIELDS[key], f"cannot resume, {key} was {state[key]} and is now "
                                f"{mine[key]}; the batches would differ from the interrupted run")
        self.epoch, self.position = state["epoch"], state["position"]
