"""The pipeline: a recipe's stages run in order, each writing its outputs under ``<run.dir>/stages/<name>``.

A stage that finished has ``done.json``; a requeued or restarted job skips it and resumes the
first unfinished stage (training from its latest checkpoint, a search from its state file). What a
stage does is its kind's module in ``megarope.run.stages``; this module only types the stage
entries, checks their ``init``/``factors`` links, skips finished stages and writes the run files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from omegaconf import OmegaConf

from megarope import dist, fields
from megarope.atomic import atomic_write_text
from megarope.errors import MegaropeError, raise_all
from megarope.run.config import Config, ConfigError, StageConfig
from megarope.run.context import RunContext
from megarope.run.stages import STAGES

log = logging.getLogger(__name__)


def default_stages() -> list[StageConfig]:
    """Without ``stages``: one training stage and one evaluation of its result."""
    return [_typed(0, {"name": "train", "kind": "train"}), _typed(1, {"name": "eval", "kind": "eval", "init": "train"})]


def _typed(i: int, entry: Any) -> StageConfig:
    """Stage entry ``i`` (a mapping, or a StageConfig) as its kind's config."""
    values = dataclasses.asdict(entry) if dataclasses.is_dataclass(entry) else dict(entry)
    kind = values.get("kind", "train")
    if kind not in STAGES:
        raise ConfigError(f"stages[{i}].kind", f"one of {sorted(STAGES)}, got {kind!r}")
    return fields.from_dict(STAGES[kind].config, values, ConfigError, prefix=f"stages[{i}].")


def resolve_stages(entries: list[Any]) -> list[StageConfig]:
    """The stages typed by kind (the default pair when empty), names unique, ``init`` and ``factors``
    naming earlier stages (or, for ``factors``, an existing ``.json`` file)."""
    stages = [_typed(i, entry) for i, entry in enumerate(entries)] or default_stages()
    names: list[str] = []
    for i, stage in enumerate(stages):
        if stage.name in names:
            raise ConfigError(f"stages[{i}].name", f"duplicate stage name {stage.name!r}")
        if stage.init is not None and stage.init not in names:
            raise ConfigError(f"stages[{i}].init", f"{stage.init!r} is not an earlier stage (earlier: {names})")
        if stage.factors is not None and stage.factors.endswith(".json"):
            if not os.path.isfile(stage.factors):
                raise ConfigError(f"stages[{i}].factors", f"no such factor file: {stage.factors}")
        elif stage.factors is not None and stage.factors not in names:
            raise ConfigError(f"stages[{i}].factors", f"{stage.factors!r} is neither an earlier stage (earlier: "
                              f"{names}) nor a .json factor file")
        names.append(stage.name)
    return stages


class Pipeline:
    def __init__(self, cfg: Config):
        cfg.stages = resolve_stages(cfg.stages)
        self.cfg = cfg
        self.run_ctx = RunContext(cfg)
        self._contexts = {stage.name: self.run_ctx.stage(stage) for stage in cfg.stages}

    def _todo(self) -> list[StageConfig]:
        return [stage for stage in self.cfg.stages if self.run_ctx.done_info(stage.name) is None]

    def preflight(self) -> None:
        """Everything that can fail on bad input, before any stage writes anything; the failures
        of all stages are reported together."""
        errors = []
        for stage in self._todo():
            try:
                STAGES[stage.kind].check(self._contexts[stage.name])
            except MegaropeError as err:
                errors.append(err)
        raise_all(errors)

    def run(self) -> dict:
        start = time.monotonic()
        self.preflight()
        run_dir = self.run_ctx.dir
        if dist.is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        log.info("run.dir = %s", run_dir)
        results, count = {}, len(self.cfg.stages)
        for i, stage in enumerate(self.cfg.stages, start=1):
            info = self.run_ctx.done_info(stage.name)
            if info is not None:
                log.info("stage %d/%d %s: already done, skipped", i, count, stage.name)
            else:
                log.info("stage %d/%d %s (%s)", i, count, stage.name, stage.kind)
                info = self._run_stage(stage)
            results[stage.name] = info
        summary = {"recipe": self.cfg.recipe, "run_dir": str(run_dir), "stages": results,
                   "elapsed_s": round(time.monotonic() - start, 2)}
        if dist.is_rank0():
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _run_stage(self, stage: StageConfig) -> dict:
        ctx = self._contexts[stage.name]
        if dist.is_rank0():
            ctx.dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        info = STAGES[stage.kind].run(ctx)
        if dist.is_rank0():
            atomic_write_text(ctx.dir / "done.json", json.dumps(info, indent=2) + "\n")
        dist.barrier()
        return info
