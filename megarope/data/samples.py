"""Documents → fixed-length samples: tokenization (BOS + text + EOS), packing or truncation for
language modelling, one conversation per sample with its assistant mask for SFT.

One sample (``s = seq_len``)::

    tokens        int64   [s]
    labels        int64   [s]    next token; pad id where there is none
    loss_mask     float32 [s]    1 on the labels that are trained on, 0 on padding
    position_ids  int64   [s]
    cu_seqlens    int32   [n+1]  packed LM with reset_position_ids only: document starts in the sample

With ``data.retrieval_share`` r > 0 (LM only), synthetic retrieval sequences
(:class:`megarope.data.retrieval.RetrievalSamples`, filler cut from the split's own windows) follow
the text samples: N text samples become N + round(N·r/(1−r)), a share r of them retrieval (r = 1:
N retrieval samples and no text).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from megarope.data.chat import messages, render_conversation
from megarope.data.config import DataConfig, DataError, check_config
from megarope.data.retrieval import RetrievalSamples
from megarope.data.sources import content_column, load_documents
from megarope.data.tokenizer import Tokenizer, load_tokenizer


def _token_docs(ds, column: str, tok: Tokenizer, min_tokens: int) -> Iterator[np.ndarray]:
    """BOS + text + EOS per document (no BOS where the tokenizer has none), shorter ones skipped."""
    for _, ids in _indexed_token_docs(ds, column, tok, min_tokens):
        yield ids


def _indexed_token_docs(ds, column: str, tok: Tokenizer, min_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
    bos = [tok.bos_id] if tok.bos_id is not None else []
    index = 0
    for batch in ds.iter(batch_size=64):
        for text in batch[column]:
            ids = bos + tok.encode(text) + [tok.eos_id]
            if len(ids) >= min_tokens:
                yield index, np.asarray(ids, dtype=np.int32)
            index += 1


def eval_documents(dataset, tokenizer: Tokenizer, length: int, num_docs: Optional[int], text_key: str = "text",
                   used: Optional[list] = None):
    """``[num_docs, length]`` int64: the first ``length`` tokens (from BOS) of each document that has
    at least that many, in dataset order; shorter ones are skipped. ``num_docs=None`` takes all.
    ``used`` (a list) receives the taken documents' ids (:func:`document_id`), for the record."""
    docs = []
    for index, ids in _indexed_token_docs(dataset, text_key, tokenizer, length):
        docs.append(torch.from_numpy(ids[:length]).long())
        if used is not None:
            used.append(document_id(dataset, index))
        if num_docs is not None and len(docs) == num_docs:
            break
    if not docs or (num_docs is not None and len(docs) < num_docs):
        wanted = f"but num_docs={num_docs} were requested" if num_docs is not None else "in the dataset"
        raise DataError("data.source", f"only {len(docs)} documents have at least length={length} tokens "
                        f"{wanted}; lower the length or use longer documents")
    return torch.stack(docs)


def document_id(dataset, index: int):
    """A document's ``path`` where the source has one (the built-in corpus does), else its row in ``dataset``."""
    return dataset[index]["path"] if "path" in dataset.column_names else index


class PackedSamples(torch.utils.data.Dataset):
    """Sample ``i`` is the window ``stream[i*s : i*s+s+1]`` of the concatenated documents (the last
    token is the last label). ``doc_start`` marks the first token of every document."""

    def __init__(self, stream: np.ndarray, doc_start: np.ndarray, seq_len: int, reset_position_ids: bool):
        self.stream, self.doc_start = stream, doc_start
        self.seq_len, self.reset_position_ids = seq_len, reset_position_ids

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = self.seq_len
        window = torch.from_numpy(self.stream[i * s : i * s + s + 1]).long()
        sample = {"tokens": window[:-1], "labels": window[1:]}
        if not self.reset_position_ids:
            sample["position_ids"] = torch.arange(s)
            sample["loss_mask"] = torch.ones(s)
            return sample
        starts = torch.from_numpy(self.doc_start[i * s : i * s + s + 1])
        seg = starts[:-1].clone()
        seg[0] = True  # a document cut by the window start is a sequence of its own
        begin = torch.nonzero(seg).flatten()
        cu = torch.cat([begin, torch.tensor([s])])
        sample["position_ids"] = torch.arange(s) - torch.repeat_interleave(begin, torch.diff(cu))
        # A document's last token has no target inside its own sequence: the next token opens another.
        sample["loss_mask"] = (~starts[1:]).float()
        sample["cu_seqlens"] = cu.to(torch.int32)
        return sample


class RowSamples(torch.utils.data.Dataset):
    """One document or conversation per sample: ``ids [N, s+1]`` (pad-filled) and the mask of the
    labels ``ids[:, 1:]`` that carry loss."""

    def __init__(self, ids: np.ndarray, label_mask: np.ndarray):
        self.ids, self.label_mask = ids, label_mask
        self.seq_len = ids.shape[1] - 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = torch.from_numpy(self.ids[i]).long()
        return {
            "tokens": row[:-1],
            "labels": row[1:],
            "loss_mask": torch.from_numpy(self.label_mask[i]).float(),
            "position_ids": torch.arange(self.seq_len),
        }


Samples = Union[PackedSamples, RowSamples, RetrievalSamples, torch.utils.data.ConcatDataset]


def _row(ids: Sequence[int], flags: Sequence[bool], s: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut to ``s+1`` tokens, pad; ``flags[j]`` says whether token j may be a trained label."""
    n = min(len(ids), s + 1)
    row = np.full(s + 1, pad, dtype=np.int32)
    row[:n] = ids[:n]
    mask = np.zeros(s, dtype=bool)
    mask[: n - 1] = np.asarray(flags[1:n], dtype=bool)
    return row, mask


def _where(cfg: DataConfig, split: str) -> str:
    skipped = f" (after data.min_tokens={cfg.min_tokens})" if cfg.min_tokens else ""
    return f"the {split!r} split of data.source={cfg.source!r}{skipped}"


def _packed(docs: Iterator[np.ndarray], cfg: DataConfig, split: str) -> PackedSamples:
    s = cfg.seq_len
    need = None if cfg.num_samples is None else cfg.num_samples * s + 1
    chunks, total = [], 0
    for ids in docs:  # stop tokenizing once enough tokens are in
        chunks.append(ids)
        total += len(ids)
        if need is not None and total >= need:
            break
    if need is not None and total < need:
        raise DataError("data.num_samples", f"{cfg.num_samples} windows of data.seq_len={s} take {need} tokens "
                        f"but {_where(cfg, split)} has only {total}")
    if total < s + 1:
        raise DataError("data.seq_len", f"one window of {s} takes {s + 1} tokens but {_where(cfg, split)} has "
                        f"only {total}")
    count = cfg.num_samples or (total - 1) // s
    lengths = np.array([len(c) for c in chunks])
    doc_start = np.zeros(total, dtype=bool)
    doc_start[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    end = count * s + 1
    return PackedSamples(np.concatenate(chunks)[:end], doc_start[:end], s, cfg.reset_position_ids)


def _collect_rows(rows: Iterator[tuple[np.ndarray, np.ndarray]], cfg: DataConfig, what: str, split: str):
    ids, masks = [], []
    for row, mask in rows:
        ids.append(row)
        masks.append(mask)
        if cfg.num_samples is not None and len(ids) == cfg.num_samples:
            break
    if not ids or (cfg.num_samples is not None and len(ids) < cfg.num_samples):
        raise DataError("data.num_samples", f"{cfg.num_samples}: only {len(ids)} {what} in {_where(cfg, split)}")
    return RowSamples(np.stack(ids), np.stack(masks))


def _truncated(docs: Iterator[np.ndarray], cfg: DataConfig, pad: int, split: str) -> RowSamples:
    s = cfg.seq_len
    # A document of exactly s tokens has no label for its last position: padded, no loss there.
    rows = (_row(ids, [True] * min(len(ids), s + 1), s, pad) for ids in docs if len(ids) >= s)
    return _collect_rows(rows, cfg, f"documents have at least data.seq_len={s} tokens", split)


def _sft(ds, column: str, tok: Tokenizer, cfg: DataConfig, split: str) -> RowSamples:
    def rows():
        for batch in ds.iter(batch_size=64):
            for conversation in batch[column]:
                ids, flags = render_conversation(tok, messages(conversation))
                if len(ids) < cfg.min_tokens:
                    continue
                row, mask = _row(ids, flags, cfg.seq_len, tok.pad_id)
                if mask.any():  # an all-masked sample (assistant turns past seq_len) trains nothing
                    yield row, mask

    return _collect_rows(rows(), cfg, f"conversations with assistant tokens within data.seq_len={cfg.seq_len}", split)


def build_samples(cfg: DataConfig, split: str = "train", tokenizer: Optional[Tokenizer] = None) -> Samples:
    """Samples of ``split`` as ``cfg`` asks (LM packed/truncated, or SFT); see the module docstring."""
    check_config(cfg)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    ds = load_documents(cfg, split)
    column = content_column(ds, cfg)
    if cfg.kind == "sft":
        return _sft(ds, column, tok, cfg, split)
    docs = _token_docs(ds, column, tok, cfg.min_tokens)
    text = _packed(docs, cfg, split) if cfg.mode == "packed" else _truncated(docs, cfg, tok.pad_id, split)
    if not cfg.retrieval_share:
        return text
    share = cfg.retrieval_share
    count = len(text) if share == 1 else round(len(text) * share / (1 - share))
    # the filler is cut from the text samples; the shuffling sampler interleaves the two kinds
    retrieval = RetrievalSamples(tok, text, cfg.seq_len, count, cfg.seed,
                                 packed=cfg.mode == "packed" and cfg.reset_position_ids, kind=cfg.retrieval_kind,
                                 copy_gap=cfg.copy_gap, copy_gap_ramp=tuple(cfg.copy_gap_ramp))
    return retrieval if share == 1 else torch.utils.data.ConcatDataset([text, retrieval])


def lm_sample(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict:
    """A [1, L-1] language-modelling sample from an [L] token row (next-token labels)."""
    tokens = tokens.reshape(-1)
    mask = torch.ones(tokens.numel() - 1) if loss_mask is None else loss_mask.reshape(-1)[1:].float()
    return {"tokens": tokens[None, :-1], "labels": tokens[None, 1:], "loss_mask": mask[None],
            "position_ids": torch.arange(tokens.numel() - 1)[None]}
