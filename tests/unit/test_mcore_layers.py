"""megarope's megatron-core layers in one process: HF logits, entropy-aware ABF, training, checkpoints."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

import megarope
from megarope import RopeConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megarope.mcore import parallel
from megarope.mcore.attention import MegaropeCoreAttention, SDPAAttention
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


def test_compiled_models_fuse_swiglu_with_the_same_logits(tmp_path):
    """rope_fusion="compile" (from_hf's default) also runs megatron's SwiGLU fusion
    (bias_activation_fusion), with the logits of the unfused model; "eager" and explicit config win."""
    tiny_hf(tmp_path, SCALINGS["yarn"])
    compiled = megarope.from_hf(tmp_path)
    eager = megarope.from_hf(tmp_path, rope_fusion="eager")
    assert compiled.config.bias_activation_fusion and not eager.config.bias_activation_fusion
    assert not megarope.from_hf(tmp_path, bias_activation_fusion=False).config.bias_activation_fusion
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(compiled, ids), logits_of(eager, ids), rtol=0, atol=1e-5)


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


def tiny_config(layers=2, **kwargs):
    return transformer_config(num_layers=layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                              kv_channels=HEAD_DIM, ffn_hidden_size=128, **kwargs)


def tiny_model(rope, layers=2, core_attention="sdpa", **kwargs):
    torch.manual_seed(0)
    return gpt_model(tiny_config(layers, **kwargs), rope, vocab_size=VOCAB, max_sequence_length=256,
                     core_attention=core_attention)


LONGROPE = RopeConfig(rope_type="longrope", head_dim=HEAD_DIM, long_factor=[1.0 + i for i in range(8)],
                      short_factor=[1.0] * 8, original_max_position_embeddings=WINDOW, factor=4.0, n_hat=4)
EABF = RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0, original_max_position_embeddings=WINDOW)


def _core(model, layer=0):
    return model.decoder.layers[layer].self_attention.core_attention


@pytest.mark.parametrize("rope", [LONGROPE, EABF], ids=["longrope_nhat4", "eabf"])
def test_sdpa_attention_equals_local_forward_and_backward(rope):
    """The SDPA default against megatron's local attention (the reference), with the attention
    factor (LongRoPE mscale, long factors past the window) and the per-position E-ABF query scale."""
    layers = 3  # E-ABF scales layers after unscaled_layers=2
    # large weights so that attention really depends on the scales
    sdpa, local = (tiny_model(rope, layers, kind, init_method_std=0.2) for kind in ("sdpa", "local"))
    assert isinstance(_core(sdpa).inner, SDPAAttention) and isinstance(_core(local).inner, DotProductAttention)
    assert isinstance(_core(tiny_model(rope)).inner, SDPAAttention)  # the default without TE
    for a, b in zip(sdpa.parameters(), local.parameters()):
        assert torch.equal(a, b)
    ids = torch.randint(0, VOCAB, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(ids.shape[1])[None].expand(2, -1)
    grads, outputs = [], []
    for model in (sdpa, local):
        out = model(ids, positions, None)
        (out.float().square().mean()).backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    tolerance = 1e-5 * outputs[1].abs().max()  # fp32 summation order differs
    assert (outputs[0] - outputs[1]).abs().max() <= tolerance
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # the scales matter here: without them the output moves far more than the tolerance
    set_rope(sdpa, RopeConfig(head_dim=HEAD_DIM, rope_theta=rope.rope_theta))
    assert (sdpa(ids, positions, None).detach() - outputs[1]).abs().max() > 1000 * tolerance


def test_sdpa_attention_packed_batch_is_block_diagonal():
    """thd: each packed sequence attends only to itself, with E-ABF positions restarting per sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    core = MegaropeCoreAttention(tiny_config(3), layer_number=3, attn_mask_type=AttnMaskType.causal,
                                 attention_type="self", rope=EABF, inner=SDPAAttention)
    lengths = [20, 44]
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(sum(lengths), h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    packed = core(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                                   cu_seqlens_kv=cu))
    alone = [core(*(t[a:b, None] for t in (q, k, v)), None).squeeze(1) for a, b in zip(cu[:-1], cu[1:])]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=0, atol=1e-6)


def test_sdpa_attention_explicit_mask_equals_local():
    """A given attention_mask (True = masked out) replaces the causal one, as in megatron's local attention."""
    from megatron.core.transformer.enums import AttnMaskType

    config, kwargs = tiny_config(), dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, gen = 24, torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(s, 2, h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
    mask = torch.rand(2, 1, s, s, generator=gen) < 0.3
    mask &= ~torch.eye(s, dtype=torch.bool)  # every query keeps a key: no all-masked softmax row
    out = SDPAAttention(config, **kwargs)(q, k, v, mask)
    torch.testing.assert_close(out, DotProductAttention(config, **kwargs)(q, k, v, mask), rtol=0, atol=1e-5)
    assert (out - SDPAAttention(config, **kwargs)(q, k, v, None)).abs().max() > 1e-2


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


_TORCH_UNTOUCHED = '''
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM

originals = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize, torch.Tensor.type)

def untouched(when):
    now = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize, torch.Tensor.type)
    assert now == originals, when
    assert torch.ones(2).type() == "torch.FloatTensor", when
    for call in (lambda: torch.zeros(2, device="cuda"), torch.cuda.current_device):
        try:
            call()
        except (RuntimeError, AssertionError):  # torch's own answer without CUDA
            continue
        raise AssertionError(f"{when}: a CUDA call succeeded")

import megarope, megarope.run.engine  # noqa: E401  (the whole package, training side included)
untouched("after import")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, max_position_embeddings=32)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
model = megarope.from_hf(sys.argv[1])
untouched("after from_hf")
with torch.no_grad():  # the model works without the layer
    assert model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None], None).shape == (1, 8, 64)
from megarope.mcore import parallel
parallel.initialize()  # megarope's training entry: the layer is on until destroy()
assert torch.cuda.current_device() == torch.device("cpu")
parallel.destroy()
untouched("after destroy")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is only switched on without CUDA")
def test_from_hf_and_destroy_leave_torch_as_before(tmp_path):
    # a fresh process: this module's fixture keeps the layer on in the test process
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _TORCH_UNTOUCHED, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation one op makes while ``fn`` runs (torch's profiler)."""
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_sdpa_attention_never_materialises_the_score_matrix():
    """Memory linear in length: no op allocates even one head's [s, s] fp32 scores, which megatron's
    local attention does for all heads (the control that shows the measurement sees it)."""
    from megatron.core.transformer.enums import AttnMaskType

    config, kwargs = tiny_config(), dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, gen = 2048, torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(s, 1, h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
    one_head_scores = s * s * 4
    with torch.no_grad():
        assert _largest_allocation(lambda: SDPAAttention(config, **kwargs)(q, k, v, None)) < one_head_scores / 4
        assert _largest_allocation(lambda: DotProductAttention(config, **kwargs)(q, k, v, None)) >= 4 * one_head_scores


def test_sdpa_attention_dropout_in_training_only():
    """attention_dropout acts in training mode only (as megatron's local attention); eval is exact."""
    from megatron.core.transformer.enums import AttnMaskType

    kwargs = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(32, 2, h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
    plain = SDPAAttention(tiny_config(), **kwargs)(q, k, v, None)
    dropped = SDPAAttention(tiny_config(attention_dropout=0.5), **kwargs)
    torch.testing.assert_close(dropped.eval()(q, k, v, None), plain, rtol=0, atol=0)
    out = dropped.train()(q, k, v, None)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 0.1


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
