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
spec has it (fast kernels and TE's context parallelism are kept), megatron's local
``DotProductAttention`` otherwise, or, for context parallelism without Transformer Engine, the
torch-native CPU fallback in ``megarope.mcore.context_parallel``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
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


class TorchContextParallelAttention(MegatronModule):
    """Context-parallel core attention without Transformer Engine (the CPU fallback)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("the CPU context-parallel attention has no dropout: set attention_dropout=0")
        self.softmax_scale = softmax_scale
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        if self.cp_group is None:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        cu = None
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        out = cp_attention(query, key, value, cp_group=self.cp_group, softmax_scale=self.softmax_scale,
                           causal=True, cu_seqlens_padded=cu)
        return out.reshape(*out.shape[: out.dim() - 2], -1)


class MegaropeCoreAttention(RopeStateMixin, MegatronModule):
    """Scales the query (see module doc) and delegates to ``inner``, built with megatron's kwargs."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, rope: RopeConfig,
                 inner: type = DotProductAttention):
        super().__init__(config=config)
        self.layer_number = layer_number
        if inner is DotProductAttention and config.context_parallel_size > 1:
            inner = TorchContextParallelAttention  # megatron's local attention asserts CP == 1
        kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                      attention_type=attention_type, attention_dropout=attention_dropout,
                      softmax_scale=softmax_scale, pg_collection=pg_collection)
        if cp_comm_type is not None:
            kwargs["cp_comm_type"] = cp_comm_type
        self.inner = inner(**kwargs)
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
        return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                          attention_bias=attention_bias, packed_seq_params=packed_seq_params)
