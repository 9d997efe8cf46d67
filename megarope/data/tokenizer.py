"""Tokenizers behind one tiny interface: ``encode``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``,
``vocab_size``.

``load_tokenizer("bytes")`` gives the built-in byte tokenizer (no files, no download); any other spec
is a checkpoint folder loaded with ``transformers.AutoTokenizer``. ``encode`` never adds special
tokens: the data layer adds BOS/EOS itself so both kinds behave the same.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

from megarope.data.config import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens.

    Ids: 0-255 are the bytes themselves, ``BOS = 256``, ``EOS = 257``, ``PAD = 258``;
    ``vocab_size = 259``.
    """

    BOS = 256
    EOS = 257
    PAD = 258

    bos_id = BOS
    eos_id = EOS
    pad_id = PAD
    vocab_size = 259
    # The data layer renders conversations with its plain template when this is None.
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Special ids carry no text; a cut through a multi-byte character decodes to U+FFFD.
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """An equivalent ``transformers`` tokenizer in ``path`` (same ids), so that an exported tiny
        model is a complete Hugging Face folder: a byte-level BPE without merges whose vocabulary
        lists the bytes in id order, then the three special tokens."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # GPT-2's printable stand-ins for the 256 bytes, which byte-level BPE vocabularies spell tokens with
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
        specials = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 256-258, names no source text is likely to hold
        vocab = {char[b]: b for b in range(256)} | {name: 256 + i for i, name in enumerate(specials)}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[0], eos_token=specials[1],
                                pad_token=specials[2]).save_pretrained(path)


class HFTokenizer:
    """A ``transformers`` tokenizer reduced to the same interface; ``hf`` is the wrapped object."""

    def __init__(self, hf: Any, name: str = ""):
        self.hf = hf
        if hf.eos_token_id is None:
            raise DataError("data.tokenizer", f"tokenizer {name!r} defines no EOS token; documents and "
                            "assistant turns are terminated with EOS")
        # BOS is optional (some families have none); PAD falls back to EOS as in most causal LMs.
        # Padding is never found by comparing ids: masks are built from positions.
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        self.vocab_size = len(hf)
        self.chat_template = hf.chat_template

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        self.hf.save_pretrained(path)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` → :class:`ByteTokenizer`; a folder path → :class:`HFTokenizer` (offline)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        raise DataError("data.tokenizer", f"{spec!r} is neither 'bytes' nor an existing tokenizer/checkpoint folder")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path), name=spec)
