"""Context-parallel (CP) sequence layout, packed (THD) batches and a CPU fallback for CP attention.

Layout. The load-balanced order of Transformer Engine and megatron-core: a sequence of S tokens is
cut into 2·cp chunks of S/(2·cp) tokens, and CP rank r holds chunks r and 2·cp−1−r, in that order.
Each rank then does the same amount of causal attention work. Packed (thd) batches apply the rule
per sequence, after padding every sequence to a multiple of 2·cp. Anything position-dependent
(RoPE angles, per-position query scales) must use the global positions these functions return.

Attention. `cp_attention` is the CPU/gloo fallback used where Transformer Engine (GPU-only) is
absent; it is not a replacement for TE's CP attention. Two alternatives were rejected:

- ``torch.distributed.tensor.experimental.context_parallel`` (torch 2.13) fails on CPU: it only
  ring-shards the CUDA flash/efficient/cuDNN SDPA kernels, and CPU SDPA dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no DTensor sharding strategy. It
  also patches SDPA globally and resizes the input buffers in place.
- A hand-written ring (p2p K/V blocks, log-sum-exp merge, reverse ring for dK/dV) keeps only two
  K/V blocks per rank, but its custom backward is the complicated part to get right.

Instead each rank all-gathers K and V (`_AllGather`, with the long-stable list ``all_gather``:
torch's autograd-aware gathers are deprecated or private and differ between 2.11 and 2.13)
and attends with its local queries, chunk by chunk, to the causal prefix of the gathered keys.
Autograd makes the backward correct by construction. Memory trade-off: every rank holds the whole
sequence's K and V (S·b·h_kv·(d_k+d_v) elements, kept for backward) instead of S/cp, and CPU SDPA
materialises a chunk × prefix mask; fine for the small CPU models this path serves, not for long
contexts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


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


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient of this rank's part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        # The list form: torch 2.13 deprecates all_gather_into_tensor for a name 2.11 lacks.
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # all_reduce + slice rather than reduce_scatter, which older gloo builds lack.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        part = grad.shape[0] // dist.get_world_size(ctx.group)
        return grad.narrow(0, dist.get_rank(ctx.group) * part, part), None


def _to_global_order(local: torch.Tensor, global_index: torch.Tensor, cp_group) -> torch.Tensor:
    """All-gather ``local`` (sequence on dim 0) and put its rows in global sequence order."""
    order = torch.empty_like(global_index)
    order[global_index] = torch.arange(global_index.numel())
    return _AllGather.apply(local, cp_group).index_select(0, order.to(local.device))


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
    """Attention of this CP rank's queries over the whole sequence (CPU fallback, see module doc).

    bshd: q [s_local, b, h, d], k [s_local, b, h_kv, d], v [s_local, b, h_kv, d_v] in the
    load-balanced layout (megatron's sbhd order); returns [s_local, b, h, d_v].
    thd: pass ``cu_seqlens_padded`` (global cumulative lengths of the padded sequences) and q/k/v [t_local, h(_kv), d];
    attention stays within each sequence; returns [t_local, h, d_v].
    GQA: h_kv must divide h. ``dropout_p``: attention dropout (each query chunk is one SDPA call
    over all keys it sees, so this is dropout on its whole softmax row). ``cp_group`` None means
    the default group, or no CP when torch.distributed is not initialised. Every rank of ``cp_group`` must call this (and its
    backward) together.
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
    cp_rank = dist.get_rank(cp_group) if distributed else 0

    local_len = q.shape[0]
    bounds = [int(x) for x in cu_seqlens_padded.tolist()] if thd else [0, local_len * cp_size]
    if thd and bounds[-1] != local_len * cp_size:
        raise ValueError(
            f"cu_seqlens_padded ends at {bounds[-1]} tokens but cp={cp_size} ranks hold "
            f"{local_len} each"
        )
    if cp_size > 1:
        if thd:
            per_rank = [cp_local_indices_thd(cu_seqlens_padded, cp_size, r) for r in range(cp_size)]
        else:
            per_rank = [cp_local_indices(bounds[-1], cp_size, r) for r in range(cp_size)]
        global_index = torch.cat(per_rank)
        k = _to_global_order(k, global_index, cp_group)
        v = _to_global_order(v, global_index, cp_group)
    # Without CP a sequence is one chunk; with CP this rank holds two of its 2*cp chunks.
    n_chunks = 2 * cp_size if cp_size > 1 else 1
    chunk_ids = (cp_rank, n_chunks - 1 - cp_rank) if cp_size > 1 else (0,)

    # SDPA wants [b, h, s, d].
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    outputs = []
    local_start = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // n_chunks
        if chunk == 0:
            continue
        for i, chunk_id in enumerate(chunk_ids):
            q_chunk = q[:, :, local_start + i * chunk : local_start + (i + 1) * chunk]
            # A query chunk sees all earlier chunks, and itself causally (lower-right aligned).
            key_end = start + (chunk_id + 1) * chunk if causal else end
            # A square causal block (the whole sequence without CP) goes as is_causal: a CausalBias
            # there makes torch 2.13's CPU SDPA allocate O(s^2) (measured 32 MiB at 2048 tokens,
            # 1 MiB with is_causal).
            square = causal and key_end - start == chunk
            mask = causal_lower_right(chunk, key_end - start) if causal and not square else None
            outputs.append(
                F.scaled_dot_product_attention(
                    q_chunk,
                    k[:, :, start:key_end],
                    v[:, :, start:key_end],
                    attn_mask=mask,
                    dropout_p=dropout_p,
                    is_causal=square,
                    scale=softmax_scale,
                    enable_gqa=True,
                )
            )
        local_start += len(chunk_ids) * chunk
    out = torch.cat(outputs, dim=2).permute(2, 0, 1, 3)
    return out.squeeze(1) if thd else out
