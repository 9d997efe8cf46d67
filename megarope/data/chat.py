"""Conversations (SFT) → token ids and, per token, whether it is trained on (assistant turns only)."""

from __future__ import annotations

from typing import Any

from megarope.data.config import DataError
from megarope.data.tokenizer import HFTokenizer, Tokenizer

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLAIN_PREFIX = {"user": "User: ", "system": "System: "}


def messages(conversation: Any) -> list[dict]:
    """ShareGPT ``{"from", "value"}`` or OpenAI ``{"role", "content"}`` turns → ``{"role", "content"}``."""
    out = []
    for turn in conversation:
        # Arrow gives every turn the union of keys seen in the file, unused ones as None.
        sharegpt = turn.get("from") is not None
        role, content = (turn["from"], turn.get("value")) if sharegpt else (turn.get("role"), turn.get("content"))
        if role not in _ROLES or not isinstance(content, str):
            raise DataError("data.kind", f"'sft': unsupported turn {turn!r} (roles {sorted(_ROLES)}, text content)")
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
                raise DataError(
                    "data.tokenizer", "its chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be located for the loss mask"
                )
            spans.append((len(before), len(upto)))
    # Character offsets rather than per-prefix tokenization: merges across a turn boundary stay exact.
    enc = tok.hf(full, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags
