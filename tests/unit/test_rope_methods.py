"""Every RoPE method against transformers' own functions (the oracle) or an independent closed form."""

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megarope import RopeConfig, RopeConfigError
from megarope.errors import MegaropeError
from megarope.rope.methods import METHODS, base_inv_freq, register
from tests.unit import published_rope_configs as published

REL = 1e-6


def hf_rope(cfg: dict, seq_len=None, config_cls=LlamaConfig):
    """transformers' (inv_freq, attention_factor) for a config.json dict."""
    config = config_cls(**copy.deepcopy(cfg))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)


def assert_matches_hf(cfg: dict, seq_len, config_cls=LlamaConfig):
    rc = RopeConfig.from_hf(copy.deepcopy(cfg))
    hf_inv, hf_att = hf_rope(cfg, seq_len, config_cls)
    ours = rc.inv_freq(seq_len)
    assert ours.dtype == torch.float64 and ours.shape == hf_inv.shape
    rel = ((ours - hf_inv.double()).abs() / hf_inv.double().abs()).max().item()
    assert rel <= REL, f"inv_freq relative error {rel}"
    assert rc.attention_factor(seq_len) == pytest.approx(hf_att, rel=REL)
    return rc


def model_cfg(head_dim, base, max_pos, rope_scaling=None, partial=None):
    cfg = {
        "hidden_size": head_dim * 4,
        "num_attention_heads": 4,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "rope_theta": base,
    }
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    if partial is not None:
        cfg["partial_rotary_factor"] = partial
    return cfg


HEAD_DIMS = [64, 128]
BASES = [10_000.0, 500_000.0]
WINDOW = 2048


def scalings(head_dim, partial=1.0):
    n = int(head_dim * partial) // 2
    ramp = [1.0 + 15.0 * (i / (n - 1)) ** 2 for i in range(n)]
    return {
        "linear": {"rope_type": "linear", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 4.0},
        "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": WINDOW},
        "yarn_betas": {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": WINDOW,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": WINDOW,
        },
        "longrope": {
            "rope_type": "longrope",
            "long_factor": ramp,
            "short_factor": [1.0 + 0.01 * i for i in range(n)],
            "original_max_position_embeddings": WINDOW,
        },
    }


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("seq_len", [None, WINDOW // 2, WINDOW, 4 * WINDOW, 16 * WINDOW])
@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "yarn_betas", "llama3", "longrope"])
def test_scaled_methods_match_transformers(name, head_dim, base, seq_len):
    max_pos = 8 * WINDOW if name != "dynamic" else WINDOW
    assert_matches_hf(model_cfg(head_dim, base, max_pos, scalings(head_dim)[name]), seq_len)


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "llama3", "longrope"])
def test_partial_rotary_factor_matches_transformers(name):
    cfg = model_cfg(64, 10_000.0, 8 * WINDOW, scalings(64, 0.5)[name], partial=0.5)
    rc = assert_matches_hf(cfg, 4 * WINDOW)
    assert rc.rotary_dim == 32 and rc.inv_freq().numel() == 16


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
def test_default_matches_transformers(head_dim, base):
    assert_matches_hf(model_cfg(head_dim, base, WINDOW), None)


@pytest.mark.parametrize(
    "cfg, config_cls",
    [
        (published.LLAMA_3_1, LlamaConfig),
        (published.QWEN2_5_YARN, LlamaConfig),
        (published.DEEPSEEK_YARN, LlamaConfig),
        (published.PHI_3_5_MINI, Phi3Config),
    ],
    ids=["llama3.1", "qwen2.5-yarn", "deepseek-yarn", "phi3.5-longrope"],
)
@pytest.mark.parametrize("seq_len", [None, 4096, 4097, 131072])
def test_published_configs_match_transformers(cfg, config_cls, seq_len):
    assert_matches_hf(cfg, seq_len, config_cls)


def test_phi3_top_level_window_and_su_spelling():
    cfg = copy.deepcopy(published.PHI_3_5_MINI)
    cfg["rope_scaling"]["type"] = "su"
    rc = RopeConfig.from_hf(cfg)
    assert rc.rope_type == "longrope" and rc.original_max_position_embeddings == 4096
    # long factors past the window, short factors up to it (transformers' rule)
    assert torch.equal(rc.inv_freq(4097), rc.inv_freq(131072))
    assert not torch.equal(rc.inv_freq(4096), rc.inv_freq(4097))
    assert rc.attention_factor() == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_v5_rope_parameters_spelling():
    cfg = model_cfg(64, 1.0, WINDOW)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0}
    rc = RopeConfig.from_hf(cfg)
    assert rc.rope_type == "linear" and rc.rope_theta == 50_000.0 and rc.factor == 2.0


# ----------------------------------------------------------------------------- closed forms


def closed_form_inv_freq(base, dim):
    return torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("factor", [2.0, 8.0, 64.0])
def test_ntk_closed_form(head_dim, factor):
    rc = RopeConfig(rope_type="ntk", head_dim=head_dim, rope_theta=10_000.0, factor=factor)
    expected = closed_form_inv_freq(10_000.0 * factor ** (head_dim / (head_dim - 2)), head_dim)
    torch.testing.assert_close(rc.inv_freq(), expected, rtol=1e-12, atol=0)
    # NTK keeps the highest frequency and divides the lowest by exactly the factor
    assert rc.inv_freq()[0].item() == pytest.approx(1.0)
    assert (closed_form_inv_freq(10_000.0, head_dim)[-1] / rc.inv_freq()[-1]).item() == pytest.approx(factor)


@pytest.mark.parametrize("rope_type", ["abf", "eabf"])
def test_abf_closed_form(rope_type):
    rc = RopeConfig(rope_type=rope_type, head_dim=128, rope_theta=500_000.0, original_max_position_embeddings=4096)
    torch.testing.assert_close(rc.inv_freq(), closed_form_inv_freq(500_000.0, 128), rtol=1e-12, atol=0)
    assert rc.attention_factor() == 1.0


def test_eabf_query_scale_closed_form():
    c = 4096
    rc = RopeConfig(rope_type="eabf", head_dim=64, rope_theta=500_000.0, original_max_position_embeddings=c)
    positions = torch.tensor([0, 1, c - 2, c - 1, c, 2 * c, 16383, 2**21])
    expected = torch.tensor([max(1.0, math.log(i + 1) / math.log(c)) for i in positions.tolist()])
    for layer in (1, 2):
        assert torch.equal(rc.query_scale(positions, layer), torch.ones(8))
    for layer in (3, 32):
        scale = rc.query_scale(positions, layer)
        assert scale.dtype == torch.float32
        torch.testing.assert_close(scale, expected, rtol=1e-7, atol=0)
    assert scale[3] == 1.0 and scale[4] > 1.0  # scaling starts exactly past the window
    assert torch.equal(RopeConfig(rope_type="eabf", head_dim=64, original_max_position_embeddings=c, unscaled_layers=0).query_scale(positions, 1), expected)


def test_query_scale_is_one_for_other_methods():
    rc = RopeConfig.from_hf(published.LLAMA_3_1)
    assert torch.equal(rc.query_scale(torch.arange(10**5), 5), torch.ones(10**5))


def test_eabf_legacy_checkpoint_spelling():
    rc = RopeConfig.from_hf(published.EABF_LLAMA2)
    assert rc.rope_type == "eabf" and rc.rope_theta == 500_000.0
    assert rc.original_max_position_embeddings == 4096 and rc.unscaled_layers == 2


def test_longrope_n_hat_closed_form():
    n = 32
    long = [1.0 + i / 4 for i in range(n)]
    rc = RopeConfig(
        rope_type="longrope",
        head_dim=2 * n,
        long_factor=long,
        short_factor=[1.0] * n,
        original_max_position_embeddings=256,
        max_position_embeddings=2048,
        n_hat=16,
    )
    positions = torch.arange(2048)
    angles = rc.angles(positions).double()
    base = closed_form_inv_freq(10_000.0, 2 * n)
    exact = torch.where(
        positions[:, None] < 16, positions[:, None] * base, positions[:, None] * base / torch.tensor(long)
    )
    wrapped = torch.atan2(torch.sin(exact), torch.cos(exact))
    torch.testing.assert_close(angles, wrapped, rtol=0, atol=1e-6)
    # below n-hat the rotation is the original model's, above it the interpolated one
    assert torch.equal(rc.angles(positions[:16], seq_len=2048), RopeConfig(head_dim=2 * n).angles(positions[:16]))


# ----------------------------------------------------------------------------- precision at 2M


def test_angles_precise_to_2m_positions():
    rc = RopeConfig(rope_type="abf", head_dim=128, rope_theta=500_000.0)
    inv = rc.inv_freq()
    worst_ours = worst_fp32 = 0.0
    chunk = 1 << 18
    for start in range(0, 2**21 + 1, chunk):
        positions = torch.arange(start, min(start + chunk, 2**21 + 1))
        ang = rc.angles(positions, seq_len=2**21 + 1)
        assert ang.dtype == torch.float32 and ang.abs().max() <= math.pi + 1e-6
        exact = positions[:, None].double() * inv
        ref_cos, ref_sin = torch.cos(exact), torch.sin(exact)
        worst_ours = max(
            worst_ours,
            (ang.cos().double() - ref_cos).abs().max().item(),
            (ang.sin().double() - ref_sin).abs().max().item(),
        )
        naive = positions[:, None].float() * inv.float()  # what megatron/transformers compute
        worst_fp32 = max(worst_fp32, (naive.cos().double() - ref_cos).abs().max().item())
    assert worst_ours <= 1e-5
    assert worst_fp32 > 1e-2  # the property is real: plain fp32 angles fail it


# ----------------------------------------------------------------------------- export / round trip


ROUND_TRIP = {
    "default": RopeConfig(head_dim=64, max_position_embeddings=4096),
    "linear": RopeConfig(rope_type="linear", head_dim=64, factor=4.0, max_position_embeddings=4096),
    "ntk": RopeConfig(rope_type="ntk", head_dim=64, factor=8.0),
    "dynamic": RopeConfig(rope_type="dynamic", head_dim=64, factor=2.0, max_position_embeddings=4096),
    "yarn": RopeConfig.from_hf(published.DEEPSEEK_YARN),
    "llama3": RopeConfig.from_hf(published.LLAMA_3_1),
    "abf": RopeConfig(rope_type="abf", head_dim=128, rope_theta=500_000.0),
    "eabf": RopeConfig(rope_type="eabf", head_dim=128, rope_theta=500_000.0, original_max_position_embeddings=4096),
    "longrope": RopeConfig.from_hf(published.PHI_3_5_MINI),
    "longrope_n_hat": RopeConfig.from_hf(published.PHI_3_5_MINI).replace(n_hat=64, partial_rotary_factor=1.0),
    "partial": RopeConfig(rope_type="linear", head_dim=64, partial_rotary_factor=0.5, factor=2.0),
}


def test_every_method_has_a_round_trip_case():
    assert {rc.rope_type for rc in ROUND_TRIP.values()} == set(METHODS)


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip(name):
    rc = ROUND_TRIP[name]
    assert RopeConfig.from_hf(rc.to_hf()) == rc


@pytest.mark.parametrize("name", list(ROUND_TRIP))
@pytest.mark.parametrize("spelling", ["v5", "v4"])
@pytest.mark.parametrize("seq_len", [None, 100_000])
def test_vanilla_transformers_loads_export(name, spelling, seq_len):
    rc = ROUND_TRIP[name]
    exported = rc.to_hf()
    cfg = {"hidden_size": rc.head_dim * 4, "num_attention_heads": 4, **exported}
    cfg.setdefault("max_position_embeddings", 8192)
    if spelling == "v5":
        cfg.pop("rope_scaling")
    else:
        cfg.pop("rope_parameters")
    cfg.pop("megarope", None)  # vanilla transformers must not need it
    config_cls = Phi3Config if rc.rope_type == "longrope" else LlamaConfig
    hf_inv, hf_att = hf_rope(cfg, seq_len, config_cls)
    torch.testing.assert_close(hf_inv.double(), rc.inv_freq(seq_len), rtol=1e-6, atol=0)
    assert hf_att == pytest.approx(rc.attention_factor(seq_len), rel=1e-6)


# ----------------------------------------------------------------------------- validation


BAD = [
    ({"rope_type": "nope"}, "rope_type"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, "low_freq_factor"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": [1.0] * 32}, "long_factor"),
    (
        {"rope_type": "longrope", "original_max_position_embeddings": 256, "long_factor": [2.0] * 31, "short_factor": [1.0] * 32},
        "long_factor",
    ),
    (
        {"rope_type": "longrope", "original_max_position_embeddings": 256, "long_factor": [2.0] * 32, "short_factor": [0.0] * 32, "factor": 4.0},
        "short_factor",
    ),
    (
        {"rope_type": "longrope", "original_max_position_embeddings": 4096, "max_position_embeddings": 4096, "long_factor": [2.0] * 32, "short_factor": [1.0] * 32},
        "original_max_position_embeddings",
    ),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "long_factor": [2.0] * 32, "short_factor": [1.0] * 32, "factor": 4.0, "n_hat": -1}, "n_hat"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "long_factor": [2.0] * 32, "short_factor": [1.0] * 32, "factor": 4.0, "n_hat": 2.5}, "n_hat"),
    ({"rope_type": "eabf"}, "original_max_position_embeddings"),
    ({"rope_type": "default", "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_type": "default", "bogus": 1}, "bogus"),
]


@pytest.mark.parametrize("values, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_validation_names_the_field(values, field):
    with pytest.raises(RopeConfigError) as err:
        RopeConfig.from_dict({"head_dim": 64, **values})
    assert err.value.field == field and str(err.value).startswith(field)


def test_from_hf_errors_name_the_field():
    with pytest.raises(RopeConfigError, match="^head_dim"):
        RopeConfig.from_hf({"rope_theta": 10_000.0})
    with pytest.raises(RopeConfigError, match="^rope_type"):
        RopeConfig.from_hf({**model_cfg(64, 1e4, 4096), "rope_scaling": {"type": "unknown", "factor": 2.0}})


def test_non_monotone_published_factors_still_load():
    cfg = copy.deepcopy(published.PHI_3_5_MINI)
    cfg["rope_scaling"]["long_factor"][5] = 0.9 * cfg["rope_scaling"]["long_factor"][4]
    assert RopeConfig.from_hf(cfg).long_factor[5] < RopeConfig.from_hf(cfg).long_factor[4]


# ----------------------------------------------------------------------------- adding a method


@pytest.fixture
def scaled_base_method():
    """The worked example of docs/methods.md, "Adding a method", registered for one test only."""

    def scaled_base(rc, seq_len):
        """ABF with the new base given as a multiple: base = rope_theta * factor."""
        return base_inv_freq(rc.rope_theta * rc.factor, rc.rotary_dim), 1.0

    def check(rc):
        if rc.factor > 1000:
            raise RopeConfigError("factor", f"must be <= 1000 for rope_type 'scaled_base', got {rc.factor}")

    register("scaled_base", scaled_base, required=("factor",), validate=check, hf_aliases=("base_multiple",))
    yield "scaled_base"
    del METHODS["scaled_base"]


def test_a_registered_method_works_through_rope_config(scaled_base_method):
    cfg = model_cfg(64, 10_000.0, 4096, rope_scaling={"type": "base_multiple", "factor": 8.0})
    rc = RopeConfig.from_hf(cfg)
    assert rc.rope_type == scaled_base_method and rc.factor == 8.0
    torch.testing.assert_close(rc.inv_freq(), closed_form_inv_freq(80_000.0, 64), rtol=1e-12, atol=0)
    # export: transformers has no such type, so the same frequencies as a plain base, plus the
    # full config under the megarope key for the round trip
    exported = rc.to_hf()
    assert exported["rope_parameters"]["rope_type"] == "default"
    assert exported["rope_theta"] == pytest.approx(80_000.0, rel=1e-12)
    assert exported["megarope"]["rope_type"] == scaled_base_method
    assert RopeConfig.from_hf(exported) == rc
    vanilla = {**model_cfg(64, 1.0, 4096), **exported}
    vanilla.pop("megarope")
    vanilla.pop("rope_scaling")
    torch.testing.assert_close(hf_rope(vanilla)[0].double(), rc.inv_freq(), rtol=1e-6, atol=0)
    # the generic checks (required fields) and the method's own, each naming the field
    for values in ({}, {"factor": 2000.0}):
        with pytest.raises(RopeConfigError) as err:
            RopeConfig.from_dict({"rope_type": scaled_base_method, "head_dim": 64, **values})
        assert err.value.field == "factor"
    with pytest.raises(RopeConfigError, match="^n_hat: only used by rope_type 'longrope'"):
        RopeConfig(rope_type=scaled_base_method, head_dim=64, factor=2.0, n_hat=4)


def test_rope_errors_are_megarope_errors():
    with pytest.raises(MegaropeError) as err:
        RopeConfig(rope_type="linear")
    assert isinstance(err.value, RopeConfigError) and err.value.field == "factor"


def test_longrope_length_sets_switch_by_length_and_round_trip_through_the_export():
    """Per-length short sets (paper §3.3: re-searched at the original window and at 2x): the
    export's transformers short_factor is the original window's set, the others ride under the
    megarope key and come back."""
    half = 8
    long, at_window, at_twice = (tuple(1.0 + k * i / half for i in range(half)) for k in (7.0, 1.0, 2.0))
    rc = RopeConfig(rope_type="longrope", head_dim=16, max_position_embeddings=1024,
                    original_max_position_embeddings=128, long_factor=long, short_factor=at_window,
                    n_hat=4, short_n_hat=0, length_sets=((128, 0, at_window), (256, 2, at_twice)))
    assert rc.factor_set(100) == (at_window, 0)
    assert rc.factor_set(256) == (at_twice, 2)
    assert rc.factor_set(257) == (long, 4)
    assert torch.equal(rc.inv_freq(200), base_inv_freq(10_000.0, 16) / torch.tensor(at_twice, dtype=torch.float64))
    # n-hat of the set: the first 2 positions of a 256-token input keep the unscaled angles
    angles = rc.angles(torch.arange(256))
    plain = RopeConfig(head_dim=16).angles(torch.arange(256))
    assert torch.equal(angles[:2], plain[:2]) and not torch.equal(angles[2:4], plain[2:4])
    exported = rc.to_hf()
    assert exported["rope_parameters"]["short_factor"] == list(at_window)
    assert exported["megarope"]["length_sets"][1] == [256, 2, list(at_twice)]
    assert RopeConfig.from_hf(json.loads(json.dumps(exported))) == rc


@pytest.mark.parametrize("changes, field", [
    ({"length_sets": ((256, 0, (1.0,) * 8), (128, 0, (1.0,) * 8))}, "length_sets"),
    ({"length_sets": ((128, 0, (1.0,) * 7),)}, "length_sets"),
    ({"rope_type": "linear", "factor": 2.0, "short_n_hat": 0}, "short_n_hat"),
    ({"rope_type": "linear", "factor": 2.0, "n_hat_attention_factor": False}, "n_hat_attention_factor"),
])
def test_bad_length_sets_fail_naming_the_field(changes, field):
    values = dict(rope_type="longrope", head_dim=16, original_max_position_embeddings=128, factor=8.0,
                  long_factor=(2.0,) * 8, short_factor=(1.0,) * 8)
    if changes.get("rope_type") == "linear":
        values = dict(head_dim=16)
    with pytest.raises(RopeConfigError) as err:
        RopeConfig(**{**values, **changes})
    assert err.value.field == field
