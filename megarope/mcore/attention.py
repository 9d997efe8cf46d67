"""Core attention wrapper: per-position query scale and RoPE attention factor, then the real kernel.

Plugged into megatron's layer spec at ``self_attention.submodules.core_attention``. It receives
query/key/value after megatron applied the rotary embedding, multiplies the query by

- ``RopeConfig.query_scale`` at each token's GLOBAL position (entropy-aware ABF; the context
  parallel chunk permutation and per-sequence resets of packed batches are followed), and
- the square of the RoPE attention factor on the rotary dims (transformers multiplies cos and
  sin by it, which scales q.k on those dims by its square; megatron passes ``mscale`` only for
  YaRN configs), or, when LongRoPE's first n̂ positions keep the unscaled cos/sin
  (``RopeConfig.n_hat_attention_factor`` False), a(i)·a on the query and a(j)/a on the key,

then calls the wrapped core attention: Transformer Engine's ``TEDotProductAttention`` when the
spec has it (fast kernels and TE's context parallelism are kept), otherwise ``SDPAAttention``
(torch's ``scaled_dot_product_attention``, the default without TE; context parallelism and packed
(thd) batches block-diagonal per document through ``megarope.mcore.context_parallel``) or
megatron's local ``DotProductAttention`` (the plain reference, ``core_attention="local"``; packed
batches, which it rejects, still go to SDPA).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megarope.mcore.context_parallel import cp_attention, cp_local_indices
from megarope.mcore.compat import compute_device
from megarope.mcore.rotary import RopeStateMixin
from megarope.rope.config import RopeConfig


def global_positions(
    seq_len: int, cp_size: int, cp_rank: int, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """Global (per-sequence, for packed batches) positions of this CP rank's tokens, local order."""
    if cu_seqlens_padded is None:
        return cp_local_indices(seq_len, cp_size, cp_rank) if cp_size > 1 else torch.arange(seq_len)
    bounds = cu_seqlens_padded.tolist()
    parts = [
        cp_local_indices(end - start, cp_size, cp_rank) if cp_size > 1 else torch.arange(end - start)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts)


class SDPAAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``: the non-TE default.

    megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] scores in fp32 and
    repeats K/V for GQA; SDPA's flash/efficient kernels (CPU and GPU) keep memory linear in s and
    take grouped K/V as they are (``enable_gqa``). Same conventions as the local one: q [s, b, h, d],
    k/v [s, b, h_kv, d], output [s, b, h·d]; causal unless an ``attention_mask`` is given (megatron's
    convention, True = masked out, which then replaces the causal mask as in the local attention).
    Packed (thd) batches attend within each sequence; context parallelism (CP > 1) goes through the
    torch-native fallback ``megarope.mcore.context_parallel.cp_attention``, which is SDPA per chunk.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # getattr: fields that not every supported megatron-core version has
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None) is not None:
            raise ValueError("megarope's SDPA core attention does plain causal softmax only "
                             "(softmax_type='vanilla', window_size=None); use core_attention='local'")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"megarope's SDPA core attention is causal, got attn_mask_type={attn_mask_type}")
        # apply_query_key_layer_scaling divides the scale by the layer number and the local softmax
        # multiplies it back: the net scale is the same, so it is ignored here.
        self.softmax_scale = softmax_scale
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None
        if self.cp_group is None:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("megarope's SDPA core attention takes no attention_bias")
        cu = None
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        dropout_p = self.dropout if self.training else 0.0
        # as megatron's local attention: attention dropout draws from the model-parallel RNG stream
        # (different per TP rank) unless sequence parallelism already splits the tokens over TP
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p and not self.config.sequence_parallel
               else contextlib.nullcontext())
        if attention_mask is not None:
            if cu is not None or self.cp_group.size() > 1:
                raise ValueError("an explicit attention_mask works without packing and CP only; pass None (causal)")
            with rng:
                out = F.scaled_dot_product_attention(
                    *(t.permute(1, 2, 0, 3) for t in (query, key, value)), attn_mask=~attention_mask,
                    dropout_p=dropout_p, scale=self.softmax_scale, enable_gqa=True).permute(2, 0, 1, 3)
        else:
            # with a one-rank CP group this is one causal SDPA call per sequence
            with rng:
                out = cp_attention(query, key, value, cp_group=self.cp_group, softmax_scale=self.softmax_scale,
                                   causal=True, cu_seqlens_padded=cu, dropout_p=dropout_p)
        return out.reshape(*out.shape[: out.dim() - 2], -1)


class MegaropeCoreAttention(RopeStateMixin, MegatronModule):
    """Scales the query (see module doc) and delegates to ``inner``, built with megatron's kwargs."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, rope: RopeConfig,
                 inner: type = SDPAAttention):
        super().__init__(config=config)
        self.layer_number = layer_number
        if inner is DotProductAttention and config.context_parallel_size > 1:
            inner = SDPAAttention  # megatron's local attention asserts CP == 1
        kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                      attention_type=attention_type, attention_dropout=attention_dropout,
                      softmax_scale=softmax_scale, pg_collection=pg_collection)
        if cp_comm_type is not None:
            kwargs["cp_comm_type"] = cp_comm_type
        self.inner = inner(**kwargs)
        # megatron's local attention rejects packed (thd) batches: those go to SDPA, which attends
        # within each document (no parameters: nothing changes in checkpoints)
        self.packed = SDPAAttention(**kwargs) if isinstance(self.inner, DotProductAttention) else None
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None
        self.set_rope(rope)

    def set_rope(self, rope: RopeConfig) -> None:
        self.rope = rope
        self._multipliers: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def _cp(self) -> tuple[int, int]:
        if self.cp_group is None:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        if self.cp_group is None:
            return 1, 0
        return self.cp_group.size(), self.cp_group.rank()

    def multipliers(self, num_tokens: int, head_dim: int,
                    cu_seqlens_padded=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """[tokens, head_dim] float32 multipliers of the local query and key tokens (None: identity).

        The attention factor a on cos/sin multiplies the rotary part of a logit by a(i)·a(j): a
        constant a is a² on the query alone; a per-position one (``n_hat_attention_factor`` False)
        is a(i)·a on the query and a(j)/a on the key (1 past n̂, so only the first keys change)."""
        cp_size, cp_rank = self._cp()
        key = (num_tokens, head_dim, cp_size, cp_rank,
               None if cu_seqlens_padded is None else tuple(cu_seqlens_padded.tolist()))
        if key in self._multipliers:
            return self._multipliers[key]
        rope, factor = self.rope, self.rope.attention_factor()
        scaled_layer = rope.has_query_scale and self.layer_number > rope.unscaled_layers
        per_position = factor != 1.0 and rope.method.n_hat and not rope.n_hat_attention_factor
        q_mult = k_mult = None
        if factor != 1.0 or scaled_layer:
            positions = global_positions(num_tokens * cp_size, cp_size, cp_rank, cu_seqlens_padded)
            rot = rope.rotary_dim
            if per_position:
                a = rope.position_attention_factor(positions, seq_len=num_tokens * cp_size)
                q_rot, k_rot = a * factor, a / factor
            else:
                q_rot, k_rot = torch.full((num_tokens,), factor**2, dtype=torch.float64), None
            q = torch.ones(num_tokens, head_dim, dtype=torch.float64)
            q[:, :rot] = q_rot[:, None]
            if scaled_layer:
                q *= rope.query_scale(positions, self.layer_number).double()[:, None]
            q_mult = q.float().to(compute_device())
            if k_rot is not None:
                k = torch.ones(num_tokens, head_dim, dtype=torch.float64)
                k[:, :rot] = k_rot[:, None]
                k_mult = k.float().to(compute_device())
        if len(self._multipliers) > 8:
            self._multipliers.clear()
        self._multipliers[key] = (q_mult, k_mult)
        return q_mult, k_mult

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        cu = None
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        q_mult, k_mult = self.multipliers(query.shape[0], query.shape[-1], cu)
        shape = (query.shape[0], 1, query.shape[-1]) if thd else (query.shape[0], 1, 1, query.shape[-1])
        if q_mult is not None:
            query = query * q_mult.view(shape).to(device=query.device, dtype=query.dtype)
        if k_mult is not None:
            key = key * k_mult.view(shape).to(device=key.device, dtype=key.dtype)
        inner = self.packed if thd and self.packed is not None else self.inner
        return inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                     attention_bias=attention_bias, packed_seq_params=packed_seq_params)
