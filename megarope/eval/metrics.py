"""``<run.dir>/metrics.jsonl``: one JSON object per line, appended as a run goes.

Row kinds, told apart by ``stage`` (required keys; code outside this repository reads them):

* training: ``stage`` (the pipeline stage's name, anything but the three below), ``step``,
  ``loss``, ``lr``, ``tokens_per_s``;
* ``"eval"``: ``method``, ``length``, ``ppl``, ``run_stage`` (the pipeline stage that evaluated);
  optional ``num_docs`` (documents per length), ``tokens`` (scored tokens), ``dataset``, ``step``;
  past the model's window also ``window``, ``ppl_window`` (tokens with index < window) and
  ``ppl_beyond`` (the rest: the beyond-window perplexity), from the same forward;
* ``"passkey"``: ``method``, ``length``, ``depth``, ``accuracy`` (share in [0, 1]), ``run_stage``;
  optional ``num_samples`` (samples at this length and depth);
* ``"search"``: ``generation``, ``best_ppl``, ``mean_ppl``; optional ``run_stage``, ``method``,
  ``length`` (the length the fitness was measured at).

Every row also gets ``time`` (Unix seconds) unless given. Non-finite floats are written as
Python's ``json`` writes them (``Infinity``, ``NaN``): a diverged method's perplexity stays a number.

Each line is flushed and fsynced when written, so a killed job loses at most the line in flight.
One process writes (global rank 0, see ``megarope.dist.is_rank0``) and every measurement is in
the file once: a requeued stage first drops the rows it is about to repeat (:meth:`MetricsWriter.rewind`),
so readers take the rows as they are.

Optional sinks get every row too (:class:`TensorBoardSink`, :class:`WandbSink`), for the
dashboards Megatron/NeMo users watch; ``metrics.jsonl`` stays the record the report is built from.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from megarope.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
REQUIRED = {
    "eval": ("method", "length", "ppl", "run_stage"),
    "passkey": ("method", "length", "depth", "accuracy", "run_stage"),
    "search": ("generation", "best_ppl", "mean_ppl"),
}
TRAIN_REQUIRED = ("step", "loss", "lr", "tokens_per_s")


def row_kind(row: Mapping[str, Any]) -> str:
    """``"eval"``, ``"passkey"``, ``"search"`` or ``"train"``."""
    return row["stage"] if row["stage"] in REQUIRED else "train"


def row_stage(row: Mapping[str, Any]) -> str | None:
    """The pipeline stage that wrote ``row``: a training row's ``stage``, else its ``run_stage``."""
    return row["stage"] if row_kind(row) == "train" else row.get("run_stage")


def _progress(row: Mapping[str, Any]) -> int | None:
    """How far into its stage a row was written: a training step, a search generation (eval and
    passkey rows have none: an eval stage starts over)."""
    kind = row_kind(row)
    return row["step"] if kind == "train" else row["generation"] if kind == "search" else None


def _plain(value: Any) -> Any:
    # tensors and numpy scalars as the training loop holds them
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics: {type(value).__name__} is not JSON serializable")


class MetricsWriter:
    """Appends rows to ``path`` and hands them to the sinks that ``sinks`` (zero-argument callables)
    create; with ``enabled=False`` (ranks other than 0) it validates and writes nothing. File and
    sinks are opened at the first row, so a run that fails before doing anything leaves none."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, sinks: list | None = None):
        self.path = os.fspath(path)
        self.enabled = enabled
        self._sink_factories = list(sinks or [])
        self.sinks: list = []
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
        if len(self.sinks) < len(self._sink_factories):
            self.sinks = [make() for make in self._sink_factories]
        line = json.dumps({**row, "time": row.get("time", round(time.time(), 3))}, default=_plain)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        for sink in self.sinks:
            sink.write(row)

    def rewind(self, stage: str, done: int = 0) -> None:
        """Drop the rows of pipeline stage ``stage`` past ``done`` (its resumed step or generation;
        all its eval and passkey rows): the stage is about to redo that work and write them again."""
        if not self.enabled or not os.path.exists(self.path):
            return
        self.close()  # the file is replaced below: later rows go to the new one
        rows = read_metrics(self.path)
        kept = [r for r in rows if row_stage(r) != stage or (_progress(r) is not None and _progress(r) <= done)]
        if len(kept) < len(rows):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self.sinks:
            sink.flush()

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


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of ``path`` in file order ([] if it does not exist). A last line without newline is
    being written (or was cut by a kill) and is left out."""
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
    return rows


def _scalars(row: Mapping[str, Any]) -> tuple[str, int, dict[str, float]]:
    """A row as dashboard scalars: (tag prefix, x value, {name: value}). Training rows go by step,
    search rows by generation, eval rows by length and passkey rows by depth in percent, under
    prefixes that keep methods and lengths apart."""
    kind = row_kind(row)
    if kind == "train":
        prefix, x = f"train/{row['stage']}", row["step"]
    elif kind == "search":
        prefix, x = f"search/{row.get('run_stage', 'search')}", row["generation"]
    elif kind == "eval":
        prefix, x = f"eval/{row['method']}", row["length"]
    else:
        prefix, x = f"passkey/{row['method']}/{row['length']}", round(100 * row["depth"])
    skip = {"time", "step", "generation", "length", "depth"}
    values = {}
    for key, value in row.items():
        value = value.item() if hasattr(value, "item") else value
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return prefix, int(x), values


class TensorBoardSink:
    """Rows as TensorBoard scalars under ``log_dir`` (``torch.utils.tensorboard``, which needs the
    ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=os.fspath(log_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        prefix, x, values = _scalars(row)
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, global_step=x)

    def flush(self) -> None:
        self._writer.flush()


class WandbSink:
    """Rows logged to Weights & Biases (``wandb``, optional); ``mode="offline"`` writes the run
    under ``dir`` without network, for ``wandb sync`` later."""

    def __init__(self, dir: str | os.PathLike, project: str, name: str, mode: str = "offline"):
        import wandb

        os.makedirs(dir, exist_ok=True)
        self._run = wandb.init(project=project, name=name, dir=os.fspath(dir), mode=mode)

    def write(self, row: Mapping[str, Any]) -> None:
        # W&B wants one increasing step per run; the row's own x axis goes in as a value
        prefix, x, values = _scalars(row)
        self._run.log({f"{prefix}/{name}": value for name, value in {**values, "x": x}.items()})

    def flush(self) -> None:
        """Nothing to do: offline wandb writes each ``log`` as it comes and finishes at exit."""
