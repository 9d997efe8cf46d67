"""Per-position quantities: precise rotary angles and the entropy-aware ABF query scale.

fp32 ``position * inv_freq`` is off by up to ~0.125 rad near 2^21 (megatron-core and transformers
both compute it that way). Here the product is taken in float64, reduced modulo 2*pi into
[-pi, pi], and only then cast, so cos/sin stay within ~1e-7 of the exact value at 2M positions.
"""

from __future__ import annotations

import math

import torch

# Bounds the float64 temporary to CHUNK x (d/2) values whatever the number of positions.
CHUNK = 1 << 16


def reduced_angles(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    unscaled_inv_freq: torch.Tensor | None = None,
    n_hat: int = 0,
) -> torch.Tensor:
    """float32 [n, d/2] angles in [-pi, pi] for integer ``positions`` [n].

    Positions below ``n_hat`` use ``unscaled_inv_freq`` (LongRoPE keeps the first n-hat positions
    un-interpolated).
    """
    positions = positions.reshape(-1)
    device = positions.device
    inv_freq = inv_freq.to(device=device, dtype=torch.float64)
    if n_hat:
        unscaled_inv_freq = unscaled_inv_freq.to(device=device, dtype=torch.float64)
    out = torch.empty(positions.numel(), inv_freq.numel(), dtype=torch.float32, device=device)
    for start in range(0, positions.numel(), CHUNK):
        pos = positions[start : start + CHUNK].to(torch.float64)[:, None]
        angle = pos * inv_freq
        if n_hat:
            angle = torch.where(pos < n_hat, pos * unscaled_inv_freq, angle)
        out[start : start + CHUNK] = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    return out


def entropy_query_scale(positions: torch.Tensor, window: int) -> torch.Tensor:
    """max(1, log(i+1)/log(c)) for 0-based positions i and original window c (arXiv 2401.07004,
    sec. 3.2), float32 [n]."""
    scale = torch.log1p(positions.reshape(-1).to(torch.float64)) / math.log(window)
    return scale.clamp(min=1.0).to(torch.float32)
