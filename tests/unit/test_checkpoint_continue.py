"""A stage that starts from another's optimizer state (``init_optimizer``) continues its training:
its steps equal the uninterrupted run's, where a fresh Adam's do not."""

import torch

from megarope import RopeConfig
from megarope.data.samples import lm_sample
from megarope.run import checkpoint
from megarope.run.config import Config, TrainConfig
from megarope.run.engine import Engine

VOCAB, SEQ = 96, 32


def _batches(n: int) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        rows = [lm_sample(torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)) for _ in range(2)]
        batches.append([{k: torch.cat([r[k] for r in rows]) for k in rows[0]}])
    return batches


def _engine(steps: int, lr: float = 3e-3) -> Engine:
    cfg = Config(train=TrainConfig(lr=lr, warmup_steps=0, schedule="constant", seed=5))
    return Engine(cfg, RopeConfig(head_dim=32), vocab_size=VOCAB, train_steps=steps)


def _losses(engine: Engine, batches: list[list[dict]]) -> list[float]:
    return [engine.train_step(batch)["loss"] for batch in batches]


def test_optimizer_state_from_another_stage_continues_its_training(tmp_path):
    batches = _batches(6)
    first = _engine(6)
    _losses(first, batches[:3])
    path = checkpoint.save(first, tmp_path / "first", 3, {})
    uninterrupted = _losses(first, batches[3:])

    continued = _engine(3)  # a new stage: its own schedule (the same constant lr), 3 steps
    checkpoint.load(continued, path, schedule=False)
    assert continued.scheduler.num_steps == 0 and continued.lr == 3e-3
    assert _losses(continued, batches[3:]) == uninterrupted

    fresh = _engine(3)  # weights only: Adam's moments start from zero
    checkpoint.load(fresh, path, model_only=True, schedule=False)
    fresh_losses = _losses(fresh, batches[3:])
    assert fresh_losses[0] == uninterrupted[0] and fresh_losses[1:] != uninterrupted[1:]

    slower = _engine(3, lr=1e-3)  # the saved param groups carry lr 3e-3: this stage's schedule wins
    checkpoint.load(slower, path, schedule=False)
    assert slower.lr == 1e-3
