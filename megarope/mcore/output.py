"""Per-token NLL and argmax of a GPTModel without materialising [s, vocab] logits.

Evaluation needs, per token, the NLL of its label and, at a few positions (passkey answer tokens),
the argmax. GPTModel's own output path builds the whole [s, b, vocab] logits (and transformers'
oracle the fp32 copy): 3.2 GB at 16k tokens and a 49k vocabulary, 64 GB at 128k × 128k. Here the
decoder's output [s, b, h] is taken instead (:func:`decoder_output`) and sent through the output
weight a chunk of tokens at a time; each chunk's logits stay vocab-parallel over TP
(megatron's ``vocab_parallel_cross_entropy`` for the NLL, a max exchange for the argmax), so peak
memory is chunk × vocab / tp whatever the length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, vocab_parallel_cross_entropy
from megarope.mcore.weights import mask_vocab_shard

DEFAULT_CHUNK = 1024


@contextlib.contextmanager
def decoder_output(model) -> Iterator[None]:
    """Within the block, ``model(...)`` (a GPTModel) returns the decoder's output [s, b, h] (after
    the final norm; [s/tp, b, h] under sequence parallelism) instead of logits or losses.

    GPTModel returns exactly that on pipeline stages without ``post_process`` (its ``_postprocess``
    checks the flag before the output layer), so the flag is lowered for the call and restored.
    """
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def _output_weight(model) -> torch.Tensor:
    """This TP rank's vocabulary shard of the output weight [vocab/tp, h], as GPTModel uses it
    (GPTModel builds its output layer with bias=False, so the weight is all there is)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _vocab_parallel_argmax(logits: torch.Tensor, group) -> torch.Tensor:
    """Global argmax over the vocabulary of [n, vocab/tp] shards, the first index on ties (as torch.argmax)."""
    local = logits.argmax(-1)
    value = logits.gather(-1, local[:, None]).squeeze(-1)
    size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if size == 1:
        return local
    index = local + dist.get_rank(group) * logits.shape[-1]
    values = [torch.empty_like(value) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(values, value.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    # shards hold ascending vocabulary ranges: the first maximal rank has the first maximal index
    best = torch.stack(values).argmax(0)
    return torch.stack(indices).gather(0, best[None]).squeeze(0)


def token_nll_and_argmax(model, hidden: torch.Tensor, labels: torch.Tensor, predict: torch.Tensor | None = None,
                         chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [b, s] float32, predictions [b, s] int64) from the decoder output of :func:`decoder_output`.

    ``labels`` [b, s]; ``predict`` [b, s] bool: where the argmax is wanted (None: nowhere);
    predictions are -1 elsewhere. Every rank of the TP group calls this together. The logits are
    computed in the weight's dtype and the NLL in float32, as GPTModel's labels path does.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if model.config.sequence_parallel:
        # the decoder leaves each TP rank a slice of the sequence; h is small next to the vocabulary
        hidden = gather_from_sequence_parallel_region(hidden)
    weight = _output_weight(model)
    group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    labels_sb = labels.transpose(0, 1)
    predict_sb = None if predict is None else predict.transpose(0, 1)
    nll = torch.empty(labels_sb.shape, dtype=torch.float32, device=hidden.device)
    predictions = torch.full(labels_sb.shape, -1, dtype=torch.long, device=hidden.device)
    # one logits buffer for every chunk: a fresh [c, b, vocab/tp] allocation per chunk is new memory
    # each time (page faults on CPU: ~0.3 s of a 4k-token forward of a 49k vocabulary)
    buffer = hidden.new_empty((min(chunk, hidden.shape[0]), *hidden.shape[1:-1], weight.shape[0]))
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        # [c, b, vocab/tp]; padding ids of a padded vocabulary at -inf, as the output layer does
        logits = torch.matmul(hidden[start:end], weight.t(), out=buffer[: end - start])
        logits = mask_vocab_shard(model, logits.float())
        if predict_sb is not None:
            rows = predict_sb[start:end].nonzero(as_tuple=True)
            # every TP rank has the same mask, so the exchange inside has the same size on all
            predictions[start:end][rows] = _vocab_parallel_argmax(logits[rows], group)
        # after the argmax: megatron's cross-entropy overwrites the logits in place
        nll[start:end] = vocab_parallel_cross_entropy(logits, labels_sb[start:end].contiguous())
    return nll.transpose(0, 1), predictions.transpose(0, 1)


__all__ = ["DEFAULT_CHUNK", "decoder_output", "token_nll_and_argmax"]
