"""Context-parallel (CP) sequence layout, packed (THD) batches and a CPU fallback for CP attention.

Layout. The load-balanced order of Transformer Engine and megatron-core: a sequence of S tokens is
cut into 2·cp chunks of S/(2·cp) tokens, and CP rank r holds chunks r and 2·cp−1−r, in that order.
Each rank then does the same amount of causal attention work. Packed (thd) batches apply the rule
per sequence, after padding every sequence to a multiple of 2·cp. Anything position-dependent
(RoPE angles, per-position query scales) must use the global positions these functions return.

Attention. `cp_attention` is the fallback used where Transformer Engine (GPU-only) is absent; it is
not a replacement for TE's CP attention. It is a ring: each rank keeps its own queries; the K/V
blocks travel around the CP group with p2p sends (``isend``/``irecv``, gloo or NCCL), the next
block's transfer overlapping the current block's attention. Each (query chunk, key chunk) block
that the causal mask does not hide entirely (same sequence; key chunk before the query chunk, or
the same chunk with a causal mask) goes through a flash-attention kernel that returns its
log-sum-exp (on CPU ``aten._scaled_dot_product_flash_attention_for_cpu``, which takes grouped K/V
as they are; elsewhere a plain-torch block), and the blocks merge with the online-softmax rule in
float32. The backward is the same ring again: the flash backward of each block, fed the merged
output and log-sum-exp, gives that block's exact share of dQ, dK and dV; the dK/dV of a block travel
with it and reach their owner after the last step. Nothing is recomputed and nothing is gathered:
per rank, memory is O(S/cp) (its q/k/v/output, one K/V block in flight, float32 accumulators).
Packed (thd) batches follow the same rule per sequence. Attention dropout needs CP = 1 (dropout on
whole softmax rows does not commute with merging partial ones). Without CP (one rank) it is one
causal SDPA call per sequence.

``torch.distributed.tensor.experimental.context_parallel`` (torch 2.13) was rejected: it fails on
CPU (it only ring-shards the CUDA flash/efficient/cuDNN SDPA kernels; CPU SDPA dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which has no DTensor sharding strategy), and
it patches SDPA globally and resizes the input buffers in place. An earlier version of this module
all-gathered K and V: O(S) memory per rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"parallel.cp must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, parallel.cp={cp_size})")


def _check_divisible(seq_len: int, cp_size: int, what: str) -> None:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"{what} {seq_len} is not divisible by 2*parallel.cp = {2 * cp_size}: context "
            f"parallelism cuts each sequence into 2*cp equal chunks; pad it to a multiple of "
            f"{2 * cp_size} or change parallel.cp"
        )


def cp_local_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64, local order) of the S/cp tokens that CP rank ``cp_rank`` holds.

    Only the local positions are built, so this is O(S/cp) even at 2M tokens.
    """
    _check_cp(cp_size, cp_rank)
    _check_divisible(seq_len, cp_size, "sequence length")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, dtype=torch.long)
    return torch.cat([first, first + (2 * cp_size - 1 - 2 * cp_rank) * chunk])


def cp_local_indices_thd(
    cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Indices into the global padded packed sequence of the tokens CP rank ``cp_rank`` holds.

    ``cu_seqlens_padded`` are the cumulative lengths of the padded sequences (megatron's
    ``PackedSeqParams.cu_seqlens_q_padded``); each length must be a multiple of 2·cp.
    """
    _check_cp(cp_size, cp_rank)
    starts = cu_seqlens_padded.tolist()
    parts = []
    for i, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        _check_divisible(end - start, cp_size, f"padded length of packed sequence {i}:")
        parts.append(start + cp_local_indices(end - start, cp_size, cp_rank))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def slice_bshd(
    batch: Mapping[str, Any], cp_size: int, cp_rank: int, seq_dim: int = 1
) -> dict[str, Any]:
    """This CP rank's part of a padded batch.

    Every tensor with a sequence dim (tokens, labels, loss_mask, position_ids, ...) is cut like
    ``batch["tokens"]`` along ``seq_dim``; ``attention_mask`` [b, 1, s, s] is cut along its query
    rows (dim 2), as megatron does. ``None``, non-tensors and tensors with fewer than
    ``seq_dim + 1`` dims pass through unchanged.
    """
    if "tokens" not in batch:
        raise ValueError("slice_bshd needs batch['tokens'] to know the sequence length")
    seq_len = batch["tokens"].shape[seq_dim]
    index = cp_local_indices(seq_len, cp_size, cp_rank)
    out = {}
    for key, value in batch.items():
        dim = 2 if key == "attention_mask" else seq_dim
        if not isinstance(value, torch.Tensor) or value.dim() <= dim:
            out[key] = value
            continue
        if value.shape[dim] != seq_len:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[dim]} positions on dim {dim}, "
                f"batch['tokens'] has {seq_len}"
            )
        out[key] = value.index_select(dim, index.to(value.device))
    return out


def pack_thd(batch: Mapping[str, Any], cp_size: int = 1, cp_rank: int = 0, cp_group=None):
    """A packed batch as megatron's THD input: ``(local, packed_seq_params)``.

    ``batch`` holds ``[b, s]`` tensors (tokens, labels, loss_mask, position_ids, ...) and
    ``cu_seqlens``, the document offsets over the ``b*s`` tokens flattened row by row. Every
    document is padded to a multiple of 2·cp (CP cuts each into 2·cp chunks; without CP nothing is
    padded): pad tokens come after their document's tokens, so causal attention never lets a real
    token see one, and their ``loss_mask`` is 0. ``local`` holds this CP rank's tokens as
    ``[1, t]`` tensors; ``position_ids`` restart at 0 in every document. The params carry both
    offset lists (``cu_seqlens_q`` real, ``cu_seqlens_q_padded`` padded, as TE's THD kernels take
    them) and the longest padded document as ``max_seqlen_q``, the length megatron builds the
    RoPE table for.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].long().cpu()
    lengths = torch.diff(cu)
    multiple = 2 * cp_size if cp_size > 1 else 1
    padded = (lengths + multiple - 1) // multiple * multiple
    cu_padded = torch.cat([cu.new_zeros(1), torch.cumsum(padded, 0)])
    total = int(cu_padded[-1])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    dest = torch.arange(int(cu[-1])) - cu[:-1][doc] + cu_padded[:-1][doc]  # real tokens' padded slots
    local = {}
    for key, value in batch.items():
        if key == "cu_seqlens" or not isinstance(value, torch.Tensor):
            continue
        full = value.new_zeros(total)
        full[dest.to(value.device)] = value.reshape(-1)
        local[key] = full
    starts = torch.repeat_interleave(cu_padded[:-1], padded)
    local["position_ids"] = (torch.arange(total) - starts).to(batch["tokens"].device)
    if cp_size > 1:
        index = cp_local_indices_thd(cu_padded, cp_size, cp_rank)
        local = {k: v.index_select(0, index.to(v.device)) for k, v in local.items()}
    device = batch["tokens"].device
    cu, cu_padded = cu.to(device, torch.int32), cu_padded.to(device, torch.int32)
    longest = int(padded.max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                             cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest,
                             cp_group=cp_group)
    return {k: v[None] for k, v in local.items()}, params


def _segments(bounds: list[int], cp_size: int, cp_rank: int) -> list[tuple[int, int, int, int]]:
    """(local start, length, sequence, chunk id) of the token runs CP rank ``cp_rank`` holds, in its
    local order (the layout of :func:`cp_local_indices_thd`; one sequence for bshd)."""
    segments, start, n_chunks = [], 0, 2 * cp_size
    for seq, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        chunk = (b - a) // n_chunks
        if chunk == 0:
            continue
        for chunk_id in (cp_rank, n_chunks - 1 - cp_rank):
            segments.append((start, chunk, seq, chunk_id))
            start += chunk
    return segments


def _pairs(q_segments, k_segments, causal: bool):
    """(query slice, key slice, diagonal) of every block of scores that is not all masked: same
    sequence, and with a causal mask a key chunk before the query chunk (all visible) or the same
    chunk (causal within it)."""
    keys: dict[int, list] = {}
    for start, length, seq, chunk_id in k_segments:
        keys.setdefault(seq, []).append((slice(start, start + length), chunk_id))
    for start, length, seq, q_chunk in q_segments:
        for k_slice, k_chunk in keys.get(seq, ()):
            if not causal or k_chunk < q_chunk:
                yield slice(start, start + length), k_slice, False
            elif k_chunk == q_chunk:
                yield slice(start, start + length), k_slice, True


def _block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log-sum-exp [b, h, s_q] float32) of one block; q [b, h, s_q, d], k/v [b, h_kv, s_k, d]."""
    if q.device.type == "cpu":
        # torch's CPU flash kernel: memory linear in the block, grouped K/V taken as they are
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return _torch_block_forward(q, k, v, causal, scale)


def _torch_block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_block_forward` in plain torch (devices without a CPU flash kernel): [s_q, s_k] scores."""
    scores = _scores(q, k, causal, scale)
    lse = scores.logsumexp(-1)
    return (torch.exp(scores - lse[..., None]) @ _repeat(v, q).float()).to(q.dtype), lse


def _block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one block given the MERGED output and log-sum-exp of the query rows: the
    flash-attention backward then gives each block's exact share of the gradient."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return _torch_block_backward(dout, q, k, v, out, lse, causal, scale)


def _torch_block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """:func:`_block_backward` in plain torch."""
    probs = torch.exp(_scores(q, k, causal, scale) - lse[..., None])
    dout, v_rep = dout.float(), _repeat(v, q).float()
    dv = probs.transpose(-1, -2) @ dout
    dscores = probs * (dout @ v_rep.transpose(-1, -2) - (dout * out.float()).sum(-1, keepdim=True)) * scale
    dq, dk = dscores @ _repeat(k, q).float(), dscores.transpose(-1, -2) @ q.float()
    groups = q.shape[1] // k.shape[1]
    dk, dv = (t.unflatten(1, (k.shape[1], groups)).sum(2) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _repeat(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """float32 [b, h, s_q, s_k] scaled scores (the non-CPU block kernel: plain torch)."""
    scores = (q.float() @ _repeat(k, q).float().transpose(-1, -2)) * scale
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Online softmax: fold a block's (out, lse) into the running float32 ones, in place."""
    new = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new)[..., None]).add_(block_out.float() * torch.exp(block_lse - new)[..., None])
    lse.copy_(new)


def _shift(send: list[torch.Tensor], group, tag: int) -> tuple[list[torch.Tensor], list]:
    """Start sending ``send`` to the next CP rank and receiving the previous rank's; (buffers, requests)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    recv = [torch.empty_like(t) for t in send]
    requests = [dist.isend(t, peer((rank + 1) % size), group=group, tag=tag + i) for i, t in enumerate(send)]
    requests += [dist.irecv(t, peer((rank - 1) % size), group=group, tag=tag + i) for i, t in enumerate(recv)]
    return recv, requests


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """A [b, h, s, d] view of [s, b, h, d] (what the kernels take; no copy)."""
    return t.permute(1, 2, 0, 3)


class _RingAttention(torch.autograd.Function):
    """Ring attention over the CP group; q/k/v [s_local, b, h(_kv), d] contiguous, this rank's tokens.

    Forward: step i holds the K/V block of rank r-i (its own first), starts passing it on, and
    merges the score blocks it can see. Backward: the same ring again, with the dK/dV of the held
    block travelling along with it; after the last step they reach their owner. Tensors stay in
    megatron's [s, b, h, d] layout (contiguous for the sends, one slice per chunk) and the kernels
    get [b, h, s, d] views: no layout copies of the local q/k/v/output or their gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, bounds, causal, scale):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = _segments(bounds, size, rank)
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[1], q.shape[2], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        block_k, block_v = k, v
        for step in range(size):
            if step < size - 1:
                (next_k, next_v), requests = _shift([block_k, block_v], group, tag=2 * step)
            for qs, ks, diagonal in _pairs(mine, _segments(bounds, size, (rank - step) % size), causal):
                block_out, block_lse = _block_forward(_bhsd(q[qs]), _bhsd(block_k[ks]), _bhsd(block_v[ks]),
                                                      diagonal, scale)
                _merge(_bhsd(out[qs]), lse[:, :, qs], block_out, block_lse)
            if step < size - 1:
                for request in requests:
                    request.wait()
                block_k, block_v = next_k, next_v
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.bounds, ctx.causal, ctx.scale = group, bounds, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, bounds = ctx.group, ctx.bounds
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = _segments(bounds, size, rank)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block_k, block_v = k, v
        block_dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        block_dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for step in range(size):
            requests = []
            if step < size - 1:
                (next_k, next_v), requests = _shift([block_k, block_v], group, tag=4 * step)
            for qs, ks, diagonal in _pairs(mine, _segments(bounds, size, (rank - step) % size), ctx.causal):
                gq, gk, gv = _block_backward(_bhsd(dout[qs]), _bhsd(q[qs]), _bhsd(block_k[ks]), _bhsd(block_v[ks]),
                                             _bhsd(out[qs]), lse[:, :, qs], diagonal, ctx.scale)
                _bhsd(dq[qs]).add_(gq)
                _bhsd(block_dk[ks]).add_(gk)
                _bhsd(block_dv[ks]).add_(gv)
                del gq, gk, gv
            (block_dk, block_dv), grad_requests = _shift([block_dk, block_dv], group, tag=4 * step + 2)
            for request in requests + grad_requests:
                request.wait()
            if step < size - 1:
                block_k, block_v = next_k, next_v
        return dq.to(q.dtype), block_dk.to(k.dtype), block_dv.to(v.dtype), None, None, None, None


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: dist.ProcessGroup | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    cu_seqlens_padded: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of this CP rank's queries over the whole sequence (ring fallback, see module doc).

    bshd: q [s_local, b, h, d], k [s_local, b, h_kv, d], v [s_local, b, h_kv, d_v] in the
    load-balanced layout (megatron's sbhd order); returns [s_local, b, h, d_v].
    thd: pass ``cu_seqlens_padded`` (global cumulative lengths of the padded sequences) and q/k/v [t_local, h(_kv), d];
    attention stays within each sequence; returns [t_local, h, d_v].
    GQA: h_kv must divide h. ``dropout_p``: attention dropout, without CP only (the ring merges
    partial softmaxes, which dropout on whole rows does not commute with). ``cp_group`` None means
    the default group, or no CP when torch.distributed is not initialised. Every rank of ``cp_group``
    must call this (and its backward) together.
    """
    thd = cu_seqlens_padded is not None
    if q.dim() != (3 if thd else 4) or k.dim() != q.dim() or v.dim() != q.dim():
        layout = "thd [t, h, d]" if thd else "bshd [s, b, h, d]"
        raise ValueError(
            f"cp_attention expects {layout} q/k/v, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-2] % k.shape[-2] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"need k and v with the same [s, (b,) h_kv] and h_kv dividing h, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if thd:
        q, k, v = (t.unsqueeze(1) for t in (q, k, v))
    distributed = dist.is_available() and dist.is_initialized()
    cp_size = dist.get_world_size(cp_group) if distributed else 1

    local_len = q.shape[0]
    bounds = [int(x) for x in cu_seqlens_padded.tolist()] if thd else [0, local_len * cp_size]
    if thd and bounds[-1] != local_len * cp_size:
        raise ValueError(
            f"cu_seqlens_padded ends at {bounds[-1]} tokens but cp={cp_size} ranks hold "
            f"{local_len} each"
        )
    if cp_size == 1:  # one causal SDPA call per sequence, autograd through torch's own kernel
        out = torch.cat([
            F.scaled_dot_product_attention(_bhsd(q[a:b]), _bhsd(k[a:b]), _bhsd(v[a:b]), dropout_p=dropout_p,
                                           is_causal=causal, scale=softmax_scale, enable_gqa=True).permute(2, 0, 1, 3)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ])
    else:
        if dropout_p:
            raise ValueError("attention dropout with context parallelism is not supported by megarope's ring "
                             "fallback; set attention_dropout=0 (or use Transformer Engine)")
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        q, k, v = (t.contiguous() for t in (q, k, v))
        out = _RingAttention.apply(q, k, v, cp_group, bounds, causal, scale)
    return out.squeeze(1) if thd else out
