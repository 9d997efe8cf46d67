"""``train``: fine-tune (or pre-train) with the stage's RoPE; checkpoints in ``checkpoints/``.

``train.epochs`` > 0 derives the step count from the number of training samples. An interrupted
stage resumes from its latest checkpoint, data order included (bitwise on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megarope.data.sampler import DataIterator, micro_batches
from megarope.progress import Progress
from megarope.run import checkpoint
from megarope.run.config import ConfigError, StageConfig
from megarope.run.context import StageContext, StageKind, check_rope

log = logging.getLogger(__name__)


@dataclass
class TrainStage(StageConfig):
    """A training stage; its settings are the run's ``train``, ``data`` and ``checkpoint`` groups.

    ``init_optimizer``: start from the ``init`` stage's optimizer state (Adam's moments) as well as
    its weights, as Megatron does loading a checkpoint without ``--no-load-optim``; the lr schedule
    is this stage's own. For a stage that continues another's training with other data (a
    curriculum): a fresh Adam at such a boundary cut a scripted run's passkey retrieval from 1.0 to
    0.17 (megarope.data.retrieval).
    """

    init_optimizer: bool = False


def check(ctx: StageContext) -> None:
    if ctx.stage.init_optimizer and not ctx.stage.init:
        raise ConfigError(f"stages.{ctx.stage.name}.init_optimizer", "True needs `init`, the stage whose "
                          "optimizer state to start from")
    check_rope(ctx)
    ctx.train_samples()


def _steps(ctx: StageContext, num_samples: int) -> int:
    t = ctx.cfg.train
    if not t.epochs:
        return t.steps
    steps = t.epochs * (num_samples // t.global_batch_size)
    log.info("%s: %d epochs of %d samples at batch %d = %d steps", ctx.stage.name, t.epochs, num_samples,
             t.global_batch_size, steps)
    return steps


def run(ctx: StageContext) -> dict:
    samples = ctx.train_samples()
    steps = _steps(ctx, len(samples))
    engine = ctx.engine(train_steps=steps, init_optimizer=ctx.stage.init_optimizer)
    per_rank = ctx.cfg.train.global_batch_size // engine.dp_size
    batches = DataIterator(samples, per_rank, seed=ctx.cfg.train.seed, dp_rank=engine.dp_rank,
                           dp_size=engine.dp_size)
    step = 0
    resume = checkpoint.latest(ctx.dir / "checkpoints")
    if resume is not None:
        common = checkpoint.load(engine, resume)
        step = common["step"]
        batches.load_state_dict(common["data"])
        log.info("resumed %s from %s (step %d)", ctx.stage.name, resume, step)
    ctx.metrics.rewind(ctx.stage.name, step)  # steps after the checkpoint are redone: their rows go
    step, loss = _loop(ctx, engine, batches, step, steps)
    return {"kind": "train", "steps": step, "final_loss": loss, "rope": ctx.rope.to_dict()}


def _loop(ctx: StageContext, engine, batches: DataIterator, step: int, steps: int) -> tuple[int, float]:
    """Train from ``step`` to ``steps``, checkpointing every ``checkpoint.every`` steps, at the end
    and when a stop signal arrives (then :class:`checkpoint.Interrupted` is raised)."""
    cfg, name = ctx.cfg, ctx.stage.name
    mbs = cfg.parallel.micro_batch_size
    tokens_per_step = cfg.train.global_batch_size * ctx.seq_len
    loss = float("nan")
    with checkpoint.StopSignal() as stop, Progress(name, steps, initial=step, every=cfg.train.log_every) as bar:
        while step < steps:
            batch = next(batches)
            out = engine.train_step(micro_batches(batch, mbs))
            step, loss = step + 1, out["loss"]
            bar.update(tokens=tokens_per_step, loss=loss, lr=engine.lr)
            ctx.metrics.write({"stage": name, "step": step, "loss": loss, "lr": engine.lr,
                               "grad_norm": out["grad_norm"], "tokens_per_s": bar.tokens_per_s})
            final, stopping = step == steps, stop.requested()
            if final or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                checkpoint.save(engine, ctx.dir / "checkpoints", step, {"data": batches.state_dict()},
                                keep=cfg.checkpoint.keep)
            if stopping and not final:
                raise checkpoint.Interrupted(stop.received)
    return step, loss


KIND = StageKind(TrainStage, run, check)
