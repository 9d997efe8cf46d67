"""One registry of RoPE methods: name -> small function -> (inv_freq float64, attention_factor).

Each function reads a validated :class:`~megarope.rope.config.RopeConfig` (``rc``) and an
optional current sequence length, in the spirit of transformers' ``ROPE_INIT_FUNCTIONS``.
Frequencies are float64 so that angles stay exact up to 2M positions (see ``positions.py``).
Adding a method means adding one function here (plus its test); nothing else changes.

This module imports torch only: no megatron, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from megarope.rope.config import RopeConfig

InitFn = Callable[["RopeConfig", "int | None"], "tuple[torch.Tensor, float]"]


@dataclass(frozen=True)
class Method:
    """A registered RoPE method.

    ``required``: RopeConfig fields that must be set. ``hf_type``: the transformers ``rope_type``
    that computes identical frequencies, or None when transformers has no such type (the
    frequencies are then exported as ``default`` with the effective base). ``query_scale``: the
    method multiplies queries by a per-position scale (entropy-aware ABF).
    """

    init: InitFn
    required: tuple[str, ...] = ()
    hf_type: str | None = None
    query_scale: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, init: InitFn, **kwargs) -> None:
    METHODS[name] = Method(init=init, **kwargs)


def base_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies base^(-2i/d), i < d/2, in float64."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return torch.pow(torch.tensor(float(base), dtype=torch.float64), -exponent)


def _default(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Reads ``rope_theta``, ``rotary_dim``. Also serves ``abf`` and ``eabf``, whose new base is
    simply ``rope_theta`` (ABF: arXiv 2309.16039; entropy-aware ABF: arXiv 2401.07004)."""
    return base_inv_freq(rc.rope_theta, rc.rotary_dim), 1.0


def _linear(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Position interpolation (arXiv 2306.15595). Reads ``factor``."""
    return base_inv_freq(rc.rope_theta, rc.rotary_dim) / rc.factor, 1.0


def _ntk_base(base: float, factor: float, rotary_dim: int) -> float:
    return base * factor ** (rotary_dim / (rotary_dim - 2))


def _ntk(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """NTK-aware base change: base * s^(d/(d-2)). Reads ``factor``."""
    return base_inv_freq(_ntk_base(rc.rope_theta, rc.factor, rc.rotary_dim), rc.rotary_dim), 1.0


def _dynamic(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK, as transformers: the window is ``max_position_embeddings`` and the NTK factor
    grows with the current length. Reads ``factor``, ``max_position_embeddings``."""
    window = rc.max_position_embeddings
    length = max(seq_len or window, window)
    effective = rc.factor * length / window - (rc.factor - 1)
    return base_inv_freq(_ntk_base(rc.rope_theta, effective, rc.rotary_dim), rc.rotary_dim), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071). Reads ``factor`` (default max_position/original), ``beta_fast``
    (32), ``beta_slow`` (1), ``truncate`` (True), ``attention_factor``, ``mscale``,
    ``mscale_all_dim``, ``original_max_position_embeddings``."""
    dim, base, window = rc.rotary_dim, rc.rope_theta, rc.original_max_position_embeddings
    factor = rc.scale
    attention = rc.attention_factor_override
    if attention is None:
        if rc.mscale and rc.mscale_all_dim:
            attention = yarn_mscale(factor, rc.mscale) / yarn_mscale(factor, rc.mscale_all_dim)
        else:
            attention = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(window / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rc.beta_fast or 32), correction_dim(rc.beta_slow or 1)
    if rc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = base_inv_freq(base, dim)
    # ramp 0 keeps the original (extrapolated) frequency, ramp 1 fully interpolates by `factor`
    inv_freq = extrapolation * (1 - ramp) + extrapolation / factor * ramp
    return inv_freq, float(attention)


def _llama3(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Llama-3.1 band-wise scaling. Reads ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``."""
    inv_freq = base_inv_freq(rc.rope_theta, rc.rotary_dim)
    window = rc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = window / rc.low_freq_factor, window / rc.high_freq_factor
    smooth = (window / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / rc.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / rc.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out), 1.0


def longrope_attention_factor(scale: float, window: int) -> float:
    """sqrt(1 + ln s / ln L), 1 for s <= 1 (LongRoPE / Phi-3)."""
    return 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(window))


def _longrope(rc: RopeConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE (arXiv 2402.13753): inv_freq_i = base^(-2i/d) / lambda_i with ``long_factor`` when
    ``seq_len`` > ``original_max_position_embeddings``, else ``short_factor`` (as transformers).
    Attention factor: ``attention_factor`` or sqrt(1 + ln s / ln L) with s = ``factor`` or
    max_position/original. ``n_hat`` (first positions kept un-interpolated) acts on angles, not
    here: see ``RopeConfig.angles``."""
    long = seq_len is not None and seq_len > rc.original_max_position_embeddings
    factors = torch.tensor(rc.long_factor if long else rc.short_factor, dtype=torch.float64)
    attention = rc.attention_factor_override
    if attention is None:
        attention = longrope_attention_factor(rc.scale, rc.original_max_position_embeddings)
    return base_inv_freq(rc.rope_theta, rc.rotary_dim) / factors, float(attention)


register("default", _default, hf_type="default")
register("linear", _linear, required=("factor",), hf_type="linear")
register("ntk", _ntk, required=("factor",))
register("dynamic", _dynamic, required=("factor", "max_position_embeddings"), hf_type="dynamic")
register("yarn", _yarn, required=("original_max_position_embeddings",), hf_type="yarn")
register(
    "llama3",
    _llama3,
    required=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    hf_type="llama3",
)
register("abf", _default)
register("eabf", _default, required=("original_max_position_embeddings",), query_scale=True)
register(
    "longrope",
    _longrope,
    required=("long_factor", "short_factor", "original_max_position_embeddings"),
    hf_type="longrope",
)
