"""Training checkpoints with megatron-core ``dist_checkpointing`` and a clean stop on signals.

Layout of a stage's checkpoint folder::

    checkpoints/step_00000040/    model + optimizer (sharded), common state, rng_rank<r>.pt
    checkpoints/latest            "step_00000040", written only after every rank finished

A checkpoint is written under ``step_N.tmp`` and renamed by rank 0 after a barrier, so a kill at
any moment leaves either the previous complete checkpoint or the new one, never half of one.
The model's RoPE configuration (searched LongRoPE factors included) is part of the model state
(megarope modules keep it as ``_extra_state``).

Resuming under another TP/PP/CP/DP layout is megatron's resharding: model and optimizer state
are saved as global tensors and each rank loads its own slices. What cannot be resharded is a
different model: the architecture (padded vocabulary included) is saved in the common state and
compared first, so a mismatch names the config field instead of a tensor shape. The per-rank RNG
states are restored only under the layout that saved them (another layout has other ranks).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException

from megarope import dist as ranks
from megarope.atomic import atomic_write_text
from megarope.run.config import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if path.is_dir() else None


# architecture keys of the common state -> the config field that sets them
_ARCHITECTURE = {"num_layers": "model.num_layers", "hidden_size": "model.hidden_size",
                 "num_attention_heads": "model.num_attention_heads", "num_query_groups": "model.num_query_groups",
                 "kv_channels": "model.hidden_size", "ffn_hidden_size": "model.ffn_hidden_size",
                 "vocab_size": "data.tokenizer"}


def _architecture(engine) -> dict:
    c = engine.model.config
    values = {k: getattr(c, k) for k in _ARCHITECTURE if k != "vocab_size"}
    return {**values, "vocab_size": engine.model.vocab_size}


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _check_architecture(engine, path: Path, saved: dict | None) -> None:
    """The checkpoint holds this model (any layout), or an error naming the field that differs."""
    if saved is None:  # written before megarope recorded it: megatron's own shape checks remain
        return
    mine = _architecture(engine)
    for key, field in _ARCHITECTURE.items():
        if key in saved and saved[key] != mine[key]:
            raise ConfigError(field, f"checkpoint {path} has {key}={saved[key]}, this run's model {mine[key]}: "
                              "a checkpoint resumes under any parallel layout, but only for the same model")


def _sharded(engine, loading: bool, model_only: bool = False) -> dict:
    model_sd = engine.model.sharded_state_dict()
    state = {"model": model_sd}
    # building the optimizer's template for loading creates optimizer state: not for a model-only load
    if engine.optimizer is not None and not model_only:
        state["optimizer"] = engine.optimizer.sharded_state_dict(model_sd, is_loading=loading)
    return state


def save(engine, root: Path, step: int, common: dict, keep: int = 1) -> Path:
    """Write a checkpoint of ``engine`` at ``step`` with ``common`` (JSON-able run state)."""
    root = Path(root)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if ranks.is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        # a kill between writing the marker's temporary file and its rename leaves that file
        for stale in root.glob(f".{LATEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        tmp.mkdir()
    ranks.barrier()
    state = _sharded(engine, loading=False)
    state["common"] = {**common, "step": step, "scheduler": engine.scheduler.state_dict() if engine.scheduler else None,
                       "architecture": _architecture(engine), "layout": _layout()}
    dist_checkpointing.save(state, str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{ranks.rank()}.pt")
    ranks.barrier()
    if ranks.is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name)
        finished = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s written", final)
    ranks.barrier()
    return final


def load(engine, path: Path, model_only: bool = False, schedule: bool = True) -> dict:
    """Restore ``engine`` from checkpoint folder ``path``; returns its common state. ``model_only``:
    the weights alone; ``schedule=False``: weights and optimizer state (Adam's moments), while the
    engine keeps its own lr schedule and RNG (a stage that continues another stage's training)."""
    saved = dist_checkpointing.load_common_state_dict(str(path)).get("common", {})
    _check_architecture(engine, path, saved.get("architecture"))
    template = _sharded(engine, loading=True, model_only=model_only)
    try:
        state = dist_checkpointing.load(template, str(path))
    except CheckpointingException as err:
        raise ConfigError("parallel", f"megatron cannot reshard checkpoint {path} (saved under "
                          f"{saved.get('layout', 'an unrecorded layout')}) to {_layout()}: {err}") from err
    engine.model.load_state_dict(state["model"])
    if model_only:
        engine.rope = _rope_of(engine)
        return {}
    if not schedule:
        _adopt_group_settings(state["optimizer"], engine.optimizer.param_groups)
    engine.optimizer.load_state_dict(state["optimizer"])
    common = state["common"]
    if schedule:
        if common.get("scheduler") and engine.scheduler is not None:
            engine.scheduler.load_state_dict(common["scheduler"])
        rng = Path(path) / f"rng_rank{ranks.rank()}.pt"
        if rng.is_file() and saved.get("layout", _layout()) == _layout():
            _set_rng_state(torch.load(rng, weights_only=False))
    engine.rope = _rope_of(engine)
    return common


# what makes a param group (megatron's param_group_identifier_keys less the settings a stage sets)
_GROUP_KIND = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _adopt_group_settings(saved, groups: list[dict]) -> None:
    """Give the saved optimizer state's param groups the settings (lr, max_lr, min_lr, weight decay)
    of ``groups``, the engine's own, matched by kind: a stage continuing another's optimizer runs its
    own schedule, and megatron >= 0.19 finds saved groups by those settings, refusing other ones."""
    if isinstance(saved, dict):
        if isinstance(saved.get("param_groups"), list):
            for group in saved["param_groups"]:
                kind = tuple(group.get(k) for k in _GROUP_KIND)
                own = next((g for g in groups if tuple(g.get(k) for k in _GROUP_KIND) == kind), None)
                if own is not None:  # no such group here: megatron's load names the mismatch
                    group.update({k: v for k, v in own.items() if k != "params"})
        for value in saved.values():
            _adopt_group_settings(value, groups)
    elif isinstance(saved, list):
        for value in saved:
            _adopt_group_settings(value, groups)


def _rope_of(engine):
    from megarope.mcore.spec import rope_of

    return rope_of(engine.model)


class StopSignal:
    """SIGTERM / SIGUSR1 ask for a stop; ``requested()`` agrees across ranks so every rank stops
    after the same step (the handler may fire on some ranks first, or twice via torchrun)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            # restart system calls the signal interrupts: a collective in flight (gloo's socket
            # reads) must finish as on the other ranks, not fail or return early with EINTR
            signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.received = signum

    def requested(self) -> bool:
        from megarope.mcore.compat import compute_device

        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(compute_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint (or search state); the job should be
    requeued."""

    def __init__(self, signum: int):
        super().__init__(f"stopped on signal {signum}, checkpoint written")
        self.exit_code = 128 + signum
