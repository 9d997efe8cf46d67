"""Packed (THD) batches: two documents packed in one row give each document's own per-token losses.

The packed row goes through ``megarope.mcore.context_parallel.pack_thd`` (documents padded to a
multiple of 2·cp, ``PackedSeqParams`` with real and padded offsets) into a megarope GPTModel; each
document alone goes in as a plain [1, s] batch. Equal within 1e-5 means attention stays within a
document and RoPE positions, LongRoPE's n-hat switch and the entropy-aware query scale restart at
each document, under CP=1 and CP=2 (the second document starts at an odd offset and both get
padded under CP=2). Documents are longer than the original window, so the long factors and the
position-dependent query scale are in play.
"""

import pytest
import torch
from _launch import run_distributed

from megarope.rope.config import RopeConfig

VOCAB, WINDOW, HEAD_DIM = 64, 16, 16
LENGTHS = (22, 19)  # tokens per document; neither a multiple of 4 (2*cp at CP=2)
RTOL = 1e-5
METHODS = {
    "longrope": RopeConfig(rope_type="longrope", head_dim=HEAD_DIM, original_max_position_embeddings=WINDOW,
                           max_position_embeddings=4 * WINDOW, n_hat=4,
                           long_factor=(1.0, 1.2, 1.6, 2.2, 2.9, 3.5, 4.0, 4.4), short_factor=(1.0,) * 8),
    "eabf": RopeConfig(rope_type="eabf", head_dim=HEAD_DIM, rope_theta=500_000.0,
                       original_max_position_embeddings=WINDOW, unscaled_layers=1),
}


def _documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in LENGTHS]


def _model(rope: RopeConfig):
    from megarope.mcore.spec import gpt_model, transformer_config
    from megarope.mcore.weights import initial_weights, load_full_weights

    config = transformer_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=HEAD_DIM, ffn_hidden_size=128,
                                context_parallel_size=torch.distributed.get_world_size())
    model = gpt_model(config, rope, vocab_size=VOCAB, max_sequence_length=256)
    # large weights so that attention (and so every position effect) really moves the losses
    load_full_weights(model, initial_weights(model, seed=5, std=0.2))
    return model.eval()


def _packed_batch(docs: list[torch.Tensor]) -> dict:
    lengths = [len(d) - 1 for d in docs]
    return {"tokens": torch.cat([d[:-1] for d in docs])[None], "labels": torch.cat([d[1:] for d in docs])[None],
            "loss_mask": torch.ones(1, sum(lengths)),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seqlens": torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)}


def _run(cp: int) -> dict:
    """Per method: this rank's packed per-token losses and loss mask, the padded offsets; at CP=1
    also each document alone and the two documents naively concatenated (no THD)."""
    from megatron.core import parallel_state

    from megarope.mcore import parallel
    from megarope.mcore.context_parallel import pack_thd

    parallel.initialize(cp=cp)
    try:
        out, docs = {}, _documents()
        for name, rope in METHODS.items():
            model = _model(rope)
            local, params = pack_thd(_packed_batch(docs), cp, parallel_state.get_context_parallel_rank(),
                                     parallel_state.get_context_parallel_group())
            with torch.no_grad():
                loss = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                             packed_seq_params=params)
                row = {"packed": loss[0], "mask": local["loss_mask"][0], "cu_padded": params.cu_seqlens_q_padded}
                if cp == 1:
                    row["alone"] = [model(d[:-1][None], torch.arange(len(d) - 1)[None], None, labels=d[1:][None])[0]
                                    for d in docs]
                    batch = _packed_batch(docs)
                    row["naive"] = model(batch["tokens"], torch.arange(sum(LENGTHS))[None], None,
                                         labels=batch["labels"])[0]
            out[name] = row
        return out
    finally:
        parallel.destroy()


def _real_tokens(ranks: list[dict], cp: int) -> torch.Tensor:
    """The packed losses of the real tokens in global order, from every CP rank's local part."""
    from megarope.mcore.context_parallel import cp_local_indices_thd

    cu_padded = ranks[0]["cu_padded"]
    total = int(cu_padded[-1])
    loss, mask = torch.zeros(total), torch.zeros(total)
    for rank, part in enumerate(ranks):
        index = cp_local_indices_thd(cu_padded, cp, rank) if cp > 1 else torch.arange(total)
        loss[index], mask[index] = part["packed"], part["mask"]
    return loss[mask.bool()]


@pytest.fixture(scope="module")
def runs():
    return {1: run_distributed(_run, 1, 1), 2: run_distributed(_run, 2, 2)}


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_packed_documents_equal_each_alone(runs, method, cp):
    alone = torch.cat(runs[1][0][method]["alone"])
    packed = _real_tokens([rank[method] for rank in runs[cp]], cp)
    assert packed.shape == alone.shape == (sum(LENGTHS),)
    torch.testing.assert_close(packed, alone, rtol=RTOL, atol=0)
    if cp == 2:  # padded to multiples of 4: 22 -> 24, 19 -> 20
        assert runs[cp][0][method]["cu_padded"].tolist() == [0, 24, 44]


@pytest.mark.parametrize("method", list(METHODS))
def test_without_packing_the_second_document_sees_the_first(runs, method):
    # the check above is sensitive: a plain concatenation gives the second document other losses
    row = runs[1][0][method]
    second = slice(LENGTHS[0], None)
    assert (row["naive"][second] - row["alone"][1]).abs().max() > 1e-3
