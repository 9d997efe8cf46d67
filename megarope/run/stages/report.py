"""``report``: ``report.md`` and plots in ``run.dir`` from ``metrics.jsonl`` and the finished
evaluation stages' RoPE configs."""

from __future__ import annotations

from dataclasses import dataclass

from megarope import dist
from megarope.eval.report import write_report
from megarope.run.config import StageConfig
from megarope.run.context import StageContext, StageKind


@dataclass
class ReportStage(StageConfig):
    """A report stage: no model, no RoPE of its own."""


def check(ctx: StageContext) -> None:
    """Nothing a report reads exists before the run."""


def run(ctx: StageContext) -> dict:
    run_ctx = ctx.run
    if dist.is_rank0():
        ropes = {}
        for other in run_ctx.cfg.stages:
            info = run_ctx.done_info(other.name)
            if other.kind == "eval" and info is not None:
                ropes[other.name] = info["rope"]
        # the model's own base: ABF's new base is then drawn as the per-dimension rescale it is
        write_report(run_ctx.dir, title=f"megarope {run_ctx.cfg.recipe}", rope_configs=ropes,
                     original_window=run_ctx.window, original_theta=run_ctx.base_rope.rope_theta)
    dist.barrier()
    return {"kind": "report", "path": str(run_ctx.dir / "report.md")}


KIND = StageKind(ReportStage, run, check)
