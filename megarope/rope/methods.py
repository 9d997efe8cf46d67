"""One registry of RoPE methods: name -> small function -> (inv_freq float64, attention_factor).

Each function reads a validated :class:`~megarope.rope.config.RopeConfig` (``rc``) and an
optional current sequence length, in the spirit of transformers' ``ROPE_INIT_FUNCTIONS``.
Frequencies are float64 so that angles stay exact up to 2M positions (see ``positions.py``).
Adding a method means one function and one :func:`register` call here (plus its test): the
:class:`Method` record carries everything ``RopeConfig`` needs besides the math (required fields,
extra checks, the transformers type, keys and aliases); see docs/methods.md, "Adding a method".

This module imports torch only: no megatron, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from megarope.errors import MegaropeError

if TYPE_CHECKING:
    from megarope.rope.config import RopeConfig

InitFn = Callable[["RopeConfig", "int | None"], "tuple[torch.Tensor, float]"]
ValidateFn = Callable[["RopeConfig"], None]
CanonicalFn = Callable[["RopeConfig"], dict[str, Any]]
HfImportFn = Callable[[dict[str, Any], dict[str, Any]], None]


class RopeConfigError(MegaropeError):
    """Invalid RoPE configuration; ``field`` is the RopeConfig field (also importable from
    ``megarope.rope.config``)."""


@dataclass(frozen=True)
class Method:
    """A registered RoPE method: its math (``init``) and what RopeConfig needs to validate,
    import and export it.

    ``required``: RopeConfig fields that must be set. ``validate``: further checks on a
    RopeConfig, run after the generic ones; raises ``RopeConfigError(field, message)``.
    ``canonical``: field values filled in once valid (the form that exports and round-trips).
    ``hf_type``: the transformers ``rope_type`` that computes identical frequencies, or None when
    transformers has no such type (the frequencies are then exported as ``default`` with the
    effective base, and the full RopeConfig under the ``megarope`` key). ``hf_keys``: the
    transformers ``rope_parameters`` keys that type reads, exported when set (``attention_factor``
    is the field ``attention_factor_override``). ``hf_aliases``: other ``rope_type`` / ``type``
    names checkpoints use for the method. ``from_hf``: adjusts the imported field values in place,
    given the checkpoint's raw RoPE parameters (legacy spellings). ``query_scale``: the method
    multiplies queries by a per-position scale (entropy-aware ABF). ``n_hat``: the method keeps
    the first ``n_hat`` positions un-interpolated (LongRoPE); other methods reject ``n_hat``.
    ``window_field``: the RopeConfig field the method reads as the model's ORIGINAL window. Dynamic
    NTK reads ``max_position_embeddings`` (as transformers): whoever derives a RopeConfig for a
    longer target must put the original window there, or scaling never starts below the target.
    """

    init: InitFn
    required: tuple[str, ...] = ()
    validate: ValidateFn | None = None
    canonical: CanonicalFn | None = None
    hf_type: str | None = None
    hf_keys: tuple[str, ...] = ()
    hf_aliases: tuple[str, ...] = ()
    from_hf: HfImportFn | None = None
    query_scale: bool = False
    n_hat: bool = False
    window_field: str = "original_max_position_embeddings"


METHODS: dict[str, Method] = {}


def register(name: str, init: InitFn, **kwargs: Any) -> None:
    """Add (or replace) method ``name``; ``kwargs`` are the other :class:`Method` fields."""
    METHODS[name] = Method(init=init, **kwargs)


def method_name(name: str) -> str:
    """The registry name for a checkpoint's ``rope_type`` spelling (an alias such as ``su``), or
    ``name`` itself when no method claims it (validation then reports it as unknown)."""
    if name in METHODS:
        return name
    return next((key for key, method in METHODS.items() if name in method.hf_aliases), name)


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
    ``seq_len`` > ``original_max_position_embeddings``, else ``short_factor`` (as transformers), or
    the per-length short set ``RopeConfig.length_sets`` holding ``seq_len`` (``RopeConfig.factor_set``).
    Attention factor: ``attention_factor`` or sqrt(1 + ln s / ln L) with s = ``factor`` or
    max_position/original. ``n_hat`` (first positions kept un-interpolated) acts on angles, not
    here: see ``RopeConfig.angles``."""
    factors = torch.tensor(rc.factor_set(seq_len)[0], dtype=torch.float64)
    attention = rc.attention_factor_override
    if attention is None:
        attention = longrope_attention_factor(rc.scale, rc.original_max_position_embeddings)
    return base_inv_freq(rc.rope_theta, rc.rotary_dim) / factors, float(attention)


# ----------------------------------------------------------------------------- method-specific checks
def _check_scale(rc: RopeConfig) -> None:
    """``scale`` needs ``factor`` or a target length beyond the original window (YaRN, LongRoPE)."""
    if rc.factor is not None:
        return
    if rc.max_position_embeddings is None:
        raise RopeConfigError("factor", f"rope_type {rc.rope_type!r} needs factor or max_position_embeddings")
    if rc.max_position_embeddings <= rc.original_max_position_embeddings:
        raise RopeConfigError(
            "original_max_position_embeddings",
            f"original window {rc.original_max_position_embeddings} must be smaller than the target "
            f"length max_position_embeddings={rc.max_position_embeddings}",
        )


def _check_llama3(rc: RopeConfig) -> None:
    if rc.high_freq_factor <= rc.low_freq_factor:
        raise RopeConfigError("high_freq_factor", "must be greater than low_freq_factor")


def _check_eabf(rc: RopeConfig) -> None:
    if rc.original_max_position_embeddings < 2:
        raise RopeConfigError("original_max_position_embeddings", "must be >= 2 (log of the window)")


def _yarn_canonical(rc: RopeConfig) -> dict[str, Any]:
    # transformers' yarn needs `factor` spelled out on export
    return {"factor": rc.scale} if rc.factor is None else {}


EABF_LEGACY_BASE = 500_000.0


def _eabf_from_hf(values: dict[str, Any], params: dict[str, Any]) -> None:
    """The released Entropy-ABF checkpoints say ``{"type": "eabf", "factor": 4}``: their code fixes
    the base to 500,000 and ignores the factor (base and window are fixed)."""
    if params.get("type") == "eabf":
        if "rope_theta" not in params:
            values["rope_theta"] = EABF_LEGACY_BASE
        values.pop("factor", None)


# ----------------------------------------------------------------------------- the registry
_YARN_KEYS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor")
register("default", _default, hf_type="default")
register("linear", _linear, required=("factor",), hf_type="linear", hf_keys=("factor",))
register("ntk", _ntk, required=("factor",))
register(
    "dynamic",
    _dynamic,
    required=("factor", "max_position_embeddings"),
    hf_type="dynamic",
    hf_keys=("factor",),
    window_field="max_position_embeddings",
)
register(
    "yarn",
    _yarn,
    required=("original_max_position_embeddings",),
    validate=_check_scale,
    canonical=_yarn_canonical,
    hf_type="yarn",
    hf_keys=(*_YARN_KEYS, "original_max_position_embeddings"),
)
register(
    "llama3",
    _llama3,
    required=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    validate=_check_llama3,
    hf_type="llama3",
    hf_keys=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
)
register("abf", _default)
register(
    "eabf",
    _default,
    required=("original_max_position_embeddings",),
    validate=_check_eabf,
    from_hf=_eabf_from_hf,
    query_scale=True,
)
register(
    "longrope",
    _longrope,
    required=("long_factor", "short_factor", "original_max_position_embeddings"),
    validate=_check_scale,
    hf_type="longrope",
    hf_keys=("factor", "long_factor", "short_factor", "attention_factor", "original_max_position_embeddings"),
    hf_aliases=("su",),
    n_hat=True,
)
