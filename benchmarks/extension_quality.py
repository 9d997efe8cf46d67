"""Extension quality on a real model: the papers' table from a ``smollm2_extend`` run folder.

Runs the recipe (``--run``: ``python -m megarope recipe=RECIPE run.dir=RUN_DIR``, which skips the
stages already done) or reads a finished or partial run, then prints one row per evaluated method:
perplexity at each length inside the model's window, and at the longest length the perplexity of
the tokens inside the window and beyond it (the eval rows' ``ppl_window`` / ``ppl_beyond``), the
change of short-context perplexity against the unscaled model, and passkey accuracy per length.
Below the table, the relations the LongRoPE paper reports, checked on these numbers: beyond the
window no scaling > PI > YaRN and LongRoPE < YaRN; LongRoPE's short factors keep in-window
perplexity within 2% of the unscaled model. ``--append`` adds it all to benchmarks/RESULTS.md with
date, device and load.

    python benchmarks/extension_quality.py --run          # the cpu size, ~1-2 hours on 2 loaded cores
    python benchmarks/extension_quality.py --run-dir runs/smollm2_extend-local --append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from results import publish

from megarope.eval.metrics import METRICS_FILE, read_metrics

# the stage names of recipes/smollm2_extend.yaml, in the papers' order
METHODS = ("original", "pi", "ntk", "dynamic", "yarn", "llama3", "longrope", "abf", "eabf")
SHORT_TOLERANCE = 0.02


def latest(rows: list[dict], kind: str) -> dict:
    """{(stage, length[, depth]): row}, the last row of each (a rerun's rows replace earlier ones)."""
    out = {}
    for row in rows:
        if row["stage"] == kind:
            key = (row["run_stage"], row["length"]) + ((row["depth"],) if kind == "passkey" else ())
            out[key] = row
    return out


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(run_dir: Path) -> tuple[list[str], dict]:
    """The markdown lines and the numbers the relations are checked on."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = read_metrics(run_dir / METRICS_FILE)
    evals, passkeys = latest(rows, "eval"), latest(rows, "passkey")
    long_rows = [r for r in evals.values() if "ppl_beyond" in r]
    if not long_rows:
        raise SystemExit(f"{run_dir}: no eval row past the model's window yet")
    window = long_rows[0]["window"]
    target = max(r["length"] for r in long_rows)
    short_lengths = sorted({length for (_, length) in evals if length <= window})
    pk_cells = sorted({(length, depth) for (_, length, depth) in passkeys})
    methods = [m for m in METHODS if (m, target) in evals] + \
        sorted({stage for (stage, _) in evals if stage not in METHODS})
    base = {length: evals.get(("original", length), {}).get("ppl") for length in short_lengths}
    base_window = evals.get(("original", target), {}).get("ppl_window")

    header = ["method"] + [f"ppl {n}" for n in short_lengths] + [
        f"ppl {target} tokens < {window}", f"ppl {target} tokens >= {window} (beyond)", "short ppl vs none"] + \
        [f"passkey {n}@{depth}" for n, depth in pk_cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    numbers = {}
    for method in methods:
        long = evals.get((method, target), {})
        shorts = [evals.get((method, n), {}).get("ppl") for n in short_lengths]
        # short-context quality: the ppl at lengths inside the window, against the unscaled model's
        changes = [s / base[n] - 1 for s, n in zip(shorts, short_lengths) if s is not None and base.get(n)]
        change = max(changes, key=abs) if changes else None
        accuracy = [passkeys.get((method, n, depth), {}).get("accuracy") for n, depth in pk_cells]
        numbers[method] = {"beyond": long.get("ppl_beyond"), "window": long.get("ppl_window"),
                           "short_change": change}
        lines.append("| " + " | ".join(
            [method] + [fmt(s) for s in shorts] + [fmt(long.get("ppl_window")), fmt(long.get("ppl_beyond")),
                                                   "–" if change is None else f"{100 * change:+.1f}%"]
            + [fmt(a) for a in accuracy]) + " |")
    docs = {n: sorted({d for (_, length), r in evals.items() if length == n for d in r.get("docs", [])})
            for n in sorted({length for (_, length) in evals})}
    search = [r for r in rows if r["stage"] == "search"]
    fitness = sorted({d for r in search for d in r.get("fitness_docs", [])})
    docs = "; ".join(f"{n}: {', '.join(map(str, names))}" for n, names in docs.items())
    lines += ["", f"window {window}, target {target}; eval documents (held out, 'eval' split) {docs}; "
              f"search fitness documents ('fitness' split): {', '.join(map(str, fitness)) or '–'}; recipe "
              f"{config.get('recipe')}, {config['eval']['num_docs']} document(s) per length, "
              f"passkey columns: length@depth (depth: where the key sits in the filler), share retrieved of "
              f"{config['eval']['passkey_per_depth']} sample(s)."]
    if base_window is not None:
        numbers["_base_window"] = base_window
    return lines, numbers


def relations(numbers: dict) -> list[str]:
    """The paper's relations on these numbers, each stated with its values; 'not measured' where a
    method has no row yet."""
    beyond = {m: v["beyond"] for m, v in numbers.items() if not m.startswith("_") and v["beyond"] is not None}

    def order(names: list[str]) -> str:
        if any(n not in beyond for n in names):
            return f"{' > '.join(names)}: not measured ({', '.join(n for n in names if n not in beyond)} missing)"
        holds = all(beyond[a] > beyond[b] for a, b in zip(names, names[1:]))
        values = " > ".join(f"{n} {beyond[n]:.3f}" for n in names)
        return f"{values}: {'holds' if holds else 'does NOT hold'}"

    out = [f"- beyond the window: {order(['original', 'pi', 'yarn'])}",
           f"- beyond the window: {order(['yarn', 'longrope'])} (LongRoPE search below YaRN)"]
    change = numbers.get("longrope", {}).get("short_change")
    if change is None:
        out.append("- LongRoPE short factors vs the unscaled model inside the window: not measured")
    else:
        ok = abs(change) <= SHORT_TOLERANCE
        out.append(f"- LongRoPE short factors vs the unscaled model inside the window: {100 * change:+.2f}% "
                   f"({'within' if ok else 'NOT within'} {100 * SHORT_TOLERANCE:.0f}%)")
    if beyond:
        best = min(beyond, key=beyond.get)
        out.append(f"- best beyond the window: {best} ({beyond[best]:.3f}"
                   + (f", {beyond['original'] / beyond[best]:.1f}x below no scaling)" if "original" in beyond else ")"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="smollm2_extend")
    parser.add_argument("--run-dir", help="the run folder (default: runs/RECIPE-local under the working "
                        "directory, where megarope's run.dir default puts it)")
    parser.add_argument("--run", action="store_true", help="run the recipe first (finished stages are skipped)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a line under the table (what was cut short, ...)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or Path("runs") / f"{args.recipe}-local")
    if args.run:
        subprocess.run([sys.executable, "-m", "megarope", f"recipe={args.recipe}", f"run.dir={run_dir}"], check=True)
    lines, numbers = table(run_dir)
    summary = run_dir / "summary.json"
    elapsed = json.loads(summary.read_text())["elapsed_s"] if summary.is_file() else None
    import torch

    head = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} now; torch "
            f"{torch.__version__}; run {run_dir.name}: "
            + (f"finished, {elapsed / 60:.0f} min of its last invocation" if elapsed else "not finished (partial rows)"))
    publish(f"Extension quality, SmolLM2-135M-Instruct (`python benchmarks/extension_quality.py`, "
            f"recipe={args.recipe})", [head, ""] + lines + ["", *relations(numbers)], args.note, args.append)


if __name__ == "__main__":
    main()
