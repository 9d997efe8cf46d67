"""``eval``: perplexity at ``eval.lengths`` and passkey retrieval at ``eval.passkey_lengths``."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

import torch

from megarope.data.config import DataError
from megarope.data.samples import eval_documents, lm_sample
from megarope.data.sources import load_documents
from megarope.eval.passkey import accuracy_by_depth, passkey_lm_sample, passkey_samples
from megarope.run.config import ConfigError, StageConfig
from megarope.run.context import StageContext, StageKind, check_rope

log = logging.getLogger(__name__)


@dataclass
class EvalStage(StageConfig):
    """An evaluation stage; its settings are the run's ``eval`` and ``data`` groups."""


def check(ctx: StageContext) -> None:
    """The RoPE, enough held-out documents for every length and passkey prompts that fit every
    passkey length (checked once for the settings all eval stages share)."""
    check_rope(ctx)
    cfg = ctx.cfg
    key = json.dumps([asdict(cfg.data), asdict(cfg.eval)], sort_keys=True, default=str)
    if key in ctx.run.checked:
        return
    docs = load_documents(cfg.data, "eval")
    for i, length in enumerate(cfg.eval.lengths):
        try:
            eval_documents(docs, ctx.tokenizer, length + 1, cfg.eval.num_docs, cfg.data.text_key)
        except DataError as err:
            raise ConfigError(f"eval.lengths[{i}]", err.message) from err
    for length in cfg.eval.passkey_lengths:
        passkey_samples(ctx.tokenizer, length + 1, cfg.eval.passkey_depths, cfg.eval.passkey_per_depth, cfg.eval.seed)
    ctx.run.checked.add(key)


def _ppl(nll: torch.Tensor, count: torch.Tensor) -> float:
    return math.exp(nll.sum().item() / max(count.sum().item(), 1.0))


def _perplexity(ctx: StageContext, engine) -> dict:
    """Perplexity per length; past the model's window also split, from the same forward, into the
    tokens inside the window (``ppl_window``: token index < window) and beyond it (``ppl_beyond``),
    the papers' beyond-window perplexity, which the whole-sequence mean dilutes."""
    cfg, name, window = ctx.cfg, ctx.stage.name, ctx.run.window
    docs = load_documents(cfg.data, "eval")
    table = {}
    for length in cfg.eval.lengths:
        used: list = []
        rows = eval_documents(docs, ctx.tokenizer, length + 1, cfg.eval.num_docs, cfg.data.text_key, used)
        samples = [lm_sample(row) for row in rows]
        for sample in samples:
            # label j is token j + 1 of the document
            sample["part_mask"] = (sample["position_ids"] + 1 >= window).float()
        scores = engine.score(samples)
        table[length] = _ppl(scores[:, 0], scores[:, 1])
        row = {"stage": "eval", "run_stage": name, "method": name, "length": length, "ppl": table[length],
               "num_docs": len(rows), "split": "eval", "docs": used}
        if length > window:
            row.update(window=window, ppl_window=_ppl(scores[:, 0] - scores[:, 3], scores[:, 1] - scores[:, 4]),
                       ppl_beyond=_ppl(scores[:, 3], scores[:, 4]))
        ctx.metrics.write(row)
        log.info("%s length %d ppl %.3f%s", name, length, table[length],
                 f" (window {row['ppl_window']:.3f}, beyond {row['ppl_beyond']:.3f})" if "ppl_beyond" in row else "")
    return table


def _passkey(ctx: StageContext, engine) -> dict:
    e, name = ctx.cfg.eval, ctx.stage.name
    out = {}
    for length in e.passkey_lengths:
        samples = passkey_samples(ctx.tokenizer, length + 1, e.passkey_depths, e.passkey_per_depth, e.seed)
        wrong = engine.score([passkey_lm_sample(s) for s in samples])[:, 2]
        counts = {d: sum(s["depth"] == d for s in samples) for d in e.passkey_depths}
        for depth, accuracy in accuracy_by_depth(samples, wrong.tolist()).items():
            out[f"{length}@{depth}"] = accuracy
            ctx.metrics.write({"stage": "passkey", "run_stage": name, "method": name, "length": length,
                               "depth": depth, "accuracy": accuracy, "num_samples": counts[depth]})
        log.info("%s passkey length %d: %d/%d retrieved", name, length, len(samples) - int(wrong.gt(0).sum()),
                 len(samples))
    return out


def summary_line(name: str, ppl: dict, passkey: dict) -> str:
    """One console line per evaluated method: perplexity by length, passkey accuracy by length@depth."""
    line = f"{name}: ppl " + " ".join(f"{length}:{value:.3f}" for length, value in ppl.items())
    if passkey:
        line += " | passkey " + " ".join(f"{cell}:{value:.2f}" for cell, value in passkey.items())
    return line


def run(ctx: StageContext) -> dict:
    engine = ctx.engine()
    ctx.metrics.rewind(ctx.stage.name)  # a requeued eval starts over: rows of its first try go
    ppl, passkey = _perplexity(ctx, engine), _passkey(ctx, engine)
    log.info("%s", summary_line(ctx.stage.name, ppl, passkey))
    return {"kind": "eval", "ppl": ppl, "passkey": passkey, "rope": ctx.rope.to_dict()}


KIND = StageKind(EvalStage, run, check)
