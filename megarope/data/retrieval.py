"""Synthetic retrieval sequences for pre-training (``data.retrieval_share``), in the passkey prompt
format that ``megarope.eval.passkey`` evaluates with (the template lives here, one level below
evaluation, so both read the same strings)::

    <BOS>{TASK}\\n{filler ...}\\n{KEY_LINE}\\n{filler ...}\\n{QUESTION} {passkey}

A model trained on plain text within a short window needs few positions beyond a few dozen tokens;
one that must copy a key from anywhere in its window learns to attend across all of it (induction
or copy heads), which is what context extension then has to preserve beyond the window.

``data.retrieval_kind`` picks the sequences: ``passkey`` (the prompt above), ``copy`` or ``mixed``
(alternating by sample index). A passkey sequence has ten key digits among hundreds of tokens: too
sparse for a tiny model to form copy (induction) heads in a few hundred steps. A copy sequence is
dense copying, short random strings each repeated at once::

    <BOS>{R1}{R1}\n{R2}{R2}\n{R3}{R3}\n ...

(:data:`COPY_MIN` to :data:`COPY_MAX` letters and digits each): from its second character on, the
repeat is predictable by matching the characters before it and by nothing else (the length varies,
so no fixed offset does). Measured on the main job's tiny model, 8 such sequences of 384 tokens per
step: the loss leaves chance after ~200 steps (transformers' Llama of the same shape alike), where
450 steps of strings of 48-96 characters tiled along the sequence or 800 steps of passkey sequences
left it at chance. Not yet enough for passkey retrieval in the main job's budget: 500 steps of copy
sequences, then 600 of text, passkey and copy mixed, still retrieved nothing.

Training sequences differ from the evaluation's in what can be memorised: the filler is text of
the training split (a random snippet, tiled to the needed length as the evaluation tiles its
sentences, or a plain run of text where the snippet is long enough), the passkeys are drawn from
the data seed and the sample's index, and the key depth is uniform in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megarope.data.config import DataError
from megarope.data.tokenizer import Tokenizer

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DIGITS = 5  # the passkey's length in digits, no leading zero
MIN_FILLER = 16  # tokens of filler a training sequence has at least (and the shortest tiled snippet)
COPY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
COPY_MIN, COPY_MAX = 3, 10  # characters of a copy sequence's random strings


def random_key(rng: np.random.Generator, digits: int = DIGITS) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def prompt_pieces(tokenizer: Tokenizer, key: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token lists of the prompt around the filler: (BOS + task line, key line, question, answer).
    BOS comes first where the tokenizer has one (as in ``megarope.data.samples``)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return (bos + tokenizer.encode(TASK + "\n"), tokenizer.encode("\n" + KEY_LINE.format(key=key) + "\n"),
            tokenizer.encode("\n" + QUESTION), tokenizer.encode(" " + key))


def fixed_length(tokenizer: Tokenizer) -> int:
    """Tokens of a prompt without filler (its length for any key of :data:`DIGITS` digits with the
    byte tokenizer; for a subword tokenizer, of the key 10⋯0)."""
    return sum(len(p) for p in prompt_pieces(tokenizer, "1" + "0" * (DIGITS - 1)))


class RetrievalSamples(torch.utils.data.Dataset):
    """``count`` retrieval sequences of ``seq_len`` (+1 label) tokens, built on access from
    ``(seed, index)`` alone, with the keys of a language-modelling sample (``tokens``, ``labels``,
    ``loss_mask``, ``position_ids``; ``cu_seqlens`` with ``packed``, one sequence per sample).

    ``filler`` holds the training text the filler is cut from: LM samples (their ``tokens``). The loss
    covers every token: the model learns the template and the text as well as the answer.
    ``kind``: ``data.retrieval_kind`` (module docstring).
    """

    def __init__(self, tokenizer: Tokenizer, filler: Sequence[dict], seq_len: int, count: int, seed: int,
                 packed: bool = False, kind: str = "passkey"):
        # passkey sequences: room for filler on both sides of the key line whatever the key's token count
        if kind != "copy" and fixed_length(tokenizer) + MIN_FILLER > seq_len + 1:
            raise DataError("data.seq_len", f"{seq_len} tokens: a retrieval sequence (data.retrieval_share) takes "
                            f"{fixed_length(tokenizer)} tokens without filler, plus at least {MIN_FILLER} of filler")
        self.tokenizer, self.filler, self.seq_len = tokenizer, filler, seq_len
        self.count, self.seed, self.packed, self.kind = count, seed, packed, kind

    def __len__(self) -> int:
        return self.count

    def _text(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` tokens of training text: a snippet of MIN_FILLER tokens up to a whole window, tiled."""
        window = self.filler[int(rng.integers(len(self.filler)))]["tokens"]
        unit = int(rng.integers(MIN_FILLER, len(window) + 1))
        start = int(rng.integers(len(window) - unit + 1))
        snippet = window[start : start + unit].tolist()
        return (snippet * (n // unit + 1))[:n]

    def _passkey(self, rng: np.random.Generator) -> list[int]:
        head, key_line, question, answer = prompt_pieces(self.tokenizer, random_key(rng))
        n_filler = self.seq_len + 1 - len(head) - len(key_line) - len(question) - len(answer)
        n_before = int(round(rng.random() * n_filler))
        filler = self._text(rng, n_filler)
        return head + filler[:n_before] + key_line + filler[n_before:] + question + answer

    def _copy(self, rng: np.random.Generator) -> list[int]:
        tok = self.tokenizer
        ids = [tok.bos_id] if tok.bos_id is not None else []
        newline = tok.encode("\n")
        while len(ids) < self.seq_len + 1:
            string = tok.encode("".join(rng.choice(list(COPY_ALPHABET), int(rng.integers(COPY_MIN, COPY_MAX + 1)))))
            ids += string + string + newline
        return ids[: self.seq_len + 1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.count:
            raise IndexError(i)
        s = self.seq_len
        rng = np.random.default_rng([self.seed, i])
        copy = self.kind == "copy" or (self.kind == "mixed" and i % 2 == 1)
        ids = self._copy(rng) if copy else self._passkey(rng)
        row = torch.tensor(ids, dtype=torch.int64)
        sample = {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(s), "position_ids": torch.arange(s)}
        if self.packed:
            sample["cu_seqlens"] = torch.tensor([0, s], dtype=torch.int32)
        return sample
