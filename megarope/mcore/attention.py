"""Core attention wrapper: RoPE with its attention factor and per-position query scale, then the real kernel.

Plugged into megatron's layer spec at ``self_attention.submodules.core_attention``. It receives
query/key/value before any rotation (megarope's rotary embedding hands megatron no angle table,
see ``megarope.mcore.rotary``) and applies, in one fused function (``megarope.rope.fused.rope_qk``,
compiled by default), the rotation at each token's GLOBAL position and the multipliers of the query

- ``RopeConfig.query_scale`` at each token's global position (entropy-aware ABF; the context
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
from megarope.mcore.rotary import CosSinCache, RopeStateMixin
from megarope.rope.config import RopeConfig
from megarope.rope.fused import rope_function


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
    torch-native fallback ``megarope.mcore.context_parallel.cp_attention``, a ring of flash-attention blocks.
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
    """Applies RoPE with its scales (see module doc) and delegates to ``inner``, built with megatron's kwargs.

    ``tables``: the cos/sin cache shared by the model's layers (``wrap_core_attention`` gives every
    layer of a spec the same one); ``rope_fusion``: ``"compile"`` or ``"eager"``
    (``megarope.rope.fused.rope_function``).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, rope: RopeConfig,
                 inner: type = SDPAAttention, tables: CosSinCache | None = None, rope_fusion: str = "compile"):
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
        self.tables = tables if tables is not None else CosSinCache()
        self.rope_fn = rope_function(rope_fusion)
        self.set_rope(rope)

    def set_rope(self, rope: RopeConfig) -> None:
        self.rope = rope
        self._multipliers: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _cp(self) -> tuple[int, int]:
        if self.cp_group is None:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        if self.cp_group is None:
            return 1, 0
        return self.cp_group.size(), self.cp_group.rank()

    @staticmethod
    def _layout(num_tokens: int, cp_size: int, cu_seqlens_padded) -> tuple[tuple, int]:
        """(cache key of the local tokens' layout, the sequence length RoPE sees): the whole
        sequence for bshd, the longest (padded) document for thd, as megatron's rotary."""
        if cu_seqlens_padded is None:
            return (num_tokens, cp_size, None), num_tokens * cp_size
        bounds = tuple(cu_seqlens_padded.tolist())
        return (num_tokens, cp_size, bounds), max(b - a for a, b in zip(bounds[:-1], bounds[1:]))

    def multipliers(self, num_tokens: int, cu_seqlens_padded=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_rot, q_pass, k_rot) float32 [tokens] multipliers of the local query's rotary dims, its
        other dims and the key's rotary dims (``megarope.rope.fused.rope_qk``).

        The attention factor a on cos/sin multiplies the rotary part of a logit by a(i)·a(j): a
        constant a is a² on the query alone; a per-position one (``n_hat_attention_factor`` False)
        is a(i)·a on the query and a(j)/a on the key (1 past n̂, so only the first keys change).
        The entropy-aware query scale multiplies every dim of the query."""
        cp_size, cp_rank = self._cp()
        layout, seq_len = self._layout(num_tokens, cp_size, cu_seqlens_padded)
        key = (layout, cp_rank)
        if key in self._multipliers:
            return self._multipliers[key]
        rope, factor = self.rope, self.rope.attention_factor(seq_len)
        positions = global_positions(num_tokens * cp_size, cp_size, cp_rank, cu_seqlens_padded)
        if factor != 1.0 and rope.method.n_hat and not rope.n_hat_attention_factor:
            a = rope.position_attention_factor(positions, seq_len=seq_len)
            q_rot, k_rot = a * factor, a / factor
        else:
            q_rot, k_rot = torch.full((num_tokens,), factor**2, dtype=torch.float64), torch.ones(num_tokens)
        q_pass = rope.query_scale(positions, self.layer_number).double()
        device = compute_device()
        out = tuple(t.float().to(device) for t in (q_rot * q_pass, q_pass, k_rot))
        if len(self._multipliers) > 8:
            self._multipliers.clear()
        self._multipliers[key] = out
        return out

    def cos_sin(self, num_tokens: int, cu_seqlens_padded=None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin [tokens, rotary_dim/2] of the local tokens (global positions)."""
        cp_size, cp_rank = self._cp()
        layout, seq_len = self._layout(num_tokens, cp_size, cu_seqlens_padded)
        return self.tables.get(
            self.rope, (layout, cp_rank),
            lambda: global_positions(num_tokens * cp_size, cp_size, cp_rank, cu_seqlens_padded),
            seq_len, compute_device())

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        cu = None
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        n = query.shape[0]
        cos, sin = (t.to(query.device) for t in self.cos_sin(n, cu))
        q_rot, q_pass, k_rot = (t.to(query.device) for t in self.multipliers(n, cu))
        query, key = self.rope_fn(query, key, cos, sin, q_rot, q_pass, k_rot, self.config.rotary_interleaved)
        inner = self.packed if thd and self.packed is not None else self.inner
        return inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                     attention_bias=attention_bias, packed_seq_params=packed_seq_params)
