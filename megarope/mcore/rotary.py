"""Rotary embedding for megatron-core driven by a RopeConfig.

Keeps megatron's ``RotaryEmbedding.forward(max_seq_len, offset, packed_seq, cp_group)`` contract
(angles ``[s, 1, 1, d]`` that megatron's ``apply_rotary_pos_emb`` turns into cos/sin) and differs
in three ways: angles come from ``RopeConfig.angles`` (float64, reduced modulo 2*pi, n-hat aware);
with context parallelism only this rank's positions are built (megatron builds the whole table
and slices it); and it never touches CUDA when there is none.

In a megarope model (``megarope.mcore.spec.install_rope`` next to ``MegaropeCoreAttention``)
``forward`` returns None, so megatron's attention skips its own ``apply_rotary_pos_emb``: the core
attention rotates q and k itself, with the attention factor and the query scale, in one fused
function (``megarope.rope.fused``), from cos/sin tables that :class:`CosSinCache` builds once per
forward shape for all layers (megatron's path recomputes cos/sin from the angles in every layer,
for q and for k). Standalone, ``forward`` is megatron's drop-in and returns the angle table.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megarope.mcore.compat import compute_device
from megarope.mcore.context_parallel import cp_local_indices
from megarope.rope.config import RopeConfig

_CACHE_SIZE = 8


class RopeStateMixin:
    """Keeps the module's RopeConfig in its state dict as ``_extra_state``.

    megatron's ``RotaryEmbedding`` drops ``inv_freq`` on load, which would lose searched LongRoPE
    factors; as extra state the config travels with ``state_dict`` and with ``dist_checkpointing``
    (megatron turns ``_extra_state`` entries into sharded objects).
    """

    rope: RopeConfig

    def set_rope(self, rope: RopeConfig) -> None:
        self.rope = rope

    def get_extra_state(self) -> dict[str, Any]:
        return {"rope": self.rope.to_dict()}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, torch.Tensor):  # megatron may hand back an empty tensor for "no state"
            if state.numel() == 0:
                return
            raise ValueError("unexpected tensor as megarope extra state")
        self.set_rope(RopeConfig.from_dict(state["rope"]))


class CosSinCache:
    """float32 cos and sin [tokens, rotary_dim/2] of the local tokens' angles, shared by the
    layers of a model (one object per layer spec), a few shapes at a time."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, rope: RopeConfig, key: tuple, positions, seq_len: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions()`` gives the global positions of the tokens ``key`` stands for (called on a miss)."""
        full_key = (rope, key, seq_len, device)
        if full_key not in self._entries:
            if len(self._entries) >= _CACHE_SIZE:
                self._entries.pop(next(iter(self._entries)))
            angles = rope.angles(positions().to(device), seq_len=seq_len)
            self._entries[full_key] = (torch.cos(angles), torch.sin(angles))
        return self._entries[full_key]


class MegaropeRotaryEmbedding(RopeStateMixin, RotaryEmbedding):
    """Drop-in replacement for megatron's ``RotaryEmbedding`` (``GPTModel.rotary_pos_emb``).

    ``applied_in_attention``: the core attention applies RoPE (``MegaropeCoreAttention``), so
    ``forward`` returns None and megatron's attention applies nothing.
    """

    def __init__(
        self,
        rope: RopeConfig,
        rotary_interleaved: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
        applied_in_attention: bool = False,
    ) -> None:
        super().__init__(
            kv_channels=rope.head_dim,
            rotary_percent=rope.partial_rotary_factor,
            rotary_interleaved=rotary_interleaved,
            rotary_base=rope.rope_theta,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self._cache: dict[tuple, torch.Tensor] = {}
        self.applied_in_attention = applied_in_attention
        self.set_rope(rope)

    def set_rope(self, rope: RopeConfig) -> None:
        self.rope = rope
        # megatron code reads inv_freq (e.g. get_cos_sin for inference); keep it meaningful
        self.inv_freq = rope.inv_freq().to(torch.float32)
        self._cache = {}

    def angles(self, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[n, 1, 1, rotary_dim] in megatron's layout (halves repeated, or interleaved)."""
        freqs = self.rope.angles(positions, seq_len=seq_len)
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor | None:
        if self.applied_in_attention:
            return None
        cp_group = cp_group if cp_group is not None else self.cp_group
        cp_size = cp_group.size() if cp_group is not None else 1
        cp_rank = cp_group.rank() if cp_group is not None else 0
        # packed (thd) batches: megatron slices the table per sequence and per CP rank itself
        sliced = cp_size > 1 and not packed_seq
        key = (max_seq_len, offset, sliced, cp_size, cp_rank)
        if key not in self._cache:
            device = compute_device()
            if sliced:
                positions = cp_local_indices(max_seq_len, cp_size, cp_rank).to(device)
            else:
                positions = torch.arange(max_seq_len, device=device)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.angles(positions + offset, seq_len=max_seq_len + offset)
        return self._cache[key]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The RopeConfig as one ShardedObject, saved by the first pipeline stage only.

        Every stage holds this module; megatron's default replica id (0, tp rank, dp rank) would
        make each stage's copy a main replica of the same key, which dist_checkpointing rejects
        under PP > 1 ("Duplicate ShardedObject keys: ['rotary_pos_emb._extra_state/...']").
        """
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        key = f"{prefix}_extra_state"
        replica_id = (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True),
        )
        return {key: make_sharded_object_for_checkpoint(self.get_extra_state(), key, sharded_offsets, replica_id)}

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.rope.angles(torch.arange(max_seq_len, device=compute_device()) + offset)
        return torch.cos(freqs), torch.sin(freqs)
