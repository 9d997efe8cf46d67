"""TP/PP/CP/SP with megarope layers give the single-process loss and gradients (fp32, gloo, CPU).

Every run goes through the product path, ``megarope.run.engine.Engine`` (megatron's DDP,
optimizer, scheduler and forward/backward schedules; megarope's rotary, core attention and CPU
context-parallel attention). All layouts start from one ``dist_checkpointing`` checkpoint
written by the single-process run, per RoPE method:

- ``longrope`` with n-hat > 0 on 64-token sequences and an original window of 16, so the long
  factors, the n-hat switch and the attention factor are all in play;
- ``eabf`` on 4 layers with ``unscaled_layers=2``: layers 3 and 4 scale queries by position
  (under PP=2 they live on the second stage, which must use global layer numbers; under CP the
  scale must follow the permuted global positions).

Compared with the single-process run: the loss and grad norm of each of STEPS Adam steps, and
the full gradient of the first step. Gradients leave each layout as a dist checkpoint of
``main_grad`` (copied into the weights for the save), which dist_checkpointing reassembles
whatever the shard layout (GLU fc1, grouped QKV, vocab-parallel embedding, pipeline stages);
each launch then reloads them into an unsharded model. Inside each layout, every replica of a
parameter (over CP, and over TP for unsharded ones) must hold the same gradient, which the
checkpoint alone (it keeps one replica) would not show.

Launches (each process start costs seconds of imports): 1 process for the reference,
2 for TP=2 / PP=2 / CP=2 / TP=2+SP, 4 for CP=4 / TP=2 x CP=2. Plus the early errors of a bad
layout: ``megarope.run.config.validate`` here, the Engine's CP sequence-length check in every CP
layout; ``megarope.mcore.parallel.initialize``'s world-size check is tested in test_mcore_cpu.py.
"""

import importlib.util
import math
import os
from typing import NamedTuple

import re

import pytest
import torch
from _launch import run_distributed

from megarope.rope.config import RopeConfig

VOCAB = 128  # a multiple of 128: no padding ids (the tiny model pads to 128 whatever the layout)
SEQ = 64
WINDOW = 16
STEPS = 3
MICRO_BATCHES = 2
MICRO_BATCH_SIZE = 2

HEAD_DIM = 16
METHODS = {
    "longrope": RopeConfig(
        rope_type="longrope", head_dim=HEAD_DIM, original_max_position_embeddings=WINDOW,
        max_position_embeddings=SEQ, n_hat=4,
        long_factor=(1.0, 1.2, 1.6, 2.2, 2.9, 3.5, 4.0, 4.4),
        short_factor=(1.0,) * (HEAD_DIM // 2),
    ),
    "eabf": RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0,
                       original_max_position_embeddings=WINDOW, unscaled_layers=2),
}

# fp32. Layouts change only summation order (TP's split matmuls, CP's chunked attention, SP's
# scattered norms). Measured (megatron-core 0.16.1, torch 2.13 CPU): losses <= 4e-7 relative;
# first-step gradients <= 6e-7 of the tensor's largest entry; grad norms <= 7e-6 relative on the
# first step and <= 2.1e-5 after two Adam steps (Adam's m/sqrt(v) magnifies rounding in
# near-zero gradients). The tolerances leave >= 10x headroom.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 2e-4
GRAD_RTOL = 1e-4
GRAD_ATOL_OF_MAX = 1e-5


class Layout(NamedTuple):
    name: str
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False


SINGLE = Layout("single")
TWO_RANKS = [Layout("tp2", tp=2), Layout("pp2", pp=2), Layout("cp2", cp=2), Layout("tp2_sp", tp=2, sp=True)]
FOUR_RANKS = [Layout("cp4", cp=4), Layout("tp2_cp2", tp=2, cp=2)]


def _config(layout: Layout):
    from megarope.run.config import Config, ModelConfig, ParallelConfig, TrainConfig

    return Config(
        model=ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, window=WINDOW),
        parallel=ParallelConfig(tp=layout.tp, pp=layout.pp, cp=layout.cp, sp=layout.sp,
                                micro_batch_size=MICRO_BATCH_SIZE),
        # clip_grad on so that megatron computes the grad norm (compared too); high enough that
        # it never rescales the gradients compared.
        train=TrainConfig(steps=STEPS, global_batch_size=MICRO_BATCHES * MICRO_BATCH_SIZE, lr=1e-2,
                          schedule="constant", clip_grad=1e3, seed=11),
    )


def _micro_batches(step: int, seq: int = SEQ) -> list[dict]:
    """Step ``step``'s micro-batches: each row counts up by a random stride from a random start
    (mod VOCAB), learnable within a few steps; identical on every rank."""
    from megarope.data.samples import lm_sample

    g = torch.Generator().manual_seed(100 + step)
    rows = []
    for _ in range(MICRO_BATCHES * MICRO_BATCH_SIZE):
        start, stride = torch.randint(0, VOCAB, (1,), generator=g), torch.randint(1, 5, (1,), generator=g)
        rows.append(lm_sample((start + stride * torch.arange(seq + 1)) % VOCAB))
    return [
        {key: torch.cat([row[key] for row in rows[i : i + MICRO_BATCH_SIZE]]) for key in rows[0]}
        for i in range(0, len(rows), MICRO_BATCH_SIZE)
    ]


def _save(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()  # every rank sees the folder before rank 0 checks it is empty
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def _save_grads(model, path: str) -> None:
    """Save every parameter's ``main_grad`` (megatron's DDP gradient) in place of its weight."""
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(p.main_grad)
        _save(model, path)
        for p, w in zip(params, weights):
            p.copy_(w)


def _replica_spread(model) -> float:
    """Largest difference between the gradients that CP ranks (and TP ranks, for parameters TP
    does not shard) hold for the same parameter."""
    from megatron.core import parallel_state

    dist = torch.distributed
    cp = parallel_state.get_context_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_group()
    worst = 0.0
    for p in model.parameters():
        groups = [cp] if getattr(p, "tensor_model_parallel", False) else [cp, tp]
        for group in groups:
            if dist.get_world_size(group) == 1:
                continue
            copies = [torch.empty_like(p.main_grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, p.main_grad.contiguous(), group=group)
            worst = max(worst, max((c - copies[0]).abs().max().item() for c in copies))
    return worst


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _train(layout: Layout, method: str, root: str) -> dict:
    """STEPS steps of ``method`` in ``layout`` from the reference's initial checkpoint (written
    first by the single-process run); the first step's gradients go to a dist checkpoint.
    CP layouts then get a sequence that 2*cp does not divide."""
    from megarope.mcore import parallel
    from megarope.run.engine import Engine

    engine = Engine(_config(layout), METHODS[method], VOCAB, train_steps=STEPS)
    try:
        init = os.path.join(root, f"init-{method}")
        if layout == SINGLE:
            _save(engine.model, init)
        _load(engine.model, init)
        steps = []
        for step in range(STEPS):
            out = engine.train_step(_micro_batches(step))
            steps.append((out["loss"], out["grad_norm"]))
            if step == 0:
                _save_grads(engine.model, os.path.join(root, f"grads-{layout.name}-{method}"))
                spread = _replica_spread(engine.model)
        # evaluation after training: chunked vocab-parallel NLL and argmax (megarope.mcore.output)
        # through the same schedules, on samples whose loss mask covers the second half only
        samples = _micro_batches(STEPS)
        for sample in samples:
            sample["loss_mask"][:, : SEQ // 2] = 0
        result = {"steps": steps, "replica_spread": spread, "scores": engine.score(samples)}
        if layout.cp > 1:
            result["bad_length_error"] = _error(lambda: engine.score(_micro_batches(0, seq=SEQ - 2)))
        return result
    finally:
        parallel.destroy()


def _gather_grads(layouts: list[Layout], root: str) -> dict:
    """Each layout's saved gradients, reloaded into an unsharded model: {(layout, method): {name: grad}}."""
    from megarope.mcore import parallel
    from megarope.run.model import build_model

    parallel.initialize()  # tp = pp = cp = 1: every rank is a data-parallel replica
    try:
        grads = {}
        for method, rope in METHODS.items():
            model = build_model(_config(SINGLE), rope, VOCAB)
            for layout in layouts:
                _load(model, os.path.join(root, f"grads-{layout.name}-{method}"))
                grads[layout.name, method] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return grads
    finally:
        parallel.destroy()


def _run_layouts(layouts: list[Layout], root: str):
    """All ``layouts`` x METHODS in one launch (the process group outlives megatron's state)."""
    torch.distributed.init_process_group("gloo")
    try:
        results = {(layout.name, method): _train(layout, method, root)
                   for layout in layouts for method in METHODS}
        grads = _gather_grads(layouts, root)
        for key, grad in grads.items():
            results[key]["grads"] = grad
        return results if torch.distributed.get_rank() == 0 else None
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel_equivalence"))
    (results,) = run_distributed(_run_layouts, 1, [SINGLE], root)
    results.update(run_distributed(_run_layouts, 2, TWO_RANKS, root)[0])
    results.update(run_distributed(_run_layouts, 4, FOUR_RANKS, root)[0])
    return results


def test_reference_trains(runs):
    for method in METHODS:
        losses = [loss for loss, _ in runs["single", method]["steps"]]
        assert all(math.isfinite(x) for x in losses)
        assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # untrained: about uniform
        assert losses[-1] < losses[0], (method, losses)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", TWO_RANKS + FOUR_RANKS, ids=lambda layout: layout.name)
def test_layout_matches_single_process(runs, layout, method):
    got, ref = runs[layout.name, method], runs["single", method]
    losses, norms = zip(*got["steps"])
    ref_losses, ref_norms = zip(*ref["steps"])
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert norms == pytest.approx(ref_norms, rel=GRAD_NORM_RTOL)
    assert got["replica_spread"] == 0.0
    assert got["grads"].keys() == ref["grads"].keys()
    for name, expected in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][name], expected, rtol=GRAD_RTOL, atol=GRAD_ATOL_OF_MAX * expected.abs().max().item(),
            msg=lambda m: f"{layout.name} {method} grad of {name}: {m}",
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", TWO_RANKS + FOUR_RANKS, ids=lambda layout: layout.name)
def test_scores_match_single_process(runs, layout, method):
    """Engine.score per micro-batch: summed NLL, masked count, and wrong argmax count (all wrong
    after 5 steps: the argmax itself is checked against transformers in test_output_tp.py)."""
    got, ref = runs[layout.name, method]["scores"], runs["single", method]["scores"]
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=LOSS_RTOL, atol=0)
    assert torch.equal(got[:, 1:], ref[:, 1:]) and (ref[:, 1] == MICRO_BATCH_SIZE * SEQ // 2).all()


@pytest.mark.parametrize("layout", [layout for layout in TWO_RANKS + FOUR_RANKS if layout.cp > 1],
                         ids=lambda layout: layout.name)
def test_engine_rejects_sequence_not_divisible_by_2cp(runs, layout):
    for method in METHODS:
        message = runs[layout.name, method]["bad_length_error"]
        assert f"sequence length {SEQ - 2} is not divisible by 2*parallel.cp = {2 * layout.cp}" in message


@pytest.mark.parametrize(
    "changes, world_size, match",
    [
        ({"parallel.cp": 4, "data.seq_len": 4100}, None,
         r"^data.seq_len: 4100 tokens is not a multiple of 8 \(2\*parallel.cp=8 chunks"),
        ({"parallel.cp": 2, "eval.lengths": [128, 130]}, None, r"^eval.lengths\[1\]: 130 tokens .* \(2\*parallel.cp=4"),
        ({"parallel.tp": 2, "parallel.sp": True, "data.seq_len": 4095}, None,
         r"^data.seq_len: 4095 tokens .* \(parallel.cp\*parallel.tp=2 for sequence parallelism"),
        ({"parallel.tp": 3}, None, r"^parallel.tp: model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        ({"parallel.tp": 4, "model.num_query_groups": 2}, None,
         r"^parallel.tp: model.num_query_groups=2 is not divisible by parallel.tp=4"),
        ({"parallel.pp": 3}, None, r"^parallel.pp: model.num_layers=4 is not divisible by parallel.pp=3"),
        ({"parallel.tp": 2, "parallel.cp": 2}, 6,
         r"^parallel.tp: world size 6 is not divisible by parallel.tp\*pp\*cp = 4"),
        ({"parallel.pp": 2, "data.reset_position_ids": True}, None,
         r"^parallel.pp: packed batches \(data.reset_position_ids=true\) need parallel.pp=1"),
        ({"parallel.tp": 2, "parallel.sp": True, "data.reset_position_ids": True}, None,
         r"^parallel.sp: packed batches \(data.reset_position_ids=true\) need parallel.sp=false"),
        pytest.param({"log.wandb": True}, None, r"^log.wandb: the wandb package is not installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None,
                                              reason="wandb is installed here")),
        ({"model.core_attention": "flash"}, None, r"^model.core_attention: one of sdpa\|local, got 'flash'"),
    ],
    ids=["seq_vs_cp", "eval_length_vs_cp", "seq_vs_sp", "heads_vs_tp", "groups_vs_tp", "layers_vs_pp",
         "world_size", "packed_vs_pp", "packed_vs_sp", "wandb_missing", "core_attention"],
)
def test_validate_names_the_field(changes, world_size, match):
    from megarope.errors import MegaropeError
    from megarope.run.config import validate

    cfg = _config(SINGLE)
    for key, value in changes.items():
        group, field = key.split(".")
        setattr(getattr(cfg, group), field, value)
    with pytest.raises(MegaropeError) as err:
        validate(cfg, world_size=world_size)
    # every failed check is reported: the one this case is about among them
    assert any(re.search(match, str(e)) for e in getattr(err.value, "errors", [err.value])), str(err.value)
