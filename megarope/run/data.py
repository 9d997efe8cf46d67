"""Data layer: documents → fixed-length samples → deterministic, resumable batches.

Documents come through Hugging Face ``datasets``: ``DataConfig.source`` is ``"builtin"`` (the Python
standard library's own ``.py`` files, no download), a local file or folder (``text``, ``json`` or
``parquet`` builder; ``.txt`` files are one document each), or the name of a hub dataset already in
the HF cache (offline).

One sample (``s = seq_len``)::

    tokens        int64   [s]
    labels        int64   [s]    next token; pad id where there is none
    loss_mask     float32 [s]    1 on the labels that are trained on, 0 on padding
    position_ids  int64   [s]
    cu_seqlens    int32   [n+1]  packed LM with reset_position_ids only: document starts in the sample

A batch from :class:`DataIterator` stacks these to ``[b, s]``; its ``cu_seqlens`` are the document
offsets over the ``b*s`` tokens flattened row by row, as a packed THD path takes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from megarope.atomic import atomic_output
from megarope.run.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

FORMATS = ("text", "json", "parquet")
_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# datasets decompresses these itself, so "x.jsonl.gz" is json.
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_BUILTIN_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLAIN_PREFIX = {"user": "User: ", "system": "System: "}


@dataclass
class DataConfig:
    """Single source of data defaults; plain types so Hydra structured configs can take it as is."""

    source: str = "builtin"  # "builtin", a local file/folder, or a cached hub dataset name
    format: str = "auto"  # "text" | "json" | "parquet" | "auto" (by file suffix)
    kind: str = "lm"  # "lm" (documents) | "sft" (conversations)
    tokenizer: str = "bytes"  # "bytes" or a tokenizer/checkpoint folder
    seq_len: int = 4096
    mode: str = "packed"  # lm only: "packed" | "truncated"
    num_samples: Optional[int] = None  # None: every sample the split yields
    min_tokens: int = 0  # shorter documents/conversations (with BOS/EOS) are skipped
    text_key: str = "text"
    cache_dir: Optional[str] = None  # None: $XDG_CACHE_HOME/megarope or ~/.cache/megarope
    seed: int = 1234
    reset_position_ids: bool = False  # packed lm only: positions restart per document, cu_seqlens given
    eval_fraction: float = 0.1  # share of documents, chosen by hash, in the "eval" split


def check_config(cfg: DataConfig) -> None:
    """Raise ``ValueError`` naming the first bad field; cheap, so call it before loading anything."""
    if cfg.kind not in ("lm", "sft"):
        raise ValueError(f"data.kind={cfg.kind!r}: expected 'lm' or 'sft'")
    if cfg.mode not in ("packed", "truncated"):
        raise ValueError(f"data.mode={cfg.mode!r}: expected 'packed' or 'truncated'")
    if cfg.format not in FORMATS + ("auto",):
        raise ValueError(f"data.format={cfg.format!r}: expected one of {FORMATS + ('auto',)}")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len!r}: expected a positive integer")
    if cfg.num_samples is not None and (not isinstance(cfg.num_samples, int) or cfg.num_samples < 1):
        raise ValueError(f"data.num_samples={cfg.num_samples!r}: expected a positive integer or None")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction!r}: expected a value in [0, 1)")
    if cfg.reset_position_ids and (cfg.kind, cfg.mode) != ("lm", "packed"):
        raise ValueError(
            "data.reset_position_ids=True applies to kind='lm', mode='packed' only "
            f"(got kind={cfg.kind!r}, mode={cfg.mode!r}): other samples hold one document each"
        )


# ---------------------------------------------------------------------------------------- documents


def _cache_dir(cache_dir: Optional[str]) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "megarope"


def builtin_corpus(cache_dir: Optional[str] = None) -> str:
    """Write the standard library's ``.py`` files once as JSONL (``{"path", "text"}`` per file, sorted
    by path, test and site-packages folders left out) and return the file's path."""
    root = sysconfig.get_paths()["stdlib"]
    version = ".".join(map(str, sys.version_info[:3]))
    out = _cache_dir(cache_dir) / f"stdlib-py{version}.jsonl"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _BUILTIN_EXCLUDED_DIRS]  # prune: site-packages is huge
        rel = os.path.relpath(folder, root)
        files += [Path(rel, n).as_posix() if rel != "." else n for n in names if n.endswith(".py")]
    # several ranks may build it at once: each writes its own temp file, renamed atomically
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rel in sorted(files):
            text = Path(root, rel).read_text(encoding="utf-8", errors="replace")
            if text.strip():
                f.write(json.dumps({"path": rel, "text": text}) + "\n")
    return str(out)


def _format_of(path: Union[str, Path]) -> Optional[str]:
    name = str(path).lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _SUFFIX_FORMAT.get(os.path.splitext(name)[1])


def _load_local(path: Path, fmt: str, cfg: DataConfig):
    import datasets

    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _format_of(p))
        if fmt != "auto":
            files = [f for f in files if _format_of(f) == fmt]
        if not files:
            raise FileNotFoundError(
                f"data.source={cfg.source!r}: the folder holds no data files of data.format={fmt!r} "
                f"(suffixes {sorted(_SUFFIX_FORMAT)})"
            )
    else:
        files = [str(path)]
    if fmt == "auto":
        found = {_format_of(f) for f in files}
        if None in found:
            raise ValueError(
                f"data.format='auto' cannot tell the format of {files[0]!r} from its suffix: "
                f"set data.format to one of {FORMATS}"
            )
        if len(found) > 1:
            raise ValueError(f"data.format='auto': {cfg.source!r} mixes formats {sorted(found)}; set data.format")
        fmt = found.pop()
    extra = {"sample_by": "document"} if fmt == "text" else {}
    return datasets.load_dataset(
        fmt, data_files=files, split="train", cache_dir=str(_cache_dir(cfg.cache_dir) / "datasets"), **extra
    )


def _load_raw(cfg: DataConfig):
    if cfg.source == "builtin":
        return _load_local(Path(builtin_corpus(cfg.cache_dir)), "json", cfg)
    path = Path(os.path.expanduser(cfg.source))
    if path.exists():
        return _load_local(path, cfg.format, cfg)
    if os.path.isabs(cfg.source) or cfg.source.startswith((".", "~")) or _format_of(cfg.source):
        raise FileNotFoundError(f"data.source: dataset path {cfg.source!r} does not exist")
    import datasets

    try:
        return datasets.load_dataset(cfg.source, split="train")
    except Exception as e:
        raise FileNotFoundError(
            f"data.source={cfg.source!r} is no existing path, and loading it as a hub dataset failed "
            f"(offline it must already be in the Hugging Face cache): {e}"
        ) from e


def _content_column(ds, cfg: DataConfig) -> str:
    names = ds.column_names
    if cfg.kind == "lm":
        if cfg.text_key not in names:
            raise ValueError(f"data.text_key={cfg.text_key!r} is not a column of {cfg.source!r}; columns: {names}")
        return cfg.text_key
    for key in ("conversations", "messages"):
        if key in names:
            return key
    raise ValueError(
        f"data.kind='sft' needs a 'conversations' (ShareGPT) or 'messages' column in {cfg.source!r}; "
        f"columns: {names}"
    )


def _in_eval(key: Any, fraction: float) -> bool:
    """Stable across processes and Python versions, unlike ``hash()``."""
    text = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def load_documents(cfg: DataConfig, split: str = "train"):
    """The ``datasets.Dataset`` of documents (or conversations) of ``split``: "train", "eval" or "all".

    A document is in "eval" when the hash of its ``path`` column (if any, else its content) falls in
    the first ``eval_fraction`` of the hash range, so the split never depends on order or sharding.
    """
    check_config(cfg)
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split={split!r}: expected 'train', 'eval' or 'all'")
    ds = _load_raw(cfg)
    content = _content_column(ds, cfg)
    if split == "all":
        return ds
    key = "path" if "path" in ds.column_names else content
    want_eval, fraction = split == "eval", cfg.eval_fraction
    ds = ds.filter(lambda keys: [_in_eval(k, fraction) == want_eval for k in keys], input_columns=[key], batched=True)
    if len(ds) == 0:
        raise ValueError(
            f"data.eval_fraction={cfg.eval_fraction}: the {split!r} split of data.source={cfg.source!r} is empty"
        )
    return ds


def _token_docs(ds, column: str, tok: Tokenizer, min_tokens: int) -> Iterator[np.ndarray]:
    """BOS + text + EOS per document (no BOS where the tokenizer has none), shorter ones skipped."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for batch in ds.iter(batch_size=64):
        for text in batch[column]:
            ids = bos + tok.encode(text) + [tok.eos_id]
            if len(ids) >= min_tokens:
                yield np.asarray(ids, dtype=np.int32)


def eval_documents(dataset, tokenizer: Tokenizer, length: int, num_docs: Optional[int], text_key: str = "text"):
    """``[num_docs, length]`` int64: the first ``length`` tokens (from BOS) of each document that has
    at least that many, in dataset order; shorter ones are skipped. ``num_docs=None`` takes all."""
    docs = []
    for ids in _token_docs(dataset, text_key, tokenizer, length):
        docs.append(torch.from_numpy(ids[:length]).long())
        if num_docs is not None and len(docs) == num_docs:
            break
    if not docs or (num_docs is not None and len(docs) < num_docs):
        wanted = f"but num_docs={num_docs} were requested" if num_docs is not None else "in the dataset"
        raise ValueError(
            f"eval_documents: only {len(docs)} documents have at least length={length} tokens {wanted}; "
            "lower the length or use longer documents"
        )
    return torch.stack(docs)


# ------------------------------------------------------------------------------------------ samples


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


Samples = Union[PackedSamples, RowSamples]


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
        raise ValueError(
            f"data.num_samples={cfg.num_samples} windows of data.seq_len={s} take {need} tokens but "
            f"{_where(cfg, split)} has only {total}"
        )
    if total < s + 1:
        raise ValueError(f"data.seq_len={s}: one window takes {s + 1} tokens but {_where(cfg, split)} has only {total}")
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
        raise ValueError(
            f"data.num_samples={cfg.num_samples}: only {len(ids)} {what} in {_where(cfg, split)}"
        )
    return RowSamples(np.stack(ids), np.stack(masks))


def _truncated(docs: Iterator[np.ndarray], cfg: DataConfig, pad: int, split: str) -> RowSamples:
    s = cfg.seq_len
    # A document of exactly s tokens has no label for its last position: padded, no loss there.
    rows = (_row(ids, [True] * min(len(ids), s + 1), s, pad) for ids in docs if len(ids) >= s)
    return _collect_rows(rows, cfg, f"documents have at least data.seq_len={s} tokens", split)


# ------------------------------------------------------------------------------------- conversations


def _messages(conversation: Any) -> list[dict]:
    """ShareGPT ``{"from", "value"}`` or OpenAI ``{"role", "content"}`` turns → ``{"role", "content"}``."""
    out = []
    for turn in conversation:
        # Arrow gives every turn the union of keys seen in the file, unused ones as None.
        sharegpt = turn.get("from") is not None
        role, content = (turn["from"], turn.get("value")) if sharegpt else (turn.get("role"), turn.get("content"))
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"data.kind='sft': unsupported turn {turn!r} (roles {sorted(_ROLES)}, text content)")
        out.append({"role": _ROLES[role], "content": content})
    return out


def render_conversation(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to an assistant turn.

    With a chat template (HF tokenizers that have one) the assistant part of turn k is the text the
    template adds after ``messages[:k]`` rendered with the generation prompt, i.e. the reply and its
    end-of-turn marker. Otherwise the plain template, pieces encoded separately::

        BOS "System: {content}\\n" | "User: {content}\\n" | "Assistant: " {content} EOS

    where only ``{content} EOS`` of assistant turns is marked.
    """
    if isinstance(tok, HFTokenizer) and tok.chat_template:
        return _render_template(tok, messages)
    ids = [tok.bos_id] if tok.bos_id is not None else []
    flags = [False] * len(ids)
    for m in messages:
        if m["role"] == "assistant":
            head, body = tok.encode("Assistant: "), tok.encode(m["content"]) + [tok.eos_id]
        else:
            head, body = tok.encode(f"{_PLAIN_PREFIX[m['role']]}{m['content']}\n"), []
        ids += head + body
        flags += [False] * len(head) + [True] * len(body)
    return ids, flags


def _render_template(tok: HFTokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    def text(msgs: list[dict], prompt: bool) -> str:
        return tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = text(messages, False)
    spans = []  # character spans of assistant turns in `full`
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            before, upto = text(messages[:k], True), text(messages[: k + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    "data.tokenizer: its chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be located for the loss mask"
                )
            spans.append((len(before), len(upto)))
    # Character offsets rather than per-prefix tokenization: merges across a turn boundary stay exact.
    enc = tok.hf(full, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags


def _sft(ds, column: str, tok: Tokenizer, cfg: DataConfig, split: str) -> RowSamples:
    def rows():
        for batch in ds.iter(batch_size=64):
            for conversation in batch[column]:
                ids, flags = render_conversation(tok, _messages(conversation))
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
    column = _content_column(ds, cfg)
    if cfg.kind == "sft":
        return _sft(ds, column, tok, cfg, split)
    docs = _token_docs(ds, column, tok, cfg.min_tokens)
    return _packed(docs, cfg, split) if cfg.mode == "packed" else _truncated(docs, cfg, tok.pad_id, split)


# -------------------------------------------------------------------------------------------- batches


def collate(items: list[dict]) -> dict:
    """Stack samples to ``[b, s]``; ``cu_seqlens`` become offsets over the flattened ``b*s`` tokens."""
    batch = {k: torch.stack([x[k] for x in items]) for k in items[0] if k != "cu_seqlens"}
    if "cu_seqlens" in items[0]:
        s = items[0]["tokens"].shape[0]
        parts = [x["cu_seqlens"][:-1] + i * s for i, x in enumerate(items)]
        batch["cu_seqlens"] = torch.cat(parts + [torch.tensor([len(items) * s], dtype=torch.int32)])
    return batch


class DataIterator:
    """Endless batches in a seeded shuffled order per epoch.

    Each step consumes one global batch of ``batch_size * dp_size`` samples of the epoch's order; rank
    ``dp_rank`` takes its contiguous slice. The tail that cannot fill a global batch is dropped, so all
    ranks take the same number of steps. ``state_dict()`` is identical on every rank.
    """

    def __init__(self, samples: Sequence[dict], batch_size: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.num_samples: {len(samples)} samples cannot fill one global batch of "
                f"batch_size={batch_size} x dp_size={dp_size}"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            # A seed sequence of (seed, epoch) gives independent orders per epoch.
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.dp_rank * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return collate([self.samples[int(i)] for i in indices])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": len(self.samples),
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch the saved iterator gave; the data must be the same."""
        mine = self.state_dict()
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"DataIterator: cannot resume, {key} was {state[key]} and is now {mine[key]}; "
                    "the batches would differ from the interrupted run"
                )
        self.epoch, self.position = state["epoch"], state["position"]
