"""RopeConfig: a validated RoPE method and its parameters, with Hugging Face import/export.

Reads both spellings real checkpoints carry: transformers v4 (``rope_theta`` + ``rope_scaling``
with ``type`` or ``rope_type``) and v5 (``rope_parameters`` with ``rope_theta`` inside), the
legacy ``su`` name of LongRoPE, Phi-3's top-level ``original_max_position_embeddings`` and the
Entropy-ABF checkpoints' ``{"type": "eabf", "factor": 4}`` (whose released code fixes the base to
500,000).

Export writes the transformers keys that give the same frequencies in vanilla transformers. What
transformers cannot express (ntk, abf, eabf, LongRoPE's n-hat) goes, in addition, under the
top-level ``megarope`` key so that ``from_hf(to_hf())`` round-trips; ``from_hf`` prefers it.
LongRoPE's per-length short sets (``length_sets``, the paper's 4k and 8k re-searches) are such a
part: transformers' ``longrope`` has one short set, so the export's ``short_factor`` is the set of
the original window and the others live under ``megarope`` only.
Entropy-aware ABF's query scale has no transformers equivalent: vanilla transformers loading the
export gets the right base but not the per-position query scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from megarope import fields
from megarope.rope.methods import METHODS, Method, RopeConfigError, base_inv_freq, method_name
from megarope.rope.positions import entropy_query_scale, reduced_angles

__all__ = ["EXTRA_KEY", "RopeConfig", "RopeConfigError", "method_table"]

EXTRA_KEY = "megarope"
# transformers rope_parameters keys read into RopeConfig fields of the same name (and exported
# back, per method, as its Method.hf_keys say)
_HF_PASSTHROUGH = (
    "factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "low_freq_factor",
    "high_freq_factor",
    "long_factor",
    "short_factor",
)
# transformers key -> RopeConfig field, where the names differ
_HF_FIELD = {"attention_factor": "attention_factor_override"}


@dataclass(frozen=True)
class RopeConfig:
    """A RoPE method (``rope_type``, a key of ``megarope.rope.methods.METHODS``) and its parameters.

    Field names follow transformers' ``rope_parameters`` keys, plus ``n_hat`` (LongRoPE's
    un-interpolated first positions) and ``unscaled_layers`` (entropy-aware ABF: how many first
    layers keep an unscaled query). ``attention_factor_override`` is transformers'
    ``attention_factor`` key (the name ``attention_factor`` is the method computing the value).

    ``n_hat_attention_factor``: whether LongRoPE's first n̂ positions carry the attention factor
    too (True, megarope's default: the paper keeps only their rotation original, and transformers
    applies the factor everywhere) or keep the original, unscaled cos/sin (False: the reference
    code's ``LongRoPEScaledRotaryEmbedding``).

    LongRoPE short-context sets: ``short_n_hat`` is n̂ for inputs within the original window (None:
    ``n_hat``); ``length_sets`` are ``(max_length, n_hat, factors)`` re-searched per length (paper
    §3.3): an input of length L uses the first set with L <= max_length (ascending), the long set
    past them all (:meth:`factor_set`).
    """

    rope_type: str = "default"
    head_dim: int = 128
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int | None = None
    original_max_position_embeddings: int | None = None
    factor: float | None = None
    attention_factor_override: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    long_factor: tuple[float, ...] | None = None
    short_factor: tuple[float, ...] | None = None
    n_hat: int = 0
    unscaled_layers: int = 2
    n_hat_attention_factor: bool = True
    short_n_hat: int | None = None
    length_sets: tuple[tuple[int, int, tuple[float, ...]], ...] | None = None

    def __post_init__(self):
        for name in ("long_factor", "short_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.length_sets is not None:  # JSON and YAML give lists
            sets = []
            for entry in self.length_sets:
                if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                    raise RopeConfigError("length_sets", f"entries are [max_length, n_hat, factors], got {entry!r}")
                sets.append((entry[0], entry[1], tuple(float(v) for v in entry[2])))
            object.__setattr__(self, "length_sets", tuple(sets))
        self._validate()
        if self.method.canonical is not None:
            for name, value in self.method.canonical(self).items():
                object.__setattr__(self, name, value)

    # ----------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        """Checks every method shares, then the method's own (``Method.validate``)."""
        if self.rope_type not in METHODS:
            raise RopeConfigError("rope_type", f"unknown method {self.rope_type!r}; known: {sorted(METHODS)}")
        _check_int(self.head_dim, "head_dim", minimum=1)
        if not 0 < self.partial_rotary_factor <= 1:
            raise RopeConfigError("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise RopeConfigError(
                "head_dim", f"rotary dim head_dim*partial_rotary_factor={self.rotary_dim} must be even and >= 2"
            )
        for name in self.method.required:
            if getattr(self, name) is None:
                raise RopeConfigError(name, f"required by rope_type {self.rope_type!r} but missing")
        if self.rope_theta <= 1:
            raise RopeConfigError("rope_theta", f"must be > 1, got {self.rope_theta}")
        if self.factor is not None and self.factor < 1:
            raise RopeConfigError("factor", f"must be >= 1, got {self.factor}")
        for name in ("max_position_embeddings", "original_max_position_embeddings"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, minimum=1)
        original, extended = self.original_max_position_embeddings, self.max_position_embeddings
        if original is not None and extended is not None and original > extended:
            raise RopeConfigError("original_max_position_embeddings", f"{original} exceeds max_position_embeddings="
                                  f"{extended}: the extended window must contain the original one")
        for name in ("long_factor", "short_factor"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.rotary_dim // 2:
                raise RopeConfigError(
                    name, f"needs rotary_dim/2 = {self.rotary_dim // 2} entries (one per frequency), got {len(values)}"
                )
            bad = [i for i, v in enumerate(values) if not v > 0]
            if bad:
                raise RopeConfigError(name, f"entries must be > 0, got {values[bad[0]]} at index {bad[0]}")
        _check_int(self.n_hat, "n_hat", minimum=0)
        if self.n_hat and not self.method.n_hat:
            users = " or ".join(repr(name) for name, method in METHODS.items() if method.n_hat)
            raise RopeConfigError("n_hat", f"only used by rope_type {users}, got {self.rope_type!r}")
        _check_int(self.unscaled_layers, "unscaled_layers", minimum=0)
        self._validate_length_sets()
        if self.method.validate is not None:
            self.method.validate(self)

    def _validate_length_sets(self) -> None:
        if self.short_n_hat is None and self.length_sets is None and self.n_hat_attention_factor:
            return
        if not self.method.n_hat:
            field = "short_n_hat" if self.short_n_hat is not None else \
                "length_sets" if self.length_sets is not None else "n_hat_attention_factor"
            raise RopeConfigError(field, f"LongRoPE short-context sets; rope_type is {self.rope_type!r}")
        if self.short_n_hat is not None:
            _check_int(self.short_n_hat, "short_n_hat", minimum=0)
        lengths = []
        for max_length, n_hat, factors in self.length_sets or ():
            _check_int(max_length, "length_sets", minimum=1)
            _check_int(n_hat, "length_sets", minimum=0)
            if len(factors) != self.rotary_dim // 2 or not all(v > 0 for v in factors):
                raise RopeConfigError("length_sets", f"each set needs rotary_dim/2 = {self.rotary_dim // 2} "
                                      "positive factors")
            lengths.append(max_length)
        if lengths != sorted(set(lengths)):
            raise RopeConfigError("length_sets", f"max lengths must be distinct and ascending, got {lengths}")

    # ----------------------------------------------------------------------------- derived values
    def factor_set(self, seq_len: int | None) -> tuple[tuple[float, ...], int]:
        """LongRoPE's (factors, n̂) for an input of ``seq_len`` tokens: the first length set that
        holds it, else the long set past the original window (as transformers), else the short set."""
        for max_length, n_hat, factors in self.length_sets or ():
            if seq_len is not None and seq_len <= max_length:
                return factors, n_hat
        if seq_len is not None and seq_len > self.original_max_position_embeddings:
            return self.long_factor, self.n_hat
        return self.short_factor, self.n_hat if self.short_n_hat is None else self.short_n_hat

    @property
    def method(self) -> Method:
        """The registry record of ``rope_type``."""
        return METHODS[self.rope_type]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def scale(self) -> float:
        """Extension ratio s: ``factor``, or max_position/original (Phi-3, DeepSeek convention)."""
        if self.factor is not None:
            return float(self.factor)
        return self.max_position_embeddings / self.original_max_position_embeddings

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        """float64 [rotary_dim // 2]; ``seq_len`` selects LongRoPE's long/short set and dynamic NTK's base."""
        return self.method.init(self, seq_len)[0]

    def attention_factor(self, seq_len: int | None = None) -> float:
        """cos/sin multiplier (transformers' attention_factor, megatron's mscale)."""
        return self.method.init(self, seq_len)[1]

    def angles(self, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """float32 [n, rotary_dim // 2] in [-pi, pi]. ``seq_len`` defaults to max(positions)+1, as
        transformers decides per forward; pass the global length where positions are a shard
        (context parallelism)."""
        if seq_len is None:
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
        n_hat = self.factor_set(seq_len)[1] if self.method.n_hat else 0
        unscaled = base_inv_freq(self.rope_theta, self.rotary_dim) if n_hat else None
        return reduced_angles(positions, self.inv_freq(seq_len), unscaled_inv_freq=unscaled, n_hat=n_hat)

    def position_attention_factor(self, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """float64 [n]: the attention factor the cos/sin of each position carry: ``attention_factor``
        everywhere, or 1 at the first n̂ positions with ``n_hat_attention_factor`` False."""
        positions = positions.reshape(-1)
        out = torch.full((positions.numel(),), self.attention_factor(seq_len), dtype=torch.float64,
                         device=positions.device)
        if self.method.n_hat and not self.n_hat_attention_factor:
            out[positions < self.factor_set(seq_len)[1]] = 1.0
        return out

    def query_scale(self, positions: torch.Tensor, layer_number: int) -> torch.Tensor:
        """float32 [n] query multiplier; ``layer_number`` is 1-based as in megatron. Ones unless
        the method scales queries and the layer is past the first ``unscaled_layers``."""
        if self.method.query_scale and layer_number > self.unscaled_layers:
            return entropy_query_scale(positions, self.original_max_position_embeddings)
        return torch.ones(positions.numel(), dtype=torch.float32, device=positions.device)

    @property
    def has_query_scale(self) -> bool:
        return self.method.query_scale

    def replace(self, **changes: Any) -> RopeConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- dict forms
    def to_dict(self) -> dict[str, Any]:
        """Non-default fields, JSON-ready (lists for factor sets)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default or f.name in ("rope_type", "head_dim", "rope_theta"):
                if f.name == "length_sets":
                    value = [[length, n_hat, list(factors)] for length, n_hat, factors in value]
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RopeConfig:
        return fields.from_dict(cls, values, RopeConfigError)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> RopeConfig:
        """From a config.json dict (transformers v4 or v5 style)."""
        params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise RopeConfigError("rope_parameters", "per-layer-type (nested) RoPE parameters are not supported")
        rope_type = method_name(params.get("rope_type") or params.get("type") or "default")
        method = METHODS.get(rope_type)
        head_dim = config.get("head_dim")
        if head_dim is None:
            if "hidden_size" not in config or "num_attention_heads" not in config:
                raise RopeConfigError("head_dim", "missing (and no hidden_size / num_attention_heads to derive it)")
            head_dim = config["hidden_size"] // config["num_attention_heads"]
        max_pos = config.get("max_position_embeddings")
        # transformers gives Phi-3's top-level value priority, then defaults to the model window
        original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        if original is None and method is not None and "original_max_position_embeddings" in method.required:
            original = max_pos
        values: dict[str, Any] = {
            "rope_type": rope_type,
            "head_dim": head_dim,
            "rope_theta": float(params.get("rope_theta", config.get("rope_theta", 10_000.0))),
            "partial_rotary_factor": params.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0,
            "max_position_embeddings": max_pos,
            "original_max_position_embeddings": original,
            "attention_factor_override": params.get("attention_factor"),
        }
        for key in _HF_PASSTHROUGH:
            if params.get(key) is not None:
                values[key] = params[key]
        if method is not None and method.from_hf is not None:
            method.from_hf(values, params)
        values.update(config.get(EXTRA_KEY) or {})
        return cls.from_dict(values)

    def to_hf(self) -> dict[str, Any]:
        """Keys to merge into a config.json (v5 ``rope_parameters`` plus v4 ``rope_theta`` /
        ``rope_scaling``); vanilla transformers loading them computes the same frequencies. The
        full RopeConfig goes under the ``megarope`` key too where those keys lose part of it."""
        hf_type = self.method.hf_type
        params: dict[str, Any] = {"rope_type": hf_type or "default", "rope_theta": self.rope_theta}
        if hf_type is None:
            # same frequencies expressed as a plain base: exact for ntk/abf/eabf, whose inv_freq is base^(-2i/d)
            params["rope_theta"] = self._effective_base()
        for key in self.method.hf_keys:
            value = getattr(self, _HF_FIELD.get(key, key))
            if value is not None:
                params[key] = list(value) if isinstance(value, tuple) else value
        if self.partial_rotary_factor != 1.0:
            params["partial_rotary_factor"] = self.partial_rotary_factor
        out: dict[str, Any] = {
            "head_dim": self.head_dim,
            "rope_theta": params["rope_theta"],
            "rope_parameters": params,
            "rope_scaling": None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"},
        }
        if self.max_position_embeddings is not None:
            out["max_position_embeddings"] = self.max_position_embeddings
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if RopeConfig.from_hf(out) != self:  # e.g. ntk/abf/eabf (no transformers type), LongRoPE's n_hat
            out[EXTRA_KEY] = self.to_dict()
        return out

    def _effective_base(self) -> float:
        inv = self.inv_freq()
        # inv[1] = base^(-2/d) for a plain-base method
        return float(inv[1] ** (-self.rotary_dim / 2))

    def describe(self) -> str:
        """One line for logs and tables."""
        keys = {k: v for k, v in self.to_dict().items() if k not in ("long_factor", "short_factor", "length_sets")}
        return ", ".join(f"{k}={v}" for k, v in keys.items())


def _check_int(value: Any, field: str, minimum: int) -> None:
    fields.check_int(value, field, minimum, RopeConfigError)


def method_table(rc_by_name: dict[str, RopeConfig], lengths: list[int]) -> str:
    """Markdown table: attention factor and the lowest/highest wavelength (in tokens) per length."""
    rows = ["| method | parameters | length | attention factor | shortest wavelength | longest wavelength |", "|---|---|---|---|---|---|"]
    for name, rc in rc_by_name.items():
        for length in lengths:
            wavelengths = 2 * math.pi / rc.inv_freq(length)
            rows.append(
                f"| {name} | {rc.describe()} | {length} | {rc.attention_factor(length):.4f} | "
                f"{wavelengths.min().item():.1f} | {wavelengths.max().item():.0f} |"
            )
    return "\n".join(rows)
