"""The fused RoPE (megarope.rope.fused) against megatron's apply_rotary_pos_emb followed by the scales
the core attention used to apply in separate passes, eager and compiled, forward and backward."""

import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megarope import RopeConfig
from megarope.mcore import parallel
from megarope.mcore.attention import MegaropeCoreAttention
from megarope.mcore.spec import transformer_config
from megarope.rope.fused import rope_function, rope_qk

HEAD_DIM, WINDOW = 16, 16
LONGROPE = RopeConfig(rope_type="longrope", head_dim=HEAD_DIM, long_factor=[1.0 + i for i in range(8)],
                      short_factor=[1.0] * 8, original_max_position_embeddings=WINDOW, factor=4.0, n_hat=4,
                      n_hat_attention_factor=False)  # per-position factor: the key is scaled too
EABF = RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0, original_max_position_embeddings=WINDOW)
PARTIAL = RopeConfig(rope_type="yarn", head_dim=HEAD_DIM, partial_rotary_factor=0.5, factor=4.0,
                     original_max_position_embeddings=WINDOW)


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    parallel.initialize()
    yield


def _core(rope, interleaved=False, layer=3):
    from megatron.core.transformer.enums import AttnMaskType

    config = transformer_config(num_layers=layer, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=HEAD_DIM, ffn_hidden_size=64, rotary_interleaved=interleaved)
    return MegaropeCoreAttention(config, layer_number=layer, attn_mask_type=AttnMaskType.causal,
                                 attention_type="self", rope=rope, rope_fusion="eager")


def _megatron(core, q, k, cu=None):
    """megatron's unfused RoPE, then the multipliers as separate passes (the path fusion replaces)."""
    n = q.shape[0]
    q_rot, q_pass, k_rot = core.multipliers(n, cu)
    seq_len = n if cu is None else int(torch.diff(cu).max())
    positions = torch.arange(seq_len)
    angles = core.rope.angles(positions, seq_len=seq_len)
    layout = torch.stack((angles, angles), -1).flatten(-2) if core.config.rotary_interleaved \
        else torch.cat((angles, angles), -1)
    freqs = layout[:, None, None, :]
    group = parallel_state.get_context_parallel_group()
    q = apply_rotary_pos_emb(q, freqs, core.config, cu_seqlens=cu, cp_group=group)
    k = apply_rotary_pos_emb(k, freqs, core.config, cu_seqlens=cu, cp_group=group)
    rot = core.rope.rotary_dim
    shape = (n,) + (1,) * (q.dim() - 1)
    q = torch.cat((q[..., :rot] * q_rot.view(shape), q[..., rot:] * q_pass.view(shape)), -1)
    return q, torch.cat((k[..., :rot] * k_rot.view(shape), k[..., rot:]), -1)


def _fused(fn, core, q, k, cu=None):
    n = q.shape[0]
    cos, sin = core.cos_sin(n, cu)
    return fn(q, k, cos, sin, *core.multipliers(n, cu), core.config.rotary_interleaved)


CASES = [(LONGROPE, False), (EABF, False), (EABF, True), (PARTIAL, False)]
IDS = ["longrope_nhat4_per_position", "eabf", "eabf_interleaved", "yarn_partial_rotary"]


@pytest.mark.parametrize("rope, interleaved", CASES, ids=IDS)
def test_eager_equals_megatron_then_scales(rope, interleaved):
    core = _core(rope, interleaved)
    gen = torch.Generator().manual_seed(0)
    s = 3 * WINDOW  # past the window: LongRoPE's long factors, E-ABF's scale > 1
    q, k = torch.randn(s, 2, 4, HEAD_DIM, generator=gen), torch.randn(s, 2, 2, HEAD_DIM, generator=gen)
    expected = _megatron(core, q, k)
    got = _fused(rope_qk, core, q, k)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    # the scales are really there (the comparison would not see them otherwise)
    assert any((m - 1).abs().max() > 0.1 for m in core.multipliers(s))


def test_packed_thd_equals_megatron_per_sequence():
    core = _core(EABF)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(64, 4, HEAD_DIM, generator=gen), torch.randn(64, 2, HEAD_DIM, generator=gen)
    for g, e in zip(_fused(rope_qk, core, q, k, cu), _megatron(core, q, k, cu)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rope, interleaved", CASES[:2], ids=IDS[:2])
def test_compiled_equals_eager_forward_and_backward(rope, interleaved):
    """One compile per grad mode for the whole process (dynamic shapes: both lengths reuse it)."""
    core = _core(rope, interleaved)
    compiled = rope_function("compile")
    gen = torch.Generator().manual_seed(2)
    for s in (2 * WINDOW, 3 * WINDOW):
        q, k = torch.randn(s, 1, 4, HEAD_DIM, generator=gen), torch.randn(s, 1, 2, HEAD_DIM, generator=gen)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        results = []
        for fn in (rope_qk, compiled):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            out_q, out_k = _fused(fn, core, qq, kk)
            torch.autograd.backward((out_q, out_k), (dq, dk))
            results.append((out_q.detach(), out_k.detach(), qq.grad, kk.grad))
        assert not compiled.failed  # a real compile, not the fallback
        for g, e in zip(*results):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


_NO_COMPILER = """
import logging, torch
import torch._inductor.config as inductor
from megarope.rope.fused import rope_function, rope_qk
inductor.cpp.cxx = ("/nonexistent/c++",)  # what a machine without a C++ compiler looks like to inductor
logging.basicConfig(level=logging.WARNING)
fn = rope_function("compile")
q, k, c, s, m = torch.randn(8, 1, 2, 4), torch.randn(8, 1, 1, 4), torch.rand(8, 2), torch.rand(8, 2), torch.rand(8)
for _ in range(2):
    out = fn(q, k, c, s, m, m, m)
    assert all(torch.equal(a, b) for a, b in zip(out, rope_qk(q, k, c, s, m, m, m)))
assert fn.failed
# megatron's compiled SwiGLU has no fallback: megarope leaves it off here
from megarope.mcore.spec import activation_fusion
assert activation_fusion("compile") == activation_fusion("eager") == {"bias_activation_fusion": False}
activation_fusion("compile")  # probed once: still one warning
"""


def test_compile_failure_falls_back_to_eager_with_one_warning_each():
    # a fresh process: the inductor setting and dynamo's caches stay out of this one
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("torch.compile of the fused RoPE failed") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("torch.compile cannot build kernels here") == 1, proc.stderr[-3000:]


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="rope_fusion"):
        rope_function("triton")


def test_layers_share_one_cos_sin_table():
    """cos/sin are computed once per forward shape for the whole model, not per layer (megatron's
    apply_rotary_pos_emb takes cos/sin of the angle table for q and for k in every layer)."""
    from megarope.mcore.spec import gpt_model

    config = transformer_config(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=HEAD_DIM, ffn_hidden_size=64)
    model = gpt_model(config, EABF, vocab_size=64, max_sequence_length=128, rope_fusion="eager")
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert len({id(core.tables) for core in cores}) == 1
    with torch.no_grad():
        model(torch.zeros(1, 24, dtype=torch.long), torch.arange(24)[None], None)
    assert len(cores[0].tables._entries) == 1
    # and megatron's attention gets no angle table, so it cannot rotate a second time
    assert model.rotary_pos_emb(24) is None
