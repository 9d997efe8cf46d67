"""``report.md`` and ``plots/*.png`` of a run, from its ``metrics.jsonl`` (see ``metrics.py``) and,
optionally, the RoPE configs of the methods compared.

A method is named by its ``method`` field; where one method was evaluated in several pipeline
stages its rows are labelled ``method (run_stage)``. Where a (method, run_stage, length[, depth])
was measured more than once (periodic evaluation), the last row counts. Figures are saved by
``megarope.plotting.save_figure``; every file is written atomically.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from megarope.atomic import atomic_write_text
from megarope.eval.metrics import METRICS_FILE, read_metrics, row_kind
from megarope.plotting import save_figure
from megarope.rope.config import RopeConfig
from megarope.rope.methods import base_inv_freq

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
PLOT_FILES = {
    "ppl": "ppl_vs_length.png",
    "passkey": "passkey_heatmap.png",
    "loss": "loss.png",
    "factors": "factors.png",
}


# ------------------------------------------------------------------------------------------ tables


def format_number(value: float | None, digits: int = 2) -> str:
    """Fixed decimals; scientific from 1e5 on (diverged perplexities); "-" for a missing value."""
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e5:
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def format_table(
    rows: Iterable[Mapping[str, Any]],
    row_key: str = "method",
    col_key: str = "length",
    value_key: str = "ppl",
    *,
    fmt: Callable[[float | None], str] = format_number,
    best: str | None = None,
    markdown: bool = False,
    row_header: str | None = None,
) -> str:
    """Pivot ``rows`` to a table: one line per ``row_key`` value (first-seen order), one column per
    ``col_key`` value (sorted), cells the mean of ``value_key`` over the rows that share both.
    ``best``: "min" or "max" marks each column's best finite cell (bold in markdown, ``*`` in text),
    only where it means something: at least two finite cells and exactly one showing the best value
    as printed (all methods at 0.00 passkey accuracy, or a tie, mark nothing).
    Plain text (for the console) unless ``markdown``; ``row_header`` names the first column
    (default: ``row_key``)."""
    if best not in (None, "min", "max"):
        raise ValueError(f"format_table: best={best!r}, expected None, 'min' or 'max'")
    cells: dict[tuple, list[float]] = defaultdict(list)
    names: dict[Any, None] = {}
    for row in rows:
        names.setdefault(row[row_key], None)
        cells[(row[row_key], row[col_key])].append(float(row[value_key]))
    columns = sorted({c for _, c in cells})
    values = {k: sum(v) / len(v) for k, v in cells.items()}
    marked = set()
    if best is not None:
        pick = min if best == "min" else max
        for col in columns:
            finite = {n: values[(n, col)] for n in names if math.isfinite(values.get((n, col), math.nan))}
            if len(finite) < 2:
                continue
            # ties judged on the printed text: 0.001 and 0.002 both read "0.00"
            shown = fmt(pick(finite.values()))
            winners = [n for n, v in finite.items() if fmt(v) == shown]
            if len(winners) == 1:
                marked.add((winners[0], col))
    header = [row_header or row_key] + [str(c) for c in columns]
    body = []
    for name in names:
        line = [str(name)]
        for col in columns:
            text = fmt(values.get((name, col)))
            if (name, col) in marked:
                text = f"**{text}**" if markdown else f"{text}*"
            line.append(text)
        body.append(line)
    if markdown:
        esc = [[c.replace("|", "\\|") for c in line] for line in [header] + body]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" + "---:|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in esc[1:]])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header] + body
    )


# ------------------------------------------------------------------------------------------ rows


def _with_labels(rows: list[dict]) -> list[dict]:
    """Copies of eval/passkey rows with ``label``: the method, plus the stage where it is ambiguous."""
    stages = defaultdict(set)
    for row in rows:
        stages[row["method"]].add(row.get("run_stage"))
    out = []
    for row in rows:
        label = row["method"]
        if len(stages[label]) > 1:
            label = f"{label} ({row.get('run_stage')})"
        out.append({**row, "label": label})
    return out


def _latest(rows: list[dict], fields: Sequence[str]) -> list[dict]:
    """The last row per combination of ``fields``, in first-seen order of the combinations."""
    last: dict[tuple, dict] = {}
    for row in rows:
        last[tuple(row.get(f) for f in fields)] = row
    return list(last.values())


def _spread(values: Iterable[Any]) -> str:
    """One value, or the range of several (e.g. documents per length)."""
    found = sorted(set(values))
    return str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"


def _length_label(n: int) -> str:
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _target_length(rc: RopeConfig) -> int | None:
    """The length the config was made for: LongRoPE's long factors, dynamic NTK's base."""
    if rc.max_position_embeddings is not None:
        return rc.max_position_embeddings
    if rc.original_max_position_embeddings is not None and rc.factor is not None:
        return int(rc.original_max_position_embeddings * rc.factor)
    return None


def rescale_factors(config: Mapping[str, Any], original_theta: float | None = None) -> np.ndarray:
    """λ_i = base inv_freq_i / method inv_freq_i at the config's target length. The base uses
    ``original_theta`` if given (needed for ABF-style configs, whose ``rope_theta`` is the new base),
    else the config's own ``rope_theta``."""
    rc = RopeConfig.from_dict(dict(config))
    base = base_inv_freq(original_theta if original_theta is not None else rc.rope_theta, rc.rotary_dim)
    return (base / rc.inv_freq(_target_length(rc))).numpy()


# ------------------------------------------------------------------------------------------ plots


def _plain_log_y(ax, values: Sequence[float]) -> None:
    """Log y axis labelled 2, 3, 40 rather than 2x10^0; minor ticks labelled only within a decade,
    where there are no major ones to read."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(values) / min(values) < 10 else NullFormatter())


def _set_length_axis(ax, lengths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.minorticks_off()


def plot_ppl(evals: list[dict], path: str, original_window: int | None = None) -> str:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    finite = []
    for label in dict.fromkeys(r["label"] for r in evals):
        points = sorted((r["length"], r["ppl"]) for r in evals if r["label"] == label and math.isfinite(r["ppl"]))
        finite += [p for _, p in points]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=label)
    _set_length_axis(ax, sorted({r["length"] for r in evals}))
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        _plain_log_y(ax, finite)  # a method failing past its window dwarfs the others
    if original_window:
        label = f"original window ({original_window})"
        ax.axvline(original_window, color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_passkey(passkeys: list[dict], path: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in passkeys))
    lengths = sorted({r["length"] for r in passkeys})
    depths = sorted({r["depth"] for r in passkeys})
    ncols = min(len(labels), 3)
    nrows = math.ceil(len(labels) / ncols)
    size = (0.6 * len(lengths) * ncols + 2.5, (0.35 * len(depths) + 1.2) * nrows + 0.3)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, label in zip(axes.flat, labels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in passkeys:
            if r["label"] == label:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("length")
        ax.set_ylabel("key depth")
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, label="passkey accuracy", shrink=0.8)
    return save_figure(fig, path)


def loss_figure(train: list[dict]) -> Figure:
    """One panel per training stage, each on its own step axis: a fine-tune's steps restart at 1,
    so stages drawn on one axis would sit on the pre-training's first steps, hiding one another."""
    stages = list(dict.fromkeys(r["stage"] for r in train))
    ncols = min(len(stages), 3)
    nrows = math.ceil(len(stages) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows + 0.4), layout="constrained")
    fig.suptitle("Training loss per stage")
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        points = sorted((r["step"], r["loss"]) for r in train if r["stage"] == stage)
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(stage, fontsize="medium")
        ax.set_xlabel("step")
        if i % ncols == 0:
            ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    return fig


def plot_loss(train: list[dict], path: str) -> str:
    return save_figure(loss_figure(train), path)


def plot_factors(factors: Mapping[str, np.ndarray], path: str) -> str:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, lam in factors.items():
        ax.plot(range(len(lam)), lam, marker="o", markersize=2, linewidth=1, label=name)
    _plain_log_y(ax, [float(v) for lam in factors.values() for v in lam])  # λ spans 1..s and beyond
    ax.set_xlabel("frequency index i (high to low frequency)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_title("Rescale factors per dimension")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ summary


def _cell(rows: list[dict], label: str, length: int, key: str) -> float | None:
    """The mean of ``key`` over ``label``'s rows at ``length`` (passkey: over depths), None if none."""
    values = [float(r[key]) for r in rows if r["label"] == label and r["length"] == length]
    return sum(values) / len(values) if values else None


def _change(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f}%"


def what_it_shows(evals: list[dict], passkeys: list[dict], window: int, baseline: str | None) -> list[str]:
    """Bullet lines of the "What this run shows" section, each computed from the rows (labelled as
    in the report's tables): the best method at the longest length beyond ``window`` and the
    ``baseline`` (the unextended model) against it, every method's perplexity at the window against
    the baseline's, and passkey retrieval at the window and at the longest length beyond it.
    A statement whose numbers were not measured is left out; no rows, no lines."""
    lines = []
    labels = list(dict.fromkeys(r["label"] for r in evals + passkeys))
    others = [m for m in labels if m != baseline]
    beyond = [n for n in sorted({r["length"] for r in evals}) if n > window]
    if beyond:
        far = beyond[-1]
        ppl = {m: v for m in labels if (v := _cell(evals, m, far, "ppl")) is not None and math.isfinite(v)}
        ranked = sorted((m for m in ppl if m != baseline), key=ppl.get)
        if ranked:
            best = ranked[0]
            text = (f"Beyond the window, at {far} tokens ({far / window:g}× the {window}-token window), {best} has "
                    f"the lowest perplexity, {format_number(ppl[best])}")
            if baseline in ppl:
                text += (f"; the unextended model ({baseline}) reaches {format_number(ppl[baseline])}, "
                         f"{ppl[baseline] / ppl[best]:.2f}× as high")
            rest = ", ".join(f"{m} {format_number(ppl[m])}" for m in ranked[1:])
            lines.append(text + (f". The others, best first: {rest}." if rest else "."))
    short = _cell(evals, baseline, window, "ppl") if baseline else None
    if short is not None:
        changes = [(m, v) for m in others if (v := _cell(evals, m, window, "ppl")) is not None]
        if changes:
            lines.append(f"Within the window ({window} tokens) the unextended model's perplexity is "
                         f"{format_number(short)}; against it: "
                         + ", ".join(f"{m} {format_number(v)} ({_change(v, short)})" for m, v in changes) + ".")
    lengths = sorted({r["length"] for r in passkeys})
    for length, where in ((window, "at the window length"), (max(lengths, default=0), "beyond the window")):
        if length not in lengths or (where == "beyond the window" and length <= window):
            continue
        acc = {m: v for m in labels if (v := _cell(passkeys, m, length, "accuracy")) is not None}
        order = ([baseline] if baseline in acc else []) + sorted((m for m in acc if m != baseline), key=lambda m: -acc[m])
        lines.append(f"Passkey retrieval {where} ({length} tokens): "
                     + ", ".join(f"{m} {acc[m]:.2f}" + (" (unextended)" if m == baseline else "") for m in order) + ".")
    return [f"- {line}" for line in lines]


def _baseline(rope_configs: Mapping[str, Mapping[str, Any]] | None, original_theta: float | None) -> str | None:
    """The one method evaluated with the model's own RoPE (plain ``default``, the original base)."""
    found = [name for name, cfg in (rope_configs or {}).items() if cfg.get("rope_type", "default") == "default"
             and (original_theta is None or cfg.get("rope_theta") in (None, original_theta))]
    return found[0] if len(found) == 1 else None


# ------------------------------------------------------------------------------------------ report


def _measured(evals: list[dict], passkeys: list[dict], train: list[dict], search: list[dict]) -> str:
    """The "how this was measured" paragraph, every figure taken from the rows."""
    parts = []
    if evals:
        lengths = sorted({r["length"] for r in evals})
        text = (
            f"Perplexity: next-token perplexity under teacher forcing at {len(lengths)} lengths "
            f"({', '.join(map(str, lengths))} tokens)"
        )
        if any("num_docs" in r for r in evals):
            text += f", over {_spread(r['num_docs'] for r in evals if 'num_docs' in r)} documents per length"
        if any("tokens" in r for r in evals):
            text += f" ({_spread(r['tokens'] for r in evals if 'tokens' in r)} scored tokens per measurement)"
        if any("split" in r for r in evals):
            text += f" of the held-out {' and '.join(sorted({r['split'] for r in evals if 'split' in r}))} split"
        if any("dataset" in r for r in evals):
            text += f", from {', '.join(sorted({str(r['dataset']) for r in evals if 'dataset' in r}))}"
        if any("step" in r for r in evals):
            steps = _spread(r["step"] for r in evals if "step" in r)
            text += f"; the table holds each method's last measurement (training steps {steps})"
        parts.append(text + ".")
    if passkeys:
        depths = sorted({r["depth"] for r in passkeys})
        lengths = sorted({r["length"] for r in passkeys})
        text = (
            f"Passkey retrieval: landmark-attention prompt with the key line at {len(depths)} relative depths "
            f"({', '.join(f'{d:g}' for d in depths)}) at lengths {', '.join(map(str, lengths))}"
        )
        if any("num_samples" in r for r in passkeys):
            samples = _spread(r["num_samples"] for r in passkeys if "num_samples" in r)
            text += f", {samples} samples per length and depth"
        parts.append(
            text + "; a sample counts as retrieved when every answer digit is the argmax prediction under "
            "teacher forcing. The table averages the accuracy over depths."
        )
    if train:
        stages = list(dict.fromkeys(r["stage"] for r in train))
        parts.append(f"Training: {len(train)} logged steps in {len(stages)} stage(s) ({', '.join(stages)}).")
    if search:
        text = f"Search: {len(search)} generations logged"
        fitness = [r for r in search if "fitness_docs" in r]
        if fitness:
            docs = _spread(len(r["fitness_docs"]) for r in fitness)
            seeds = ", ".join(str(s) for s in sorted({r["fitness_seed"] for r in fitness}))
            text += (f"; fitness: perplexity on {docs} documents of the held-out fitness split (drawn with "
                     f"search seed {seeds}), disjoint from the eval split the tables measure on")
        parts.append(text + ".")
    return " ".join(parts)


def _training_table(train: list[dict]) -> str:
    lines = [
        "| stage | logged steps | last step | final loss | final lr | mean tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage in dict.fromkeys(r["stage"] for r in train):
        rows = [r for r in train if r["stage"] == stage]
        last = max(rows, key=lambda r: r["step"])
        speed = sum(r["tokens_per_s"] for r in rows) / len(rows)
        lines.append(
            f"| {stage} | {len(rows)} | {last['step']} | {format_number(last['loss'], 4)} | "
            f"{last['lr']:.3g} | {format_number(speed, 0)} |"
        )
    return "\n".join(lines)


def _search_table(search: list[dict]) -> str:
    lines = [
        "| stage | generations | best ppl (first generation) | best ppl (last) | mean ppl (last) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in dict.fromkeys(r.get("run_stage") for r in search):
        rows = sorted((r for r in search if r.get("run_stage") == stage), key=lambda r: r["generation"])
        lines.append(
            f"| {stage or '-'} | {len(rows)} | {format_number(rows[0]['best_ppl'], 3)} | "
            f"{format_number(rows[-1]['best_ppl'], 3)} | {format_number(rows[-1]['mean_ppl'], 3)} |"
        )
    return "\n".join(lines)


def _original_window(rope_configs: Mapping[str, Mapping[str, Any]] | None) -> int | None:
    found = {c.get("original_max_position_embeddings") for c in (rope_configs or {}).values()} - {None}
    return found.pop() if len(found) == 1 else None


def write_report(
    run_dir: str | os.PathLike,
    title: str,
    rope_configs: dict[str, dict] | None = None,
    *,
    original_window: int | None = None,
    original_theta: float | None = None,
) -> str:
    """Write ``<run_dir>/report.md`` and its plots under ``<run_dir>/plots/``; return the report's path.

    ``rope_configs``: method name → ``RopeConfig.to_dict()``-style dict, for the factor plot.
    ``original_window``: the pre-extension context length, marked on the perplexity plot; by default
    the configs' ``original_max_position_embeddings`` where they agree. ``original_theta``: the
    pre-extension RoPE base, so that a base change (ABF) is drawn as the rescale it is (see
    :func:`rescale_factors`). With a window, a "What this run shows" section summarises the tables
    (:func:`what_it_shows`), the unextended model being the one config of plain ``default`` RoPE.
    """
    run_dir = os.fspath(run_dir)
    rows = read_metrics(os.path.join(run_dir, METRICS_FILE))
    kinds = defaultdict(list)
    for row in rows:
        kinds[row_kind(row)].append(row)
    labelled = _with_labels(kinds["eval"] + kinds["passkey"])
    evals = _latest([r for r in labelled if r["stage"] == "eval"], ("label", "length"))
    passkeys = _latest([r for r in labelled if r["stage"] == "passkey"], ("label", "length", "depth"))
    train, search = kinds["train"], kinds["search"]
    if original_window is None:
        original_window = _original_window(rope_configs)

    plots = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(plots, exist_ok=True)

    def link(kind: str, alt: str) -> str:
        return f"![{alt}]({PLOTS_DIR}/{PLOT_FILES[kind]})"

    md = [f"# {title}", ""]
    if not rows:
        md += [f"No rows in `{METRICS_FILE}` yet.", ""]
    shows = what_it_shows(evals, passkeys, original_window, _baseline(rope_configs, original_theta)) \
        if original_window else []
    if shows:
        md += ["## What this run shows", ""] + shows + [""]
    if evals:
        plot_ppl(evals, os.path.join(plots, PLOT_FILES["ppl"]), original_window)
        md += ["## Perplexity", "", "Rows: methods; columns: sequence length in tokens; a unique best per length in bold.", ""]
        table = format_table(evals, "label", "length", "ppl", best="min", markdown=True, row_header="method")
        md += [table, "", link("ppl", "perplexity vs length"), ""]
    if passkeys:
        plot_passkey(passkeys, os.path.join(plots, PLOT_FILES["passkey"]))
        md += ["## Passkey retrieval", "", "Accuracy per method and length, averaged over key depths.", ""]
        table = format_table(passkeys, "label", "length", "accuracy", best="max", markdown=True, row_header="method")
        md += [table, "", link("passkey", "passkey accuracy by length and depth"), ""]
    if train:
        plot_loss(train, os.path.join(plots, PLOT_FILES["loss"]))
        md += ["## Training", "", _training_table(train), "", link("loss", "training loss"), ""]
    if search:
        md += ["## Factor search", "", _search_table(search), ""]
    if rope_configs:
        factors = {name: rescale_factors(cfg, original_theta) for name, cfg in rope_configs.items()}
        plot_factors(factors, os.path.join(plots, PLOT_FILES["factors"]))
        md += ["## RoPE methods", "", "Rescale λ_i: the factor each frequency is divided by, from the highest "
               "frequency (i = 0) to the lowest, as drawn in the plot below.", "",
               "| method | parameters | λ, first to last |", "|---|---|---|"]
        md += [f"| {name} | {RopeConfig.from_dict(dict(cfg)).describe()} | "
               f"{format_number(factors[name][0])} to {format_number(factors[name][-1])} |"
               for name, cfg in rope_configs.items()]
        md += ["", link("factors", "rescale factors per dimension"), ""]
    others = sorted(f for f in os.listdir(plots) if f.endswith(".png") and f not in PLOT_FILES.values())
    if others:
        md += ["## Other plots", ""] + [f"![{f}]({PLOTS_DIR}/{f})" for f in others] + [""]
    measured = _measured(evals, passkeys, train, search)
    if measured:
        md += ["## How this was measured", "", measured, ""]
    path = os.path.join(run_dir, REPORT_FILE)
    atomic_write_text(path, "\n".join(md))
    return path
