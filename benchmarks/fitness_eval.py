"""Forward perplexity of one model and text, megarope vs transformers, at several lengths.

What the LongRoPE search's fitness and every evaluation cost: one long forward pass and its NLL.
Both sides load the same Hugging Face folder (``--model``; without it a tiny random Llama is saved
to a temporary folder) and score the same tokens: the Python standard library's own source files,
tokenized with the folder's tokenizer, or their bytes modulo the vocabulary when it has none.

- transformers: ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"`` (how the LongRoPE
  reference scores a candidate), NLL from ``labels=``.
- megarope: ``megarope.from_hf`` (the SDPA core attention without TE), NLL as the evaluation
  engine computes it: the decoder output through the output weight 1024 tokens at a time
  (``megarope.mcore.output``), never the whole [s, vocab] logits.

After one untimed pass of each at the shortest length (compilation, allocator warm-up), runs
alternate (megarope, transformers, megarope, ...) so load drift hits both alike; the table
gives the fastest of ``--repeats`` runs, the perplexity, and the peak resident memory above the
level before the forward (sampled every 2 ms by a thread reading /proc/self/statm, so Linux only;
a peak shorter than that can be missed). ``--append`` adds the table to benchmarks/RESULTS.md.

    python benchmarks/fitness_eval.py --lengths 2048 4096 --model /path/to/hf_folder
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch

from results import publish

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Peak RSS above the level at entry, sampled by a background thread."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta_mib = (self.peak - self.base) / 2**20


def tiny_model_folder(path: Path) -> Path:
    """A random Llama (GQA, 4 layers) saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=1 << 17, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def stdlib_text(min_chars: int) -> str:
    """Concatenated standard-library sources: real long text that needs no download."""
    parts, total = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = file.read_text(errors="replace")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return "\n".join(parts)


def token_ids(folder: Path, length: int, vocab_size: int) -> torch.Tensor:
    """length + 1 token ids of the stdlib text (inputs and the shifted labels)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:
        data = stdlib_text(length + 1).encode()[: length + 1]
        return torch.tensor(list(data)) % vocab_size
    ids = tokenizer(stdlib_text(8 * (length + 1)), return_tensors="pt").input_ids[0]
    if ids.numel() < length + 1:
        raise SystemExit(f"the stdlib text gives only {ids.numel()} tokens, fewer than {length + 1}")
    return ids[: length + 1]


def megarope_nll(model, ids: torch.Tensor) -> float:
    from megarope.mcore.output import decoder_output, token_nll_and_argmax

    tokens, labels = ids[None, :-1], ids[None, 1:]
    positions = torch.arange(tokens.shape[1])[None]
    with decoder_output(model):
        hidden = model(tokens, positions, None)
    return token_nll_and_argmax(model, hidden, labels)[0].mean().item()


def transformers_nll(model, ids: torch.Tensor) -> float:
    # transformers shifts labels itself: pass the inputs plus one token and drop the last label
    return model(ids[None], labels=ids[None]).loss.item()


def measure(nll, model, ids) -> tuple[float, float, float]:
    """(seconds, perplexity, peak RSS MiB above the start) of one scoring pass."""
    with torch.no_grad(), PeakRss() as rss:
        start = time.perf_counter()
        value = nll(model, ids)
        seconds = time.perf_counter() - start
    return seconds, math.exp(value), rss.delta_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face folder (default: a tiny random Llama)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a line under the table (machine load, ...)")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    import megarope

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model) if args.model else tiny_model_folder(Path(tmp.name) / "tiny")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = megarope.from_hf(folder)
    vocab = reference.config.vocab_size

    # one untimed pass of each side first: megarope compiles its RoPE, both warm their allocators
    warm = token_ids(folder, min(args.lengths), vocab)
    measure(megarope_nll, ours, warm)
    measure(transformers_nll, reference, warm)
    rows = []
    for length in args.lengths:
        ids = token_ids(folder, length, vocab)
        runs = {"megarope": [], "transformers": []}
        for _ in range(args.repeats):
            runs["megarope"].append(measure(megarope_nll, ours, ids))
            runs["transformers"].append(measure(transformers_nll, reference, ids))
        best = {name: min(r[0] for r in values) for name, values in runs.items()}
        ppl = {name: values[0][1] for name, values in runs.items()}
        mem = {name: max(r[2] for r in values) for name, values in runs.items()}
        rows.append((length, best, ppl, mem))
        print(f"{length}: megarope {best['megarope']:.2f} s ppl {ppl['megarope']:.5f}, "
              f"transformers {best['transformers']:.2f} s ppl {ppl['transformers']:.5f}", flush=True)

    name = args.model and Path(args.model).name or "tiny random Llama (4 layers, hidden 256, 8/2 heads)"
    lines = [
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; model: {name}; min of {args.repeats} alternating runs after a warm-up pass",
        "",
        "| tokens | megarope s | transformers s | speed ratio (tf/mr) | megarope ppl | transformers ppl "
        "| rel. diff | megarope peak MiB | transformers peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length, best, ppl, mem in rows:
        lines.append(
            f"| {length} | {best['megarope']:.2f} | {best['transformers']:.2f} | "
            f"{best['transformers'] / best['megarope']:.2f} | {ppl['megarope']:.5f} | {ppl['transformers']:.5f} | "
            f"{abs(ppl['megarope'] / ppl['transformers'] - 1):.1e} | {mem['megarope']:.0f} | {mem['transformers']:.0f} |")
    publish("Forward perplexity, megarope vs transformers (`python benchmarks/fitness_eval.py`)", lines, args.note,
            args.append)


if __name__ == "__main__":
    main()
