"""The data settings (``data`` group of a run) and their checks; :class:`DataError` for bad data input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megarope.errors import MegaropeError

FORMATS = ("text", "json", "parquet")
RETRIEVAL_KINDS = ("passkey", "copy", "mixed")


class DataError(MegaropeError):
    """Bad data input; ``field`` is the ``data.*`` key to change (``data.source``, ``data.seq_len``)."""


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
    eval_fraction: float = 0.1  # share of documents, chosen by hash, held out from training
    # share of the held-out documents (by hash) in the "fitness" split the LongRoPE search scores on;
    # the rest is the "eval" split, so a searched result is measured on documents it was not chosen on
    fitness_fraction: float = 0.5
    # lm only: share of the training samples that are synthetic passkey-retrieval sequences
    # (megarope.data.retrieval), so a small model learns to attend across its whole window; 1.0:
    # retrieval sequences only, as many as there are text samples (the text is their filler)
    retrieval_share: float = 0.0
    # which retrieval sequences: "passkey" (the evaluation's prompt format), "copy" (short random
    # strings, each repeated after a gap of up to copy_gap characters: dense copying, which forms the
    # copy (induction) heads that retrieval needs far sooner than passkey sequences do) or "mixed"
    # (alternating by sample index)
    retrieval_kind: str = "passkey"  # "passkey" | "copy" | "mixed"
    # copy sequences: the most filler characters between a string and its repeat (each gap drawn
    # uniformly from [0, limit]); 0: the repeat follows at once
    copy_gap: int = 0
    # [first, last] step of a training stage over which the gap limit grows linearly from 0 to
    # copy_gap (0 before first); [0, 0]: copy_gap from the start. A curriculum: copy heads form on
    # immediate repeats, attending locally, and slowly growing gaps stretch them to long range;
    # gaps up to copy_gap from the start formed none in 600 steps (megarope.data.retrieval)
    copy_gap_ramp: List[int] = field(default_factory=lambda: [0, 0])


def check_config(cfg: DataConfig) -> None:
    """Raise :class:`DataError` naming the first bad field; cheap, so call it before loading anything."""
    if cfg.kind not in ("lm", "sft"):
        raise DataError("data.kind", f"expected 'lm' or 'sft', got {cfg.kind!r}")
    if cfg.mode not in ("packed", "truncated"):
        raise DataError("data.mode", f"expected 'packed' or 'truncated', got {cfg.mode!r}")
    if cfg.format not in FORMATS + ("auto",):
        raise DataError("data.format", f"expected one of {FORMATS + ('auto',)}, got {cfg.format!r}")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 1:
        raise DataError("data.seq_len", f"expected a positive integer, got {cfg.seq_len!r}")
    if cfg.num_samples is not None and (not isinstance(cfg.num_samples, int) or cfg.num_samples < 1):
        raise DataError("data.num_samples", f"expected a positive integer or None, got {cfg.num_samples!r}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise DataError("data.eval_fraction", f"expected a value in [0, 1), got {cfg.eval_fraction!r}")
    if not 0.0 < cfg.fitness_fraction < 1.0:
        raise DataError("data.fitness_fraction", f"expected a value in (0, 1), got {cfg.fitness_fraction!r}")
    if not 0.0 <= cfg.retrieval_share <= 1.0:
        raise DataError("data.retrieval_share", f"expected a share in [0, 1], got {cfg.retrieval_share!r}")
    if cfg.retrieval_kind not in RETRIEVAL_KINDS:
        raise DataError("data.retrieval_kind", f"expected one of {'|'.join(RETRIEVAL_KINDS)}, got {cfg.retrieval_kind!r}")
    if not isinstance(cfg.copy_gap, int) or cfg.copy_gap < 0:
        raise DataError("data.copy_gap", f"expected a non-negative integer, got {cfg.copy_gap!r}")
    ramp = list(cfg.copy_gap_ramp)
    if len(ramp) != 2 or not all(isinstance(v, int) for v in ramp) or not 0 <= ramp[0] <= ramp[1]:
        raise DataError("data.copy_gap_ramp", f"expected [first, last] steps with 0 <= first <= last, got {ramp!r}")
    if cfg.retrieval_share and cfg.kind != "lm":
        raise DataError("data.retrieval_share", f"applies to kind='lm' only (got kind={cfg.kind!r}): "
                        "conversations are trained on their assistant turns")
    if cfg.reset_position_ids and (cfg.kind, cfg.mode) != ("lm", "packed"):
        raise DataError("data.reset_position_ids", "True applies to kind='lm', mode='packed' only "
                        f"(got kind={cfg.kind!r}, mode={cfg.mode!r}): other samples hold one document each")
