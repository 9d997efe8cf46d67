"""Progress of a long stage (training steps, search generations) as a person reads it.

On a terminal: a ``tqdm`` bar per stage on rank 0, log lines printed above it. Otherwise (a SLURM
``.out`` file, ``| tee log``): one plain log line every ``every`` units and at the end, e.g.
``train 20/120 steps | loss 5.1234 | 812 tok/s | eta 0:01:23``. Rates and the ETA come from the
stage's recent pace (exponential moving average), not from its whole history, so a pause or a
change of load moves them within a few updates instead of skewing them for the rest of the stage.
Only global rank 0 shows progress (:func:`megarope.dist.is_rank0`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megarope import dist

log = logging.getLogger(__name__)

SMOOTHING = 0.2
"""Weight of the newest interval in the moving averages (tqdm's own bar uses the same weight)."""


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _terminal_columns() -> int:
    """Width of the terminal stdout is on; 0 when it is none (a file, a pipe) or reports no size
    (a pty opened without one), where a bar would draw nothing."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (OSError, ValueError, io.UnsupportedOperation):
        return 0


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


class Progress:
    """``desc`` from ``initial`` to ``total`` ``unit``s; a context manager, :meth:`update` per unit.

    ``every``: units between plain lines (the last unit always prints one). ``enabled``: show
    anything at all (default: on global rank 0). ``tokens`` given to :meth:`update` yields a
    smoothed tokens/s; other keyword values are shown as they are.
    """

    def __init__(self, desc: str, total: int, unit: str = "step", initial: int = 0, every: int = 1,
                 enabled: bool | None = None):
        self.desc, self.total, self.unit, self.every = desc, total, unit, max(1, every)
        self.done = initial
        self.enabled = dist.is_rank0() if enabled is None else enabled
        self.seconds_per_unit: float | None = None
        self._tokens_per_unit: float | None = None
        self._last = time.monotonic()
        self._bar: tqdm | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Progress:
        if self.enabled and _terminal_columns() > 0:
            # log records go through tqdm.write so they print above the bar instead of through it
            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(
                tqdm(total=self.total, initial=self.done, desc=self.desc, unit=self.unit, file=sys.stdout,
                     smoothing=SMOOTHING, dynamic_ncols=True, leave=True))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._bar = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else SMOOTHING * new + (1 - SMOOTHING) * old

    @property
    def tokens_per_s(self) -> float | None:
        """Recent tokens per second (None until :meth:`update` got ``tokens``). Tokens and seconds
        are averaged apart, as tqdm does: an average of per-step rates would let one fast step
        outweigh a slow one."""
        if self._tokens_per_unit is None or self.seconds_per_unit is None:
            return None
        return self._tokens_per_unit / self.seconds_per_unit

    @property
    def eta_s(self) -> float:
        """Seconds left at the recent pace (inf before the first update)."""
        if self.seconds_per_unit is None:
            return math.inf
        return (self.total - self.done) * self.seconds_per_unit

    def update(self, n: int = 1, tokens: int = 0, **values: Any) -> None:
        now = time.monotonic()
        interval, self._last = max(now - self._last, 1e-9), now
        self.done += n
        self.seconds_per_unit = self._smooth(self.seconds_per_unit, interval / n)
        if tokens:
            self._tokens_per_unit = self._smooth(self._tokens_per_unit, tokens / n)
        if not self.enabled:
            return
        shown = {k: _value(v) for k, v in values.items()}
        if self.tokens_per_s is not None:
            shown["tok/s"] = f"{self.tokens_per_s:.0f}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif self.done % self.every == 0 or self.done >= self.total:
            log.info("%s", self.line(shown))

    def line(self, shown: dict[str, str]) -> str:
        """The plain progress line: ``desc done/total units | k v ... | N tok/s | eta H:MM:SS``."""
        parts = [f"{self.desc} {self.done}/{self.total} {self.unit}s"]
        values = {k: v for k, v in shown.items() if k != "tok/s"}
        if values:
            parts.append(" ".join(f"{k} {v}" for k, v in values.items()))
        if "tok/s" in shown:
            parts.append(f"{shown['tok/s']} tok/s")
        parts.append(f"eta {_hms(self.eta_s)}")
        return " | ".join(parts)
