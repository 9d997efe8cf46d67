"""A few lines to a megatron-core GPT model with megarope inside.

    from megarope import RopeConfig
    from megarope.mcore.spec import transformer_config, gpt_model

    config = transformer_config(num_layers=2, hidden_size=256, num_attention_heads=4)
    rope = RopeConfig(rope_type="yarn", head_dim=64, factor=8.0, original_max_position_embeddings=4096)
    model = gpt_model(config, rope, vocab_size=32000, max_sequence_length=32768)

For your own model: ``layer_spec(rope)`` is megatron's GPT layer spec (Transformer Engine's where
importable, the local one otherwise) with ``MegaropeCoreAttention`` in the ``core_attention``
slot (around TE's attention, or without TE around ``SDPAAttention`` by default or megatron's local
``DotProductAttention`` with ``core_attention="local"``), and ``install_rope(model, rope)`` swaps
``model.rotary_pos_emb`` for ``MegaropeRotaryEmbedding``. Both are needed: the core attention
applies RoPE (rotation, attention factor, entropy-aware query scale: one fused function, compiled
unless ``rope_fusion="eager"``), the rotary keeps the RoPE configuration in checkpoints and tells
megatron's attention not to rotate again.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megarope.mcore.attention import MegaropeCoreAttention, SDPAAttention
from megarope.mcore.rotary import CosSinCache, MegaropeRotaryEmbedding
from megarope.rope.config import RopeConfig
from megarope.rope.fused import check_fusion, compile_works


def te_available() -> bool:
    """Transformer Engine is GPU-only; its spec is used when it imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


CORE_ATTENTIONS = ("sdpa", "local")


def layer_spec(rope: RopeConfig, use_te: bool | None = None, normalization: str = "RMSNorm",
               qk_layernorm: bool = False, core_attention: str = "sdpa", rope_fusion: str = "compile") -> ModuleSpec:
    """megatron's GPT layer spec with megarope's core attention wrapped around the original one.

    ``core_attention`` picks the kernel of the non-TE spec: ``"sdpa"`` (``SDPAAttention``, torch's
    scaled_dot_product_attention, memory linear in length) or ``"local"`` (megatron's
    DotProductAttention, which materialises the scores: the plain reference). With TE, TE's
    attention is used either way. ``rope_fusion`` as in :func:`wrap_core_attention`.
    """
    if core_attention not in CORE_ATTENTIONS:
        raise ValueError(f"core_attention must be one of {CORE_ATTENTIONS}, got {core_attention!r}")
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
        if core_attention == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    return wrap_core_attention(spec, rope, rope_fusion)


def wrap_core_attention(spec: ModuleSpec, rope: RopeConfig, rope_fusion: str = "compile") -> ModuleSpec:
    """A copy of a layer spec whose core attention is ``MegaropeCoreAttention`` around the original.

    ``rope_fusion``: ``"compile"`` (the fused RoPE through ``torch.compile``, falling back to eager
    if compilation fails; 7-54x megatron's unfused RoPE plus scale passes on a loaded 2-core CPU,
    see benchmarks/RESULTS.md) or ``"eager"`` (the same function in plain torch).
    """
    check_fusion(rope_fusion)
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    inner = attention.core_attention
    inner_cls = inner.module if isinstance(inner, ModuleSpec) else inner
    # one cos/sin cache for every layer built from this spec: the tables are computed once per shape
    attention.core_attention = ModuleSpec(module=MegaropeCoreAttention, params={
        "rope": rope, "inner": inner_cls, "tables": CosSinCache(), "rope_fusion": rope_fusion})
    return spec


def activation_fusion(rope_fusion: str) -> dict:
    """The TransformerConfig setting that goes with ``rope_fusion``: under ``"compile"`` megatron's
    own SwiGLU fusion (``bias_activation_fusion``: silu(gate) * up in one pass, torch.compile'd by
    megatron.core.jit) is on too, where ``torch.compile`` works at all (megatron has no eager
    fallback for it). On a 2-core CPU it takes 3-5% off a forward of SmolLM2-135M at 4k-8k tokens
    (9.50 -> 9.03 s at 4k), outputs bitwise equal. Explicit config overrides win."""
    check_fusion(rope_fusion)
    return {"bias_activation_fusion": rope_fusion == "compile" and compile_works()}


def transformer_config(**kwargs) -> TransformerConfig:
    """TransformerConfig with Llama-style defaults (RMSNorm, SwiGLU, no biases) and, without a GPU,
    the fused CUDA kernels turned off. Every field can be overridden."""
    defaults = dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
    )
    if not torch.cuda.is_available():
        defaults.update(
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
        )
    return TransformerConfig(**{**defaults, **kwargs})


def install_rope(model: GPTModel, rope: RopeConfig) -> GPTModel:
    """Replace ``model.rotary_pos_emb`` (megatron's RotaryEmbedding) with megarope's: it hands megatron
    no angle table where megarope's core attention applies RoPE, the angles otherwise."""
    config = model.config
    if rope.head_dim != config.kv_channels:
        raise ValueError(f"rope.head_dim={rope.head_dim} differs from the model's kv_channels={config.kv_channels}")
    pg = getattr(model, "pg_collection", None)
    cp_group = getattr(pg, "cp", None) if pg is not None else None
    in_attention = any(isinstance(m, MegaropeCoreAttention) for m in model.modules())
    model.rotary_pos_emb = MegaropeRotaryEmbedding(rope, rotary_interleaved=config.rotary_interleaved, cp_group=cp_group,
                                                   applied_in_attention=in_attention)
    return model


def gpt_model(config: TransformerConfig, rope: RopeConfig, vocab_size: int, max_sequence_length: int | None = None,
              spec: ModuleSpec | None = None, pre_process: bool | None = None, post_process: bool | None = None,
              share_embeddings_and_output_weights: bool = False, core_attention: str = "sdpa",
              rope_fusion: str = "compile", **kwargs) -> GPTModel:
    """A megatron-core GPTModel with megarope's rotary embedding and core attention (this pipeline
    stage's layers only, as GPTModel itself does); ``core_attention`` and ``rope_fusion`` as in
    :func:`layer_spec`, used when ``spec`` is not given."""
    if config.kv_channels is not None and rope.head_dim != config.kv_channels:
        raise ValueError(f"rope.head_dim={rope.head_dim} differs from the model's kv_channels={config.kv_channels}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec if spec is not None else layer_spec(rope, core_attention=core_attention,
                                                                         rope_fusion=rope_fusion),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length or rope.max_position_embeddings or 4096,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=rope.partial_rotary_factor,
        rotary_base=int(rope.rope_theta),
        **kwargs,
    )
    return install_rope(model, rope)


def rope_of(model: torch.nn.Module) -> RopeConfig:
    """The RopeConfig a megarope model currently uses (e.g. after loading a checkpoint)."""
    inner = model
    while not hasattr(inner, "rotary_pos_emb") and hasattr(inner, "module"):
        inner = inner.module
    return inner.rotary_pos_emb.rope


def set_rope(model: torch.nn.Module, rope: RopeConfig) -> None:
    """Switch every megarope module of ``model`` to ``rope`` (e.g. a new LongRoPE candidate)."""
    for module in model.modules():
        if isinstance(module, (MegaropeRotaryEmbedding, MegaropeCoreAttention)):
            module.set_rope(rope)


__all__ = ["CORE_ATTENTIONS", "activation_fusion", "layer_spec", "wrap_core_attention", "transformer_config",
           "install_rope", "gpt_model", "rope_of", "set_rope", "te_available"]
