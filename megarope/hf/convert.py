"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2) <-> megatron-core GPT with megarope.

Config through transformers' config classes (``AutoConfig``), weights through safetensors. The
RoPE keys go through ``RopeConfig.from_hf`` / ``to_hf``.

The weights keep Hugging Face's names; ``megarope.mcore.weights`` maps them onto megatron's layout
(fused q/k/v and gate/up, TE or local norms) and cuts this rank's tensor-parallel shard and
pipeline stage from the full tensors on load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megarope.errors import MegaropeError
from megarope.rope.config import RopeConfig

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2")


class CheckpointError(MegaropeError):
    """A Hugging Face checkpoint folder megarope cannot read; ``field`` is ``model.path``."""


def read_hf_config(path: str | os.PathLike):
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError("model.path", f"no config.json in {path}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED:
        raise CheckpointError("model.path", f"model_type {config.model_type!r} is not supported (supported: {SUPPORTED})")
    return config


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_from_hf_config(config) -> RopeConfig:
    """RopeConfig of a transformers config object (or of a config.json dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    return RopeConfig.from_hf(values)


def transformer_config_from_hf(config, **overrides):
    from megarope.mcore.spec import transformer_config

    tp = _parallel_sizes()[0]
    return transformer_config(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=_head_dim(config),
        ffn_hidden_size=config.intermediate_size,
        layernorm_epsilon=config.rms_norm_eps,
        add_qkv_bias=bool(getattr(config, "attention_bias", False) or config.model_type == "qwen2"),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=_parallel_sizes()[1],
        context_parallel_size=_parallel_sizes()[2],
        **overrides,
    )


def _parallel_sizes() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError("model.path", f"no *.safetensors files in {path}")
    return files


def check_hf_folder(path: str | os.PathLike) -> None:
    """Everything about a checkpoint folder that can fail, without loading its weights: it exists,
    ``config.json`` reads as a supported model, the safetensors files hold the tensors that config
    describes (names and shapes, from the file headers) and the tokenizer loads."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("model.path", f"no such checkpoint folder: {path}")
    config = read_hf_config(path)
    files = _weight_files(path)
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            shapes.update({k.removeprefix("model."): tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    heads, groups, dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    expected = {"embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_hidden_layers):
        expected[f"layers.{i}.self_attn.q_proj.weight"] = (heads * dim, config.hidden_size)
        expected[f"layers.{i}.self_attn.k_proj.weight"] = (groups * dim, config.hidden_size)
        expected[f"layers.{i}.mlp.gate_proj.weight"] = (config.intermediate_size, config.hidden_size)
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError("model.path", f"{path}: no tensor {name!r} in the safetensors files, which "
                                  "config.json's model needs")
        if shapes[name] != shape:
            raise CheckpointError("model.path", f"{path}: {name} has shape {list(shapes[name])} but config.json "
                                  f"describes {list(shape)}")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError("model.path", f"{path}: the tokenizer does not load ({str(err).splitlines()[0]})") \
            from err


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    files = _weight_files(path)
    weights = {}
    for file in files:
        weights.update(load_file(file))
    return {k.removeprefix("model."): v for k, v in weights.items()}


def from_hf(path: str | os.PathLike, rope: RopeConfig | None = None, core_attention: str = "sdpa",
            rope_fusion: str = "compile", **config_overrides):
    """A megatron-core ``GPTModel`` with megarope layers from a Hugging Face checkpoint folder.

    In a plain process (no torchrun) a one-rank process group is created (``parallel.destroy()``
    ends it). Under an initialised megatron parallel state, this rank's tensor-parallel shard and
    pipeline stage are loaded. torch is left as it was: the CPU compatibility layer is on only
    while the model is built and while it runs (or as long as the caller's ``parallel.initialize``
    keeps it on).
    ``rope`` overrides the checkpoint's RoPE configuration (e.g. to extend it); ``core_attention``
    picks the attention kernel without Transformer Engine and ``rope_fusion`` how RoPE is applied
    (see ``megarope.mcore.spec.layer_spec``; ``"compile"`` also turns on megatron's SwiGLU fusion,
    ``megarope.mcore.spec.activation_fusion``).
    """
    from megatron.core import parallel_state

    from megarope.mcore import compat, parallel

    # megatron allocates on CUDA by name when building and running the model: the CPU layer is on
    # for exactly that, so the user's torch is left as it was between calls
    with compat.cpu_compat():
        if not parallel_state.model_parallel_is_initialized():
            parallel.initialize()
        model = build_from_hf(path, rope, core_attention=core_attention, rope_fusion=rope_fusion, **config_overrides)
    model.eval()
    return compat.scoped_forward(model)


def build_from_hf(path: str | os.PathLike, rope: RopeConfig | None = None, core_attention: str = "sdpa",
                  rope_fusion: str = "compile", **config_overrides):
    """``from_hf`` under an already initialised parallel state (the training engine's path)."""
    from megarope.mcore.spec import activation_fusion, gpt_model
    from megarope.mcore.weights import load_full_weights

    path = Path(path)
    config = read_hf_config(path)
    rope = rope or rope_from_hf_config(config)
    model = gpt_model(
        transformer_config_from_hf(config, **{**activation_fusion(rope_fusion), **config_overrides}),
        rope,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(config.tie_word_embeddings),
        core_attention=core_attention,
        rope_fusion=rope_fusion,
    )
    load_full_weights(model, read_hf_weights(path))
    return model


def to_hf(model, path: str | os.PathLike, hf_config, rope: RopeConfig | None = None) -> Path:
    """Write ``model`` (one process, no TP/PP) as a Hugging Face folder: safetensors + config.json
    whose RoPE keys vanilla transformers loads. ``hf_config`` is the transformers config of the
    architecture (e.g. the imported checkpoint's); its RoPE keys are replaced by ``rope``'s."""
    from megarope.mcore.spec import rope_of

    if any(size > 1 for size in _parallel_sizes()[:2]):
        raise ValueError("to_hf writes from one process: gather TP/PP shards first (parallel.tp=1, parallel.pp=1)")
    rope = rope or rope_of(model)
    groups = hf_config.num_key_value_heads
    heads, head_dim = hf_config.num_attention_heads, _head_dim(hf_config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not hf_config.tie_word_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    q_per_group = heads // groups
    for i in range(hf_config.num_hidden_layers):
        mc, hf = f"decoder.layers.{i}", f"model.layers.{i}"
        for kind in ("weight", "bias"):
            fused = state.get(f"{mc}.self_attention.linear_qkv.{kind}")
            if fused is None:
                continue
            fused = fused.reshape(groups, (q_per_group + 2) * head_dim, *fused.shape[1:])
            q, k, v = torch.split(fused, [q_per_group * head_dim, head_dim, head_dim], dim=1)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{hf}.self_attn.{name}_proj.{kind}"] = part.reshape(-1, *fused.shape[2:]).contiguous()
        out[f"{hf}.self_attn.o_proj.weight"] = state[f"{mc}.self_attention.linear_proj.weight"]
        for hf_name, fused, separate in (
            ("input_layernorm", "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            ("post_attention_layernorm", "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
        ):
            out[f"{hf}.{hf_name}.weight"] = state.get(f"{mc}.{fused}", state.get(f"{mc}.{separate}"))
        gate, up = torch.chunk(state[f"{mc}.mlp.linear_fc1.weight"], 2, dim=0)
        out[f"{hf}.mlp.gate_proj.weight"], out[f"{hf}.mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out[f"{hf}.mlp.down_proj.weight"] = state[f"{mc}.mlp.linear_fc2.weight"]

    values = hf_config.to_dict()
    for key in ("rope_scaling", "rope_parameters", "rope_theta", "megarope", "original_max_position_embeddings"):
        values.pop(key, None)
    values.update(rope.to_hf())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    save_file(out, staging / "model.safetensors", metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    (staging / "README.md").write_text(_export_note(rope))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(staging, path)
    if rope.has_query_scale or rope.n_hat:
        log.warning("%s", _export_note(rope).splitlines()[2])
    return path


def _export_note(rope: RopeConfig) -> str:
    lines = ["# Exported by megarope", "", f"RoPE: {rope.describe()}."]
    if rope.has_query_scale:
        lines[2] = (
            "Entropy-aware ABF has no transformers equivalent: vanilla transformers uses the new base "
            f"({rope.rope_theta:g}) but NOT the per-position query scale max(1, log(i+1)/log(c)) of layers "
            f"> {rope.unscaled_layers}; the full parameters are kept under the `megarope` key of config.json."
        )
    elif rope.n_hat:
        lines[2] = (
            f"LongRoPE n_hat={rope.n_hat} has no transformers key: vanilla transformers interpolates the first "
            "positions too; the full parameters are kept under the `megarope` key of config.json."
        )
    return "\n".join(lines) + "\n"
