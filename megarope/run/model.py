"""The run's model: a Hugging Face checkpoint (``model.path``) or the built-in tiny Llama-style
model, described once as a transformers ``LlamaConfig`` (:func:`tiny_hf_config`) that both the
build and the export read."""

from __future__ import annotations

import torch

from megarope.hf.convert import build_from_hf, transformer_config_from_hf
from megarope.mcore.spec import activation_fusion, gpt_model
from megarope.mcore.weights import initial_weights, load_full_weights, mask_padded_logits, padded_vocab
from megarope.rope.config import RopeConfig
from megarope.run.config import Config


def use_bf16(cfg: Config) -> bool:
    return torch.cuda.is_available() if cfg.train.bf16 is None else cfg.train.bf16


def tiny_hf_config(cfg: Config, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None):
    """The tiny model of ``cfg.model`` as a transformers config (vocabulary padded to a multiple of
    128 whatever the layout, see :func:`megarope.mcore.weights.padded_vocab`)."""
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(vocab_size=padded_vocab(vocab_size), hidden_size=m.hidden_size,
                       intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                       head_dim=m.hidden_size // m.num_attention_heads, max_position_embeddings=m.window,
                       rope_theta=m.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=bos_id, eos_token_id=eos_id)


def build_model(cfg: Config, rope: RopeConfig, vocab_size: int):
    """GPTModel (this pipeline stage) with megarope layers: the HF checkpoint with its weights, or
    the tiny model freshly initialised from ``train.seed`` the same way in every layout (its
    padding ids masked out of the logits). Call under an initialised parallel state."""
    precision = dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16) if use_bf16(cfg) else \
        dict(params_dtype=torch.float32, pipeline_dtype=torch.float32)
    if cfg.model.path:
        return build_from_hf(cfg.model.path, rope, core_attention=cfg.model.core_attention,
                             rope_fusion=cfg.model.rope_fusion, sequence_parallel=cfg.parallel.sp, **precision)
    hf = tiny_hf_config(cfg, vocab_size)
    tconfig = transformer_config_from_hf(hf, init_method_std=cfg.model.init_std, sequence_parallel=cfg.parallel.sp,
                                         **activation_fusion(cfg.model.rope_fusion), **precision)
    # positions are the RoPE's business (megarope's tables have no fixed length): no cap from the window
    model = gpt_model(tconfig, rope, vocab_size=hf.vocab_size, max_sequence_length=1 << 22,
                      core_attention=cfg.model.core_attention, rope_fusion=cfg.model.rope_fusion)
    load_full_weights(model, initial_weights(model, cfg.train.seed, cfg.model.init_std))
    mask_padded_logits(model, vocab_size)
    return model
