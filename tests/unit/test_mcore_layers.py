"""megarope's megatron-core layers in one process: HF logits, entropy-aware ABF, training, checkpoints."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

import megarope
from megarope import RopeConfig
from megarope.mcore import parallel
from megarope.mcore.spec import gpt_model, rope_of, set_rope, transformer_config

VOCAB, WINDOW = 96, 16
HEAD_DIM = 16


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    parallel.initialize()
    yield


def tiny_hf(tmp_path, rope_parameters, cls=LlamaForCausalLM, config_cls=LlamaConfig, max_pos=4 * WINDOW, layers=2,
            **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=max_pos, tie_word_embeddings=False,
        # large weights so that attention really depends on the rotary angles
        initializer_range=0.3, rope_parameters={"rope_theta": 10_000.0, **rope_parameters}, **extra,
    )
    model = cls(config).eval()
    model.save_pretrained(tmp_path)
    return model


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1), None)


SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": WINDOW},
    "longrope": {"rope_type": "longrope", "long_factor": [1.0 + i * 0.7 for i in range(HEAD_DIM // 2)],
                 "short_factor": [1.0 + i * 0.05 for i in range(HEAD_DIM // 2)], "original_max_position_embeddings": WINDOW},
}


@pytest.mark.parametrize("seq_len", [WINDOW, 3 * WINDOW])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_from_hf_logits_equal_transformers(tmp_path, name, seq_len):
    # dynamic NTK only changes past max_position_embeddings: give it the original window
    hf = tiny_hf(tmp_path, SCALINGS[name], max_pos=WINDOW if name == "dynamic" else 4 * WINDOW)
    model = megarope.from_hf(tmp_path)
    assert isinstance(model, __import__("megatron.core.models.gpt", fromlist=["GPTModel"]).GPTModel)
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    out = logits_of(model, ids)
    assert out.shape == (2, seq_len, VOCAB)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # the comparison is sensitive to the RoPE: plain RoPE gives other logits (except where equal by design)
    if name != "default" and (seq_len > WINDOW or name in ("linear", "yarn", "llama3", "longrope")):
        set_rope(model, RopeConfig(head_dim=HEAD_DIM))
        assert (logits_of(model, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    "cls, config_cls, extra",
    [(MistralForCausalLM, MistralConfig, {"sliding_window": None}), (Qwen2ForCausalLM, Qwen2Config, {})],
    ids=["mistral", "qwen2"],
)
def test_from_hf_other_layouts(tmp_path, cls, config_cls, extra):
    hf = tiny_hf(tmp_path, SCALINGS["yarn"], cls=cls, config_cls=config_cls, **extra)
    if config_cls is Qwen2Config:  # q/k/v biases: make them non-zero so the test sees their layout
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        hf.save_pretrained(tmp_path)
    model = megarope.from_hf(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 2 * WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(logits_of(model, ids), ref, rtol=0, atol=1e-4)


def test_entropy_abf_matches_independent_reference(tmp_path, monkeypatch):
    """Reference: transformers' Llama with base 500,000 whose query, after RoPE, is multiplied by
    max(1, log(i+1)/log(c)) in layers >= 3 only (1-based), as arXiv 2401.07004 sec. 3.2 says."""
    c, layers = WINDOW, 4
    hf = tiny_hf(tmp_path, {"rope_type": "default", "rope_theta": 500_000.0}, layers=layers)
    current = {}
    original = modeling_llama.apply_rotary_pos_emb

    def scaled_rope(q, k, cos, sin, *args, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        if current["layer"] >= 2:  # 0-based index: layers 3.. in megatron's 1-based numbering
            i = torch.arange(q.shape[2], dtype=torch.float64)
            q = q * torch.clamp(torch.log(i + 1) / math.log(c), min=1.0).to(q.dtype)[None, None, :, None]
        return q, k

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", scaled_rope)
    for layer in hf.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, a: current.update(layer=m.layer_idx))

    eabf = RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0, original_max_position_embeddings=c)
    model = megarope.from_hf(tmp_path, rope=eabf)
    ids = torch.randint(0, VOCAB, (2, 4 * c), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    # 4 layers of large weights amplify transformers' fp32 angle rounding (plain ABF already differs
    # by ~1e-5 of the logit scale), so the tolerance is relative to the logit scale
    tolerance = 3e-5 * ref.abs().max()
    assert (logits_of(model, ids) - ref).abs().max() <= tolerance
    set_rope(model, eabf.replace(unscaled_layers=layers))  # the scale is what the reference checks
    assert (logits_of(model, ids) - ref).abs().max() > 100 * tolerance

    # first two layers unchanged, the third differs, compared with plain ABF on the same weights
    def layer_outputs(rope):
        set_rope(model, rope)
        outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in model.decoder.layers]
        logits_of(model, ids)
        for h in hooks:
            h.remove()
        return outs

    scaled, plain = layer_outputs(eabf), layer_outputs(eabf.replace(rope_type="abf"))
    assert torch.equal(scaled[0], plain[0]) and torch.equal(scaled[1], plain[1])
    assert (scaled[2] - plain[2]).abs().max() > 1e-3


def tiny_model(rope, layers=2):
    config = transformer_config(num_layers=layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=HEAD_DIM, ffn_hidden_size=128)
    torch.manual_seed(0)
    return gpt_model(config, rope, vocab_size=VOCAB, max_sequence_length=256)


LONGROPE = RopeConfig(rope_type="longrope", head_dim=HEAD_DIM, long_factor=[1.0 + i for i in range(8)],
                      short_factor=[1.0] * 8, original_max_position_embeddings=WINDOW, factor=4.0, n_hat=4)


def test_training_loss_drops():
    model = tiny_model(LONGROPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # a periodic token stream: predictable only by attending to earlier positions
    base = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(4))
    tokens = base.repeat(8)[: 4 * WINDOW + 1][None].repeat(2, 1)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(ids.shape[1])[None].expand(2, -1)
    losses = []
    for _ in range(40):
        loss = model(ids, positions, None, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_factors_survive_state_dict_round_trip():
    model = tiny_model(LONGROPE)
    fresh = tiny_model(RopeConfig(head_dim=HEAD_DIM))
    fresh.load_state_dict(model.state_dict())
    assert rope_of(fresh) == LONGROPE
    assert all(m.rope == LONGROPE for m in fresh.modules() if hasattr(m, "set_rope"))
    ids = torch.randint(0, VOCAB, (1, 48))
    torch.testing.assert_close(logits_of(fresh, ids), logits_of(model, ids), rtol=0, atol=0)


def test_factors_survive_dist_checkpointing(tmp_path):
    from megatron.core import dist_checkpointing

    model = tiny_model(LONGROPE)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    fresh = tiny_model(RopeConfig(head_dim=HEAD_DIM))
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    assert rope_of(fresh) == LONGROPE
    ids = torch.randint(0, VOCAB, (1, 48))
    torch.testing.assert_close(logits_of(fresh, ids), logits_of(model, ids), rtol=0, atol=0)


def test_export_loads_in_vanilla_transformers(tmp_path):
    hf = tiny_hf(tmp_path / "in", SCALINGS["default"])
    model = megarope.from_hf(tmp_path / "in", rope=LONGROPE.replace(n_hat=0, max_position_embeddings=4 * WINDOW))
    out = megarope.to_hf(model, tmp_path / "out", hf.config)
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "longrope"
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits_of(model, ids), rtol=0, atol=1e-4)


def test_export_of_entropy_abf_says_what_transformers_lacks(tmp_path):
    hf = tiny_hf(tmp_path / "in", SCALINGS["default"])
    eabf = RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0, original_max_position_embeddings=WINDOW)
    out = megarope.to_hf(megarope.from_hf(tmp_path / "in", rope=eabf), tmp_path / "out", hf.config)
    note = (out / "README.md").read_text()
    assert "no transformers equivalent" in note and "query scale" in note
    exported = RopeConfig.from_hf(LlamaConfig.from_pretrained(out).to_dict())
    assert exported == eabf.replace(max_position_embeddings=hf.config.max_position_embeddings)


@pytest.mark.parametrize("in_n_hat", [True, False])
def test_longrope_n_hat_attention_factor_matches_independent_reference(tmp_path, monkeypatch, in_n_hat):
    """Reference: transformers' longrope whose cos/sin at the first n-hat positions are replaced by
    the original RoPE's, times the attention factor (megarope's default) or not (the reference
    code's LongRoPEScaledRotaryEmbedding, n_hat_attention_factor=False)."""
    n_hat, params = 4, SCALINGS["longrope"]
    hf = tiny_hf(tmp_path, params)
    rope = rope_of(megarope.from_hf(tmp_path))
    rope = rope.replace(n_hat=n_hat, n_hat_attention_factor=in_n_hat)
    factor = rope.attention_factor(3 * WINDOW)
    assert factor > 1.1
    original = modeling_llama.apply_rotary_pos_emb

    def with_n_hat(q, k, cos, sin, *args, **kwargs):
        angles = torch.arange(n_hat, dtype=torch.float64)[:, None] * RopeConfig(head_dim=HEAD_DIM).inv_freq()
        emb = torch.cat([angles, angles], dim=-1)
        scale = factor if in_n_hat else 1.0
        cos, sin = cos.clone(), sin.clone()
        cos[:, :n_hat], sin[:, :n_hat] = (emb.cos() * scale).to(cos.dtype), (emb.sin() * scale).to(sin.dtype)
        return original(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", with_n_hat)
    model = megarope.from_hf(tmp_path, rope=rope)
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
    tolerance = 3e-5 * ref.abs().max()
    assert (logits_of(model, ids) - ref).abs().max() <= tolerance
    set_rope(model, rope.replace(n_hat_attention_factor=not in_n_hat))  # the setting is what the reference checks
    assert (logits_of(model, ids) - ref).abs().max() > 100 * tolerance
