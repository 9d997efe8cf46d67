"""megarope: context-window extension of RoPE models for megatron-core.

``from megarope import RopeConfig`` needs only torch; the megatron-facing names are imported on
first use so that the method core stays usable without megatron-core.
"""

from megarope.rope.config import RopeConfig, RopeConfigError

__all__ = ["RopeConfig", "RopeConfigError"]
__version__ = "0.1.0"
