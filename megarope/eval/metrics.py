"""``<run.dir>/metrics.jsonl``: one JSON object per line, appended as a run goes.

Row kinds, told apart by ``stage`` (required keys; code outside this repository reads them):

* training: ``stage`` (the pipeline stage's name, anything but the three below), ``step``,
  ``loss``, ``lr``, ``tokens_per_s``;
* ``"eval"``: ``method``, ``length``, ``ppl``, ``run_stage`` (the pipeline stage that evaluated);
  optional ``num_docs`` (documents per length), ``tokens`` (scored tokens), ``dataset``, ``step``;
* ``"passkey"``: ``method``, ``length``, ``depth``, ``accuracy`` (share in [0, 1]), ``run_stage``;
  optional ``num_samples`` (samples at this length and depth);
* ``"search"``: ``generation``, ``best_ppl``, ``mean_ppl``; optional ``run_stage``, ``method``,
  ``length`` (the length the fitness was measured at).

Every row also gets ``time`` (Unix seconds) unless given. Non-finite floats are written as
Python's ``json`` writes them (``Infinity``, ``NaN``): a diverged method's perplexity stays a number.

Each line is flushed and fsynced when written, so a killed job loses at most the line in flight;
a requeued job re-appends rows for the steps it repeats, and ``read_metrics(dedupe=True)`` keeps
the last row per key (see :func:`row_key`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
KEY_FIELDS = ("stage", "run_stage", "method", "step", "length", "depth", "generation")
REQUIRED = {
    "eval": ("method", "length", "ppl", "run_stage"),
    "passkey": ("method", "length", "depth", "accuracy", "run_stage"),
    "search": ("generation", "best_ppl", "mean_ppl"),
}
TRAIN_REQUIRED = ("step", "loss", "lr", "tokens_per_s")


def row_kind(row: Mapping[str, Any]) -> str:
    """``"eval"``, ``"passkey"``, ``"search"`` or ``"train"``."""
    return row["stage"] if row["stage"] in REQUIRED else "train"


def row_key(row: Mapping[str, Any]) -> tuple:
    """Identity of a row: the same key means the same measurement repeated (by a resumed job)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def _plain(value: Any) -> Any:
    # tensors and numpy scalars as the training loop holds them
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics: {type(value).__name__} is not JSON serializable")


class MetricsWriter:
    """Appends rows to ``path``; with ``enabled=False`` (ranks other than 0) it writes nothing.
    The file is opened at the first row, so a run that fails before doing anything leaves none."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = os.fspath(path)
        self.enabled = enabled
        self._file = None

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        _drop_partial_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        """Validate and append one row (see the module docstring for the kinds and their keys)."""
        if "stage" not in row:
            raise ValueError(f"metrics row {dict(row)!r}: missing 'stage'")
        required = REQUIRED.get(row["stage"], TRAIN_REQUIRED)
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"metrics {row_kind(row)} row {dict(row)!r}: missing {missing}")
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        line = json.dumps({**row, "time": row.get("time", round(time.time(), 3))}, default=_plain)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_line(path: str) -> None:
    """Cut a last line without its newline (a job killed mid-write) so the next row starts clean."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # files stay small (one line per logged step), reading them whole is fine
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def read_metrics(path: str | os.PathLike, dedupe: bool = False) -> list[dict]:
    """Rows of ``path`` in file order ([] if it does not exist). A last line without newline is
    being written (or was cut by a kill) and is left out. ``dedupe``: one row per :func:`row_key`,
    the last written, at the place of its last occurrence."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}:{number}: not a JSON row ({e})") from e
    if not dedupe:
        return rows
    last: dict[tuple, dict] = {}
    for row in rows:
        key = row_key(row)
        last.pop(key, None)
        last[key] = row
    return list(last.values())
