"""Chunked NLL and argmax under TP=2 (vocab-parallel output weight), with and without sequence
parallelism, equal to transformers' full fp32 logits of the same checkpoint."""

import torch
from _launch import run_distributed

VOCAB, SEQ = 96, 48  # vocabulary split evenly over TP=2, sequence over SP=2


def _tp2_stats(folder, tokens, labels, predict):
    import megarope
    from megarope.mcore import parallel
    from megarope.mcore.output import decoder_output, token_nll_and_argmax

    parallel.initialize(tp=2)
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    results = []
    for sp in (False, True):
        model = megarope.from_hf(folder, sequence_parallel=sp)
        with torch.no_grad(), decoder_output(model):
            hidden = model(tokens, positions, None)
        assert hidden.shape[0] == (SEQ // 2 if sp else SEQ)
        with torch.no_grad():
            results.append(token_nll_and_argmax(model, hidden, labels, predict=predict, chunk=5))
    return results


def test_chunked_stats_under_tp2_equal_full_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, VOCAB, (2, 2, SEQ), generator=gen)
    predict = torch.rand(2, SEQ, generator=gen) < 0.3
    with torch.no_grad():
        logits = hf(tokens).logits.float()
    ref_nll = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ref_argmax = logits.argmax(-1)
    for rank in run_distributed(_tp2_stats, 2, str(tmp_path), tokens, labels, predict):
        for nll, predictions in rank:  # TP=2, then TP=2 + SP
            torch.testing.assert_close(nll, ref_nll, rtol=0, atol=1e-5)
            assert torch.equal(predictions[predict], ref_argmax[predict])
            assert (predictions[~predict] == -1).all()
