"""megarope on a real pretrained model: SmolLM2-135M-Instruct (the ``smollm2`` fixture) through
``megarope.from_hf`` gives transformers' logits on real text, plain and with scaled RoPE."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import megarope

SEQ = 1024
# a scaled RoPE as a checkpoint's config.json would carry it; the model's window is 8192
SCALINGS = {
    "default": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    # a window of 512 makes the 1024-token input take the long factors; the short ones differ
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 512,
                 "long_factor": [1.0 + 0.1 * i for i in range(32)],
                 "short_factor": [1.0 + 0.01 * i for i in range(32)]},
}


@pytest.fixture(scope="module")
def ids(smollm2):
    """The first SEQ tokens of a standard library file, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    text = (Path(sysconfig.get_paths()["stdlib"]) / "inspect.py").read_text()
    tokens = AutoTokenizer.from_pretrained(smollm2)(text)["input_ids"]
    assert len(tokens) > SEQ
    return torch.tensor(tokens[:SEQ])[None]


def _folder(smollm2: Path, tmp_path: Path, scaling: dict | None) -> Path:
    """The model with ``scaling`` in its config.json (weights and tokenizer linked, not copied)."""
    if scaling is None:
        return smollm2
    for file in smollm2.iterdir():
        if file.name != "config.json":
            (tmp_path / file.name).symlink_to(file)
    config = json.loads((smollm2 / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config["rope_parameters"]["rope_theta"], **scaling}
    config["max_position_embeddings"] = 16384
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def plain_logits(smollm2, ids):
    return _transformers_logits(smollm2, ids)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_from_hf_logits_equal_transformers_on_real_text(smollm2, tmp_path, ids, plain_logits, name):
    folder = _folder(smollm2, tmp_path, SCALINGS[name])
    ref = plain_logits if name == "default" else _transformers_logits(folder, ids)
    model = megarope.from_hf(folder)
    with torch.no_grad():
        out = model(ids, torch.arange(SEQ)[None], None)
    assert out.shape == ref.shape == (1, SEQ, 49152)
    tolerance = 1e-3 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tolerance
    # the model predicts this text (a broken import would not), and the scaling shows in the logits
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
    assert nll.exp().item() < 20
    if name != "default":
        assert (ref - plain_logits).abs().max().item() > 100 * tolerance
