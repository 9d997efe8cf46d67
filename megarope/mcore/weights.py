"""Full (layout-free) weights <-> this rank's TP shard and PP stage of a megarope GPTModel.

The full state is named as Hugging Face Llama names it (``embed_tokens.weight``,
``layers.{i}.self_attn.q_proj.weight``, ... without the ``model.`` prefix, layer numbers global):
one naming for imported checkpoints and for freshly initialised models alike. Cutting shards and
stages from it in one place is what makes every TP/PP/CP/DP layout hold the same model:
- :func:`load_full_weights` copies full tensors into this rank's part (used by ``from_hf``);
- :func:`initial_weights` draws a fresh full state, each tensor from a generator seeded by the
  run seed and its global name, so no draw depends on which rank draws or what it drew before
  (megatron's own init draws per TP rank, per stage, in module order).

Weight layout differences handled here:
- megatron fuses q/k/v into ``linear_qkv`` grouped per KV head: for each query group, its query
  heads, then its key head, then its value head;
- megatron fuses gate and up projections into ``linear_fc1`` as [gate; up] (its GLU applies the
  activation to the first half);
- with the Transformer Engine spec the norms live inside the fused linear layers
  (``layer_norm_weight``); with the local spec they are separate modules. Both are recognised.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state

VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Vocabulary rounded up to ``multiple``: fixed by the tokenizer alone, not by TP, so every
    layout has the same embedding (a TP size dividing ``multiple`` splits it evenly)."""
    return math.ceil(vocab_size / multiple) * multiple


def mask_padded_logits(model, vocab_size: int) -> None:
    """Logits of the padding ids (>= ``vocab_size``) become -inf on the last stage's output layer,
    so the loss, perplexities and argmax see only real tokens whatever the padding (their
    weights then get no gradient either). ``model.real_vocab_size`` records it for the chunked
    evaluation (:func:`megarope.mcore.output.token_nll_and_argmax`), which bypasses the layer."""
    layer = getattr(model, "output_layer", None)
    if layer is None or vocab_size >= model.vocab_size:
        return
    model.real_vocab_size = vocab_size

    def hook(module, args, output):
        logits, bias = output
        if logits.shape[-1] == model.vocab_size:  # gathered over TP (``runtime_gather_output``)
            return _mask_from(logits, 0, vocab_size), bias
        return mask_vocab_shard(model, logits), bias

    layer.register_forward_hook(hook)


def _mask_from(logits: torch.Tensor, first: int, vocab_size: int) -> torch.Tensor:
    ids = torch.arange(first, first + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def mask_vocab_shard(model, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., vocab/tp] of this TP rank with the padding ids at -inf (as is without padding)."""
    vocab_size = getattr(model, "real_vocab_size", None)
    if vocab_size is None:
        return logits
    return _mask_from(logits, parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1], vocab_size)


def _tp_shard(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.chunk(tensor, tp, dim=dim)[rank].contiguous()


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate q/k/v (weights [out, in] or biases [out]) -> megatron's grouped layout."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def load_full_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (HF Llama names) into this rank's shard/stage of ``model`` (strict: every
    parameter of the model gets one)."""
    groups = model.config.num_query_groups or model.config.num_attention_heads
    state = model.state_dict()
    target: dict[str, torch.Tensor] = {}
    local_layers = len(model.decoder.layers)
    # layer_number is global (1-based): stage k's first layer continues where stage k-1 ended
    offset = model.decoder.layers[0].layer_number - 1 if local_layers else 0

    def put(name: str, value: torch.Tensor) -> None:
        if name not in state:
            raise KeyError(f"megatron model has no parameter {name!r}")
        target[name] = value.to(state[name].dtype)

    def norm_key(layer: str, fused: str, separate: str) -> str:
        return f"{layer}.{fused}" if f"{layer}.{fused}" in state else f"{layer}.{separate}"

    if model.pre_process:
        put("embedding.word_embeddings.weight", _tp_shard(weights["embed_tokens.weight"], 0))
    if model.post_process:
        put("decoder.final_layernorm.weight", weights["norm.weight"])
        if not model.share_embeddings_and_output_weights:
            put("output_layer.weight", _tp_shard(weights["lm_head.weight"], 0))
    for local in range(local_layers):
        hf = f"layers.{local + offset}"
        mc = f"decoder.layers.{local}"
        qkv = _qkv(*(weights[f"{hf}.self_attn.{p}_proj.weight"] for p in "qkv"), groups)
        put(f"{mc}.self_attention.linear_qkv.weight", _tp_shard(qkv, 0))
        if f"{hf}.self_attn.q_proj.bias" in weights:
            bias = _qkv(*(weights[f"{hf}.self_attn.{p}_proj.bias"] for p in "qkv"), groups)
            put(f"{mc}.self_attention.linear_qkv.bias", _tp_shard(bias, 0))
        put(f"{mc}.self_attention.linear_proj.weight", _tp_shard(weights[f"{hf}.self_attn.o_proj.weight"], 1))
        put(norm_key(mc, "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            weights[f"{hf}.input_layernorm.weight"])
        put(norm_key(mc, "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
            weights[f"{hf}.post_attention_layernorm.weight"])
        gate = _tp_shard(weights[f"{hf}.mlp.gate_proj.weight"], 0)
        up = _tp_shard(weights[f"{hf}.mlp.up_proj.weight"], 0)
        put(f"{mc}.mlp.linear_fc1.weight", torch.cat([gate, up], dim=0))
        put(f"{mc}.mlp.linear_fc2.weight", _tp_shard(weights[f"{hf}.mlp.down_proj.weight"], 1))
    missing = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
               and k not in target and "output_layer" not in k]
    if missing:
        raise KeyError(f"no full weight for {missing[:5]}")
    model.load_state_dict(target, strict=False)


def _generator(seed: int, name: str) -> torch.Generator:
    # sha256, not hash(): Python salts str hashes per process, and every rank must draw the same
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def initial_weights(model, seed: int, std: float) -> dict[str, torch.Tensor]:
    """A fresh full state for ``model``'s architecture (all layers, whole vocabulary), in fp32:
    normal(0, ``std``) weights, the two projections back into the residual stream (o_proj,
    down_proj) scaled by 1/sqrt(2 * layers) as megatron's ``scaled_init_method_normal`` does,
    norms at 1, biases at 0. Built whole on every rank: meant for models small enough to
    pre-train from scratch here (the tiny model); real models come from a checkpoint."""
    c = model.config
    layers, hidden, heads = c.num_layers, c.hidden_size, c.num_attention_heads
    groups, head_dim, ffn = c.num_query_groups or heads, c.kv_channels, c.ffn_hidden_size
    out_std = std / math.sqrt(2.0 * layers)
    shapes: dict[str, tuple[tuple[int, ...], float | None]] = {
        "embed_tokens.weight": ((model.vocab_size, hidden), std),
        "norm.weight": ((hidden,), None),
    }
    if not model.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = ((model.vocab_size, hidden), std)
    for i in range(layers):
        p = f"layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": ((heads * head_dim, hidden), std),
            f"{p}.self_attn.k_proj.weight": ((groups * head_dim, hidden), std),
            f"{p}.self_attn.v_proj.weight": ((groups * head_dim, hidden), std),
            f"{p}.self_attn.o_proj.weight": ((hidden, heads * head_dim), out_std),
            f"{p}.input_layernorm.weight": ((hidden,), None),
            f"{p}.post_attention_layernorm.weight": ((hidden,), None),
            f"{p}.mlp.gate_proj.weight": ((ffn, hidden), std),
            f"{p}.mlp.up_proj.weight": ((ffn, hidden), std),
            f"{p}.mlp.down_proj.weight": ((hidden, ffn), out_std),
        })
        if c.add_qkv_bias:
            for name, rows in (("q", heads * head_dim), ("k", groups * head_dim), ("v", groups * head_dim)):
                shapes[f"{p}.self_attn.{name}_proj.bias"] = ((rows,), 0.0)
    weights = {}
    for name, (shape, scale) in shapes.items():
        if scale is None:
            weights[name] = torch.ones(shape)
        elif scale == 0.0:
            weights[name] = torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=_generator(seed, name)) * scale
    return weights


__all__ = ["VOCAB_MULTIPLE", "initial_weights", "load_full_weights", "mask_padded_logits", "padded_vocab"]
