"""A context-parallel rank's rotary table holds only its own positions, even at 2,097,152 tokens.

megatron-core's ``RotaryEmbedding`` builds the whole [S, 1, 1, d] table and then slices out the
rank's two chunks: 1 GiB of fp32 at S = 2M, d = 128 (plus a 0.5 GiB half-width temporary) on
every rank, whatever the CP size. ``MegaropeRotaryEmbedding.forward(S, cp_group=...)`` computes
the S/cp rows of the rank's chunks directly. Checked under real gloo CP groups:

- at S = 2M, CP=4: shape [S/cp, 1, 1, d]; rows equal ``RopeConfig.angles`` at exactly
  ``cp_local_indices`` (and, independently of that function, the chunk boundaries sit at the
  positions the load-balanced layout puts there, with float64 angles of the long factors); the
  process's peak RSS grows by the local table and its half-width angles (measured 393 MiB,
  1.54x the 256 MiB table), well under the 1 GiB full table;
- at a small S, for several methods, CP=4 and the same 4 processes as two CP=2 groups: equal to
  the matching rows of the single-process table.
"""

import math
import re

import torch
import torch.distributed as dist
from _launch import run_distributed

from megarope.mcore.context_parallel import cp_local_indices
from megarope.mcore.rotary import MegaropeRotaryEmbedding
from megarope.rope.config import RopeConfig

S = 2_097_152
HEAD_DIM = 128
WINDOW = 4096
FULL_TABLE_BYTES = S * HEAD_DIM * 4  # fp32, what megatron builds on every rank


def _longrope(head_dim: int, window: int, length: int) -> RopeConfig:
    half = head_dim // 2
    scale = length / window
    return RopeConfig(
        rope_type="longrope", head_dim=head_dim, original_max_position_embeddings=window,
        max_position_embeddings=length, n_hat=window // 4,
        long_factor=tuple(1 + (scale - 1) * i / (half - 1) for i in range(half)),
        short_factor=tuple(1 + 0.5 * i / (half - 1) for i in range(half)),
    )


ROPE_2M = _longrope(HEAD_DIM, WINDOW, S)
SMALL_S = 64
SMALL_CASES = [  # (rope, rotary_interleaved)
    (_longrope(16, 16, SMALL_S), False),
    (_longrope(16, 16, SMALL_S), True),
    # inv_freq depends on the sequence length: a rank must use the global one
    (RopeConfig(rope_type="dynamic", head_dim=16, factor=4.0, max_position_embeddings=16), False),
    (RopeConfig(rope_type="yarn", head_dim=16, factor=4.0, original_max_position_embeddings=16), False),
]


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def _check_2m() -> dict:
    group = dist.group.WORLD
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    rotary = MegaropeRotaryEmbedding(ROPE_2M, cp_group=group)
    before = _reset_peak_rss()
    table = rotary.forward(S)
    growth = _peak_rss_since_reset() - before

    local = S // cp
    assert table.shape == (local, 1, 1, HEAD_DIM) and table.dtype == torch.float32
    assert table.nbytes == FULL_TABLE_BYTES // cp
    angles = table[:, 0, 0, : HEAD_DIM // 2]
    assert torch.equal(table[:, 0, 0, HEAD_DIM // 2 :], angles)  # megatron's [freqs, freqs] layout
    assert torch.equal(angles, ROPE_2M.angles(cp_local_indices(S, cp, rank), seq_len=S))

    # The layout by hand: rank r holds chunks r and 2*cp-1-r of S/(2*cp) tokens, in that order.
    chunk = S // (2 * cp)
    rows = torch.tensor([0, chunk - 1, chunk, local - 1])
    positions = torch.tensor([rank * chunk, (rank + 1) * chunk - 1,
                              (2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk - 1])
    inv_freq = ROPE_2M.inv_freq(S)  # float64, long factors (S > window)
    exact = torch.remainder(positions.double()[:, None] * inv_freq + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(angles[rows].double(), exact, rtol=0, atol=1e-6)
    return {"growth": growth, "table_bytes": table.nbytes}


def _check_small(group) -> None:
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    index = cp_local_indices(SMALL_S, cp, rank)
    for rope, interleaved in SMALL_CASES:
        full = MegaropeRotaryEmbedding(rope, rotary_interleaved=interleaved).forward(SMALL_S)
        mine = MegaropeRotaryEmbedding(rope, rotary_interleaved=interleaved).forward(SMALL_S, cp_group=group)
        assert mine.shape == (SMALL_S // cp, 1, 1, 16)
        assert torch.equal(mine, full[index]), (rope.rope_type, interleaved, cp, rank)


def _small_then_2m() -> dict:
    dist.init_process_group("gloo")
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for group in (dist.group.WORLD, pairs[dist.get_rank() // 2]):
            _check_small(group)
        return _check_2m()
    finally:
        dist.destroy_process_group()


def test_cp_rank_builds_only_its_own_rows_at_2m_tokens():
    for r in run_distributed(_small_then_2m, 4):
        # The local table, its half-width angles (0.5x) and float64 chunk temporaries of a bounded
        # size; megatron's forward needs the full table and its half on every rank.
        assert r["growth"] < 1.5 * r["table_bytes"] + 128 * 2**20, r
        assert r["growth"] < 0.5 * FULL_TABLE_BYTES, r
