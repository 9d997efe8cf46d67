"""Real megatron-core on CPU through megarope.mcore.compat and megarope.mcore.parallel.

A tiny GPTModel trained with megatron's own DDP, optimizer and forward/backward schedules:
1 process vs TP=2, PP=2 (2 micro-batches), DP=2 (plain and distributed optimizer) and
TP=2 + sequence parallel, all starting from one dist_checkpointing checkpoint written by the
1-process run. Plus: checkpoint resharding 1 <-> TP=2, the CP batch-slicing shim, the CPU
layer's pieces in isolation, and initialize()'s validation.
"""

import logging
import math
import os
from typing import NamedTuple

import pytest
import torch
from _launch import run_distributed

SEQ = 32
VOCAB = 128
GLOBAL_BATCH = 4
MICRO_BATCH = 2
STEPS = 5
# fp32; TP/SP/DP/PP only change summation order, so per-step losses agree to rounding
# (measured <= 2.2e-7 relative over 5 Adam steps).
REL_TOL = 1e-5


class Case(NamedTuple):
    world: int = 1
    tp: int = 1
    pp: int = 1
    sp: bool = False
    dist_opt: bool = False


def _batches(step: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This DP rank's share of step ``step``'s global batch, as micro-batches.

    Each sequence counts up by a random stride from a random start (mod VOCAB): learnable
    within a few steps, and identical on every rank that asks for the same samples.
    """
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    seqs = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    per_rank = GLOBAL_BATCH // dp_size
    mine = seqs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [
        {"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous()}
        for mb in mine.split(MICRO_BATCH)
    ]


def _build(case: Case):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=case.tp,
        pipeline_model_parallel_size=case.pp,
        sequence_parallel=case.sp,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        # The megatron-core-on-CPU recipe: CPU init, every CUDA-kernel fusion off.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _load(gpt, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), ckpt_dir))


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"]
    position_ids = torch.arange(SEQ).expand_as(tokens)
    # Per-token losses [b, s] on the last stage, hidden states elsewhere.
    output = model(tokens, position_ids, attention_mask=None, labels=batch["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # clone: the schedule divides the returned loss by num_microbatches in place.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _train(case: Case, ckpt_dir: str, save_init: bool = False):
    """Train STEPS steps from the checkpoint in ``ckpt_dir`` (written first if ``save_init``).

    Returns per-step losses (mean over micro-batches and DP ranks) on last-stage ranks, None
    on the others.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarope.mcore import parallel

    parallel.initialize(tp=case.tp, pp=case.pp, seed=7)
    try:
        gpt = _build(case)
        if save_init:
            dist_checkpointing.save(gpt.sharded_state_dict(), ckpt_dir)
        _load(gpt, ckpt_dir)

        config = gpt.config
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=case.dist_opt, overlap_grad_reduce=case.dist_opt
        )
        model = DistributedDataParallel(config, ddp_config, gpt)
        # DP grad reduction, SP layer-norm grad all-reduce and PP embedding sync all live in
        # finalize_model_grads, which the schedules call after the last backward.
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=3e-3,
                weight_decay=0.0,
                clip_grad=1.0,
                use_distributed_optimizer=case.dist_opt,
            ),
            [model],
        )

        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        forward_backward = get_forward_backward_func()
        losses = []
        for step in range(STEPS):
            micro_batches = _batches(step, dp_rank, dp_size)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            out = forward_backward(
                forward_step_func=_forward_step,
                data_iterator=iter(micro_batches),
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=SEQ,
                micro_batch_size=MICRO_BATCH,
                forward_only=False,
            )
            ok, _, _ = optimizer.step()
            assert ok
            if parallel_state.is_pipeline_last_stage():
                loss = torch.stack([o["loss"] for o in out]).mean()
                torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
                losses.append(loss.item() / dp_size)
        return losses if parallel_state.is_pipeline_last_stage() else None
    finally:
        parallel.destroy()


def _train_without_launcher(ckpt_dir: str, full_path: str):
    """The reference run, as a plain `python` process would do it (no torchrun variables),
    also keeping the initial weights as a plain state dict for the resharding test."""
    from megarope.mcore import parallel

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key)
    assert parallel.detect_launch().launcher == "none"
    losses = _train(Case(), ckpt_dir, save_init=True)

    parallel.initialize()
    try:
        gpt = _build(Case())
        _load(gpt, ckpt_dir)
        torch.save({k: v for k, v in gpt.state_dict().items() if torch.is_tensor(v)}, full_path)
    finally:
        parallel.destroy()
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore_cpu")
    ckpt = root / "init"
    ckpt.mkdir()
    full = root / "init_full.pt"
    (losses,) = run_distributed(_train_without_launcher, 1, str(ckpt), str(full))
    return {"ckpt": str(ckpt), "full": str(full), "losses": losses, "root": root}


def test_single_process_loss_drops(reference):
    losses = reference["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.05)  # untrained ≈ uniform
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize(
    "case",
    [
        Case(world=2, tp=2),
        Case(world=2, pp=2),
        Case(world=2),
        Case(world=2, dist_opt=True),
        Case(world=2, tp=2, sp=True),
    ],
    ids=["tp2", "pp2", "dp2", "dp2_distributed_optimizer", "tp2_sequence_parallel"],
)
def test_parallel_losses_match_single_process(reference, case):
    results = run_distributed(_train, case.world, case, reference["ckpt"])
    losses = [r for r in results if r is not None]  # last pipeline stage only
    assert losses
    for rank_losses in losses:
        assert rank_losses == pytest.approx(reference["losses"], rel=REL_TOL)


def _reshard_via_tp2(ckpt_dir: str, full_path: str, tp2_dir: str):
    """Load the 1-rank checkpoint into TP=2 and check every shard; save that TP=2 model; load
    it back unsharded (TP=1, the 2 ranks as DP replicas) and return those weights."""
    from megatron.core import dist_checkpointing, parallel_state

    from megarope.mcore import parallel

    parallel.initialize(tp=2)
    try:
        gpt = _build(Case(world=2, tp=2))
        _load(gpt, ckpt_dir)
        full = torch.load(full_path)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for name, param in gpt.named_parameters():
            expected = full[name]
            if getattr(param, "tensor_model_parallel", False):
                expected = expected.chunk(2, dim=param.partition_dim)[tp_rank]
            assert torch.equal(param.detach(), expected), name
        dist_checkpointing.save(gpt.sharded_state_dict(), tp2_dir)
    finally:
        # keep the process group: re-creating it at once on the same port races (gloo "connection refused")
        parallel_state.destroy_model_parallel()

    parallel.initialize(tp=1)
    try:
        gpt = _build(Case(world=2))
        _load(gpt, tp2_dir)
        return {k: v for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    finally:
        parallel.destroy()


def test_dist_checkpoint_reshards_between_1_rank_and_tp2(reference):
    tp2_dir = reference["root"] / "resaved_tp2"
    tp2_dir.mkdir()
    full = torch.load(reference["full"])
    for reloaded in run_distributed(
        _reshard_via_tp2, 2, reference["ckpt"], reference["full"], str(tp2_dir)
    ):
        assert reloaded.keys() == full.keys()
        for name, tensor in full.items():
            assert torch.equal(reloaded[name], tensor), name


def _cp_slices():
    from megatron.core import parallel_state

    from megarope.mcore import parallel
    from megarope.mcore.context_parallel import slice_bshd

    parallel.initialize(cp=2)
    try:
        batch = {"tokens": torch.arange(8).unsqueeze(0), "attention_mask": None}
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        return slice_bshd(batch, cp_size, cp_rank)["tokens"].tolist()
    finally:
        parallel.destroy()


def test_cp_batch_slicing_uses_zigzag_chunks():
    # 2*cp chunks; rank r holds chunks r and 2*cp-1-r.
    assert run_distributed(_cp_slices, 2) == [[[0, 1, 6, 7]], [[2, 3, 4, 5]]]


# --- The CPU layer's pieces, in this process (scoped, torch.cuda restored afterwards) ---------


def test_cpu_compat_maps_cuda_devices_to_cpu():
    from megarope.mcore import compat

    enabled_before = compat.cpu_compat_enabled()  # by an earlier in-process initialize()
    with compat.cpu_compat():
        for device in ("cuda", "cuda:1", torch.device("cuda", 0), 0):
            assert torch.zeros(2, device=device).device.type == "cpu"
            assert torch.ones(2).to(device).device.type == "cpu"
        assert torch.ones(2).to("cuda", torch.float64).dtype == torch.float64
        assert torch.ones(2).cuda().device.type == "cpu"
        pinned = torch.empty(2, device=torch.cuda.current_device(), pin_memory=True)
        assert pinned.device.type == "cpu" and not pinned.is_pinned()
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        stream = torch.cuda.Stream(device=torch.cuda.current_device())
        stream.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(stream):
            torch.cuda.synchronize()
    if not enabled_before and not torch.cuda.is_available():
        assert torch.ones(2).type() == "torch.FloatTensor"
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is off with CUDA")
def test_cpu_compat_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from megarope.mcore import compat

    with compat.cpu_compat():
        tracker = CudaRNGStatesTracker()
        torch.manual_seed(0)
        tracker.add("model-parallel-rng", 5)
        with tracker.fork("model-parallel-rng"):
            first = torch.rand(3)
        with tracker.fork("model-parallel-rng"):
            second = torch.rand(3)
        outside = torch.rand(3)
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, second)  # the forked stream advances
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(3))  # and the default one is untouched


def test_gpt_model_deprecation_is_filtered(caplog):
    from megarope.mcore import compat

    compat.quiet_gpt_model_deprecation()
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


@pytest.mark.parametrize(
    "env, kwargs, match",
    [
        ({}, {"tp": 2}, r"world size 1 is not divisible by parallel.tp \* parallel.pp \*"),
        ({"RANK": "0", "WORLD_SIZE": "4"}, {"tp": 3}, r"world size 4 .* = 3 \* 1 \* 1 = 3"),
        ({"RANK": "0", "WORLD_SIZE": "4"}, {"tp": 2, "cp": 4}, r"world size 4 .* = 8"),
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, {"cp": 4}, r"world size 2 "),
        ({}, {"pp": 0}, r"parallel.pp must be a positive integer"),
    ],
)
def test_initialize_rejects_bad_sizes_before_touching_anything(monkeypatch, env, kwargs, match):
    from megarope.mcore import parallel

    _skip_if_group_is_up()
    _set_launcher_env(monkeypatch, env)
    with pytest.raises(ValueError, match=match):
        parallel.initialize(**kwargs)
    assert not torch.distributed.is_initialized()


def _skip_if_group_is_up():
    if torch.distributed.is_initialized():
        pytest.skip("an earlier test left a process group up in this pytest process")


def _set_launcher_env(monkeypatch, env):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_detect_launch_reads_srun_and_asks_for_a_rendezvous(monkeypatch):
    from megarope.mcore import parallel

    _skip_if_group_is_up()
    # An sbatch batch script: the job has 2 tasks, but a plain `python` there is alone.
    _set_launcher_env(monkeypatch, {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    assert parallel.detect_launch() == parallel.Launch(0, 1, 0, "none")

    _set_launcher_env(
        monkeypatch, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    )
    assert parallel.detect_launch() == parallel.Launch(3, 4, 1, "srun")
    with pytest.raises(RuntimeError, match="export MASTER_ADDR and MASTER_PORT"):
        parallel.initialize(tp=2)
    assert not torch.distributed.is_initialized()
