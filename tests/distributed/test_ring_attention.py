"""CP attention on 2 and 4 gloo ranks against one-process causal SDPA, forward and backward."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _launch import run_distributed

from megarope.mcore.context_parallel import cp_attention, cp_local_indices, cp_local_indices_thd

TOL = dict(atol=1e-5, rtol=1e-5)
# (seq_len, batch, q heads, kv heads, head dim, softmax scale, causal)
BSHD_CASES = [
    (64, 2, 4, 4, 16, None, True),
    (32, 1, 6, 2, 8, 0.3, True),
    (32, 2, 4, 1, 8, None, False),
]
# Padded packed lengths, multiples of 2*cp for cp up to 4.
THD_SEQLENS = [8, 24, 16]


def _global_qkv(shape_q, shape_kv, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def _sdpa_sbhd(q, k, v, scale, causal=True):
    """Reference: one-process SDPA on [s, b, h, d] tensors."""
    out = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=causal, scale=scale, enable_gqa=True
    )
    return out.permute(2, 0, 1, 3)


def _reference(attend, q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _cp_run(attend, index, q, k, v, dout, group):
    """Run ``attend`` on this rank's slices; return output and grads re-assembled globally."""
    local = [t[index].clone().requires_grad_() for t in (q, k, v)]
    out = attend(*local)
    out.backward(dout[index])
    size = dist.get_world_size(group)
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(indices, index, group=group)
    results = []
    for t, like in zip([out.detach(), *(t.grad for t in local)], (dout, q, k, v)):
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        full = torch.full_like(like, float("nan"))
        full[torch.cat(indices)] = torch.cat(parts)
        results.append(full)
    return results


def _check_all_cases(group):
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    for seed, (s, b, h, h_kv, d, scale, causal) in enumerate(BSHD_CASES):
        q, k, v, dout = _global_qkv((s, b, h, d), (s, b, h_kv, d), seed)
        expected = _reference(lambda *t: _sdpa_sbhd(*t, scale, causal), q, k, v, dout)
        got = _cp_run(
            lambda *t: cp_attention(*t, cp_group=group, softmax_scale=scale, causal=causal),
            cp_local_indices(s, cp, rank), q, k, v, dout, group,
        )
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"cp={cp} bshd {name}: {m}")

    cu = torch.tensor([0, *THD_SEQLENS]).cumsum(0).to(torch.int32)
    q, k, v, dout = _global_qkv((cu[-1], 4, 8), (cu[-1], 2, 8), seed=7)

    def per_sequence(q, k, v):
        return torch.cat([
            _sdpa_sbhd(*(t[a:e].unsqueeze(1) for t in (q, k, v)), None).squeeze(1)
            for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())
        ])

    expected = _reference(per_sequence, q, k, v, dout)
    got = _cp_run(
        lambda *t: cp_attention(*t, cp_group=group, cu_seqlens_padded=cu),
        cp_local_indices_thd(cu, cp, rank), q, k, v, dout, group,
    )
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"cp={cp} thd {name}: {m}")


def _cp4_and_two_cp2_groups():
    dist.init_process_group("gloo")
    try:
        _check_all_cases(None)
        # Megatron hands CP a subgroup: ranks {0, 1} and {2, 3} each run CP=2 on their own.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _check_all_cases(pairs[dist.get_rank() // 2])
    finally:
        dist.destroy_process_group()


def test_cp_attention_matches_sdpa_on_4_ranks_and_2_rank_subgroups():
    # One launch covers CP=4 and CP=2: each spawned process costs seconds of torch import.
    run_distributed(_cp4_and_two_cp2_groups, 4)


def test_cp_attention_without_process_group_is_plain_causal_sdpa():
    q, k, v, _ = _global_qkv((12, 2, 4, 8), (12, 2, 1, 8), seed=3)
    torch.testing.assert_close(cp_attention(q, k, v), _sdpa_sbhd(q, k, v, None), **TOL)
    torch.testing.assert_close(
        cp_attention(q, k, v, causal=False), _sdpa_sbhd(q, k, v, None, causal=False), **TOL
    )


def test_cp_attention_rejects_bad_shapes():
    q = torch.randn(8, 1, 4, 8)
    with pytest.raises(ValueError, match="h_kv"):
        cp_attention(q, torch.randn(8, 1, 3, 8), torch.randn(8, 1, 3, 8))
    with pytest.raises(ValueError, match="thd"):
        cp_attention(q, q, q, cu_seqlens_padded=torch.tensor([0, 8]))
