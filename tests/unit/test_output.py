"""Per-token NLL and argmax from the decoder output, chunk by chunk, against full logits."""

import math

import pytest
import torch

from megarope import RopeConfig
from megarope.mcore import parallel
from megarope.mcore.output import decoder_output, token_nll_and_argmax
from megarope.mcore.spec import gpt_model, transformer_config

VOCAB, SEQ = 96, 48
ROPE = RopeConfig(rope_type="yarn", head_dim=16, factor=4.0, original_max_position_embeddings=16)


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    parallel.initialize()
    yield


def full_logits_stats(logits, labels):
    """The computation it replaces: fp32 [b, s, vocab] log-softmax and argmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1), logits.argmax(-1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, SEQ, 1024])
def test_chunked_nll_and_argmax_equal_full_logits(chunk, tied):
    config = transformer_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=16, ffn_hidden_size=128, init_method_std=0.2)
    torch.manual_seed(0)
    model = gpt_model(config, ROPE, vocab_size=VOCAB, max_sequence_length=256,
                      share_embeddings_and_output_weights=tied).eval()
    gen = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, VOCAB, (2, 2, SEQ), generator=gen)
    positions = torch.arange(SEQ)[None].expand(2, -1)
    predict = torch.rand(2, SEQ, generator=gen) < 0.3
    with torch.no_grad():
        logits = model(tokens, positions, None)
        with decoder_output(model):
            hidden = model(tokens, positions, None)
        assert model.post_process  # restored
        assert hidden.shape == (SEQ, 2, 64)
        nll, predictions = token_nll_and_argmax(model, hidden, labels, predict=predict, chunk=chunk)
        labels_path = model(tokens, positions, None, labels=labels)  # megatron's own NLL
    ref_nll, ref_argmax = full_logits_stats(logits, labels)
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=1e-5)
    torch.testing.assert_close(nll, labels_path, rtol=0, atol=1e-5)
    assert torch.equal(predictions[predict], ref_argmax[predict])
    assert (predictions[~predict] == -1).all()  # no argmax where none was asked for
    assert (ref_argmax[predict] != labels[predict]).any()  # the argmax is not trivially the label


def test_engine_score_equals_full_logits():
    """The product path (Engine.score through megatron's schedule) against full fp32 logits."""
    from megarope.data.samples import lm_sample
    from megarope.run.config import Config, ModelConfig
    from megarope.run.engine import Engine

    engine = Engine(Config(), RopeConfig(head_dim=32), vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, VOCAB, (SEQ + 1,), generator=gen) for _ in range(2)]
    answer = torch.zeros(SEQ + 1)
    answer[-6:] = 1  # a passkey-like mask: the last five labels only
    samples = [lm_sample(rows[0]), lm_sample(rows[1], answer)]
    # the eval's beyond-window split: a part of the scored tokens, summed from the same forward
    for sample in samples:
        sample["part_mask"] = (sample["position_ids"] >= SEQ - 8).float()
    scores = engine.score(samples)
    for sample, row in zip(samples, scores):
        with torch.no_grad():
            logits = engine.model(sample["tokens"], sample["position_ids"], None)
        nll, argmax = full_logits_stats(logits, sample["labels"])
        mask = sample["loss_mask"]
        assert abs(row[0].item() - (nll * mask).sum().item()) <= 1e-5 * max(1.0, row[0].item())
        assert row[1].item() == mask.sum().item()
        assert row[2].item() == ((argmax != sample["labels"]).float() * mask).sum().item()
        part = mask * sample["part_mask"]
        assert abs(row[3].item() - (nll * part).sum().item()) <= 1e-5 * max(1.0, row[3].item())
        # the whole answer of the second sample lies in the last 8 positions
        assert row[4].item() == part.sum().item() == (8 if sample is samples[0] else mask.sum().item())
    # model.core_attention=local reaches the model: megatron's local attention, same scores
    from megarope.mcore.attention import SDPAAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    local = Engine(Config(model=ModelConfig(core_attention="local")), RopeConfig(head_dim=32), vocab_size=VOCAB)
    inner = [local.model, engine.model]
    inner = [m.decoder.layers[0].self_attention.core_attention.inner for m in inner]
    assert isinstance(inner[0], DotProductAttention) and isinstance(inner[1], SDPAAttention)
    torch.testing.assert_close(local.score(samples), scores, rtol=1e-6, atol=1e-5)


def test_eval_stage_splits_perplexity_at_the_window(tmp_path):
    """Past the model's window an eval row also holds the perplexity of the tokens inside the window
    and beyond it, from the same forward: against the full logits of the same (seeded) model."""
    from megarope.data.samples import eval_documents
    from megarope.data.sources import load_documents
    from megarope.data.tokenizer import load_tokenizer
    from megarope.eval.metrics import read_metrics
    from megarope.run.config import Config, EvalConfig, RunConfig
    from megarope.run.engine import Engine
    from megarope.run.pipeline import Pipeline

    length = 256  # twice the tiny model's 128-token window
    cfg = Config(run=RunConfig(dir=str(tmp_path)), eval=EvalConfig(lengths=[length], num_docs=1),
                 stages=[{"name": "eval", "kind": "eval"}])
    Pipeline(cfg).run()
    row = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "eval")

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    rows = eval_documents(load_documents(cfg.data, "eval"), tokenizer, length + 1, 1)
    engine = Engine(cfg, RopeConfig(head_dim=32, max_position_embeddings=128), tokenizer.vocab_size)
    with torch.no_grad():
        logits = engine.model(rows[:, :-1], torch.arange(length)[None], None)
    nll = full_logits_stats(logits, rows[:, 1:])[0][0].double()
    beyond = torch.arange(length) + 1 >= 128  # label j is token j + 1
    assert row["window"] == 128
    for key, part in (("ppl", slice(None)), ("ppl_window", ~beyond), ("ppl_beyond", beyond)):
        assert row[key] == pytest.approx(math.exp(nll[part].mean().item()), rel=1e-4), key
    assert row["ppl_window"] != pytest.approx(row["ppl_beyond"], rel=1e-3)
