"""RoPE applied in one expression: rotate q and k, RoPE attention factor, per-position query scale.

megatron's ``apply_rotary_pos_emb`` recomputes cos/sin from the angle table for every call (q and
k of every layer), builds the rotated half with cat/neg, and megarope then multiplied q (and, for
LongRoPE's per-position factor, k) by its scales in further passes. :func:`rope_qk` is the same
math written once: the scales fold into the small [tokens, rotary_dim/2] cos/sin tables, so the big
q/k tensors are read and written once. It is the reference in plain torch; :func:`rope_function`
returns it as is (``"eager"``) or through ``torch.compile`` (``"compile"``: one generated kernel,
Triton on GPU, C++ on CPU), falling back to the plain function, with one log line, when
compilation is unavailable or fails.

This module imports torch only.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

ROPE_FUSIONS = ("compile", "eager")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_scale: torch.Tensor,
            pass_scale: torch.Tensor | None, interleaved: bool) -> torch.Tensor:
    half = cos.shape[-1]
    # [tokens, 1, ..., 1, half]: broadcast over every dim between tokens and the head dim
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c = (cos * rot_scale[:, None]).to(x.dtype).view(shape)
    s = (sin * rot_scale[:, None]).to(x.dtype).view(shape)
    if interleaved:  # pairs (2i, 2i+1) rotate together (megatron's rotary_interleaved)
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:  # dims i and i + half rotate together (rotate-half, the Llama layout)
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    if 2 * half == x.shape[-1]:
        return rotated
    rest = x[..., 2 * half :]
    if pass_scale is not None:
        rest = rest * pass_scale.to(x.dtype).view(shape[:-1] + (1,))
    return torch.cat((rotated, rest), dim=-1)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_rot: torch.Tensor,
            q_pass: torch.Tensor, k_rot: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated and scaled (q, k).

    q [tokens, ..., heads, d] and k [tokens, ..., heads_kv, d] (megatron's sbhd, or thd); cos/sin
    [tokens, r/2] float32 of the angles of the first r <= d dims (partial rotary leaves the rest
    unrotated); q_rot, q_pass, k_rot [tokens] float32: the multipliers of q's rotated dims, q's
    other dims and k's rotated dims (k's other dims are left as they are). The result equals
    megatron's ``apply_rotary_pos_emb`` followed by those multiplications, computed in q's dtype.
    """
    # the query scale multiplies the whole query: on the rotated dims it is part of q_rot
    return _rotate(q, cos, sin, q_rot, q_pass, interleaved), _rotate(k, cos, sin, k_rot, None, interleaved)


class _CompiledRope:
    """``torch.compile(rope_qk)``, built at the first call; the plain function once that fails.

    Compiled with dynamic shapes: evaluations at many lengths reuse one kernel instead of
    recompiling per length (a compile costs seconds on CPU).
    """

    def __init__(self) -> None:
        self.compiled = None
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(rope_qk, dynamic=True)
                return self.compiled(*args, **kwargs)
            except Exception as err:  # no C++ compiler / Triton, or an inductor bug: plain torch works
                self.failed = True
                log.warning("torch.compile of the fused RoPE failed (%s: %s); using the eager version",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return rope_qk(*args, **kwargs)


_COMPILED = _CompiledRope()


def check_fusion(fusion: str) -> None:
    """ValueError naming ``rope_fusion`` unless ``fusion`` is one of :data:`ROPE_FUSIONS`."""
    if fusion not in ROPE_FUSIONS:
        raise ValueError(f"rope_fusion must be one of {ROPE_FUSIONS}, got {fusion!r}")


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@functools.cache
def compile_works() -> bool:
    """Whether ``torch.compile`` builds kernels in this process (inductor needs a C++ compiler for CPU
    tensors, Triton for CUDA ones): one tiny probe, once per process, one log line where it fails.
    For fusions without a fallback of their own (megatron's compiled SwiGLU)."""
    try:
        torch.compile(_double)(torch.ones(2, device="cuda" if torch.cuda.is_available() else "cpu"))
        return True
    except Exception as err:
        log.warning("torch.compile cannot build kernels here (%s: %s); compiled fusions stay off",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False


def rope_function(fusion: str):
    """:func:`rope_qk` for ``fusion`` ``"eager"``, its compiled form (shared by the whole process,
    so it compiles once) for ``"compile"``."""
    check_fusion(fusion)
    return _COMPILED if fusion == "compile" else rope_qk


__all__ = ["ROPE_FUSIONS", "check_fusion", "compile_works", "rope_function", "rope_qk"]
