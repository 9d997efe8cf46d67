"""Passkey retrieval in the landmark-attention prompt format (Mohtashami & Jaggi 2023, arXiv
2305.16300), as LongRoPE and YaRN evaluate it::

    <BOS>{TASK}\\n{filler ...}\\n{KEY_LINE}\\n{filler ...}\\n{QUESTION} {passkey}

The template's strings are ``megarope.data.retrieval``'s, which pre-training's synthetic retrieval
sequences share (with other filler and keys). The filler is ``FILLER`` repeated; the key line sits
at a relative ``depth`` of the filler (0: right after the task, 1: right before the question). A sample is exactly ``length`` tokens: the pieces are
encoded separately and the filler is cut or extended at token level, so the length is exact for
any tokenizer. BOS comes first where the tokenizer has one (as in ``megarope.data.samples``).

Scoring is teacher forced, one forward pass per sample: the model reads the whole sample, answer
included (:func:`passkey_lm_sample`, loss mask on the answer), and the sample counts as retrieved
when the argmax at every position before an answer token is that token, i.e. no answer token is
wrong (:func:`wrong_tokens`, :func:`accuracy_by_depth`). Whitespace-only tokens in front of the digits (the
space of the byte tokenizer, SentencePiece's lone "▁") are not scored: they carry no retrieval.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from megarope.data.retrieval import DIGITS, prompt_pieces, random_key
from megarope.data.samples import lm_sample
from megarope.data.tokenizer import Tokenizer
from megarope.errors import MegaropeError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class EvalConfigError(MegaropeError):
    """Bad evaluation setting; ``field`` is the ``eval.*`` key."""


def passkey_samples(
    tokenizer: Tokenizer,
    length: int,
    depths: Sequence[float],
    num_per_depth: int,
    seed: int,
    digits: int = DIGITS,
) -> list[dict]:
    """``num_per_depth`` samples per depth (depths in [0, 1]), depth by depth in the given order.

    Each sample: ``tokens`` int64 [length]; ``answer_positions`` int64, the indices of the scored
    answer tokens; ``key_position``, the index of the key line's first token; ``depth``; ``passkey``
    (a string of ``digits`` digits, no leading zero). The passkeys depend on ``seed`` and the sample's
    rank only, so every length of one evaluation asks for the same keys.
    """
    if digits < 1:
        raise EvalConfigError("passkey digits", f"expected a positive integer, got {digits}")
    if num_per_depth < 1:
        raise EvalConfigError("eval.passkey_per_depth", f"expected a positive integer, got {num_per_depth}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise EvalConfigError("eval.passkey_depths", f"expected a non-empty list of values in [0, 1], got {list(depths)}")
    # The unit carries its separating space, so tiling it reads like " ".join(FILLER * n).
    unit = tokenizer.encode(FILLER + " ")
    rng = np.random.default_rng(seed)
    samples = []
    for depth in depths:
        for _ in range(num_per_depth):
            key = random_key(rng, digits)
            head, key_line, question, answer = prompt_pieces(tokenizer, key)
            fixed = len(head) + len(key_line) + len(question) + len(answer)
            n_filler = length - fixed
            if n_filler < 0:
                raise EvalConfigError("eval.passkey_lengths", f"passkey length={length} is shorter than the prompt "
                                      f"without filler ({fixed} tokens)")
            n_before = int(round(depth * n_filler))
            before, after = _filler(unit, n_before), _filler(unit, n_filler - n_before)
            tokens = head + before + key_line + after + question + answer
            start = len(tokens) - len(answer)
            skip = 0
            while skip < len(answer) - 1 and not tokenizer.decode(answer[: skip + 1]).strip():
                skip += 1
            samples.append(
                {
                    "tokens": torch.tensor(tokens, dtype=torch.int64),
                    "answer_positions": torch.arange(start + skip, len(tokens), dtype=torch.int64),
                    "key_position": len(head) + len(before),
                    "depth": float(depth),
                    "passkey": key,
                }
            )
    return samples


def _filler(unit: list[int], n: int) -> list[int]:
    return (unit * (n // len(unit) + 1))[:n]


def passkey_lm_sample(sample: dict) -> dict:
    """The language-modelling sample that scores ``sample``: its tokens, the loss mask on the
    scored answer tokens."""
    mask = torch.zeros(sample["tokens"].numel())
    mask[sample["answer_positions"]] = 1.0
    return lm_sample(sample["tokens"], mask)


def wrong_tokens(predictions: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the masked positions whose prediction (the argmax there) is not the label."""
    return ((predictions != labels).float() * loss_mask.float()).sum(-1)


def accuracy_by_depth(samples: Sequence[dict], wrong: Sequence[float]) -> dict[float, float]:
    """Share of retrieved samples (no wrong answer token) per depth, depths in first-seen order."""
    if len(samples) != len(wrong):
        raise ValueError(f"accuracy_by_depth: {len(samples)} samples but {len(wrong)} results")
    hits: dict[float, list[bool]] = defaultdict(list)
    for sample, count in zip(samples, wrong):
        hits[sample["depth"]].append(float(count) == 0)
    return {depth: sum(v) / len(v) for depth, v in hits.items()}
