"""megarope: context-window extension of RoPE models for megatron-core.

``from megarope import RopeConfig`` needs only torch; the megatron-facing names (``from_hf``,
``to_hf``, ``layer_spec``, ``gpt_model``, ``transformer_config``, ``MegaropeRotaryEmbedding``,
``MegaropeCoreAttention``) import megatron-core on first use.
"""

from importlib import import_module

from megarope.rope.config import RopeConfig, RopeConfigError

__version__ = "0.1.0"

_LAZY = {
    "from_hf": "megarope.hf.convert",
    "to_hf": "megarope.hf.convert",
    "layer_spec": "megarope.mcore.spec",
    "gpt_model": "megarope.mcore.spec",
    "transformer_config": "megarope.mcore.spec",
    "install_rope": "megarope.mcore.spec",
    "set_rope": "megarope.mcore.spec",
    "MegaropeRotaryEmbedding": "megarope.mcore.rotary",
    "MegaropeCoreAttention": "megarope.mcore.attention",
}

__all__ = ["RopeConfig", "RopeConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megarope' has no attribute {name!r}")
