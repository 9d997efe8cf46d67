"""``export``: a Hugging Face folder (``model/``, with the tokenizer) whose config.json carries the
stage's RoPE keys; a later run loads it as ``model.path``."""

from __future__ import annotations

from dataclasses import dataclass

from megarope import dist
from megarope.hf.convert import read_hf_config, to_hf
from megarope.run.config import StageConfig
from megarope.run.context import StageContext, StageKind
from megarope.run.model import tiny_hf_config


@dataclass
class ExportStage(StageConfig):
    """An export stage: the weights of ``init`` with the stage's RoPE."""


def run(ctx: StageContext) -> dict:
    engine = ctx.engine()
    tok, folder = ctx.tokenizer, ctx.dir / "model"
    hf_config = read_hf_config(ctx.cfg.model.path) if ctx.cfg.model.path else \
        tiny_hf_config(ctx.cfg, tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    if dist.is_rank0():
        to_hf(engine.model, folder, hf_config, ctx.rope)
        tok.save_pretrained(folder)  # a complete folder: later runs load it as model.path
    dist.barrier()
    return {"kind": "export", "path": str(folder), "rope": ctx.rope.to_dict()}


KIND = StageKind(ExportStage, run)
