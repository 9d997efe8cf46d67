import json
import math
import os
import re

import pytest
import torch

from megarope.eval.metrics import METRICS_FILE, MetricsWriter, read_metrics
from megarope.eval.passkey import EvalConfigError, accuracy_by_depth, passkey_lm_sample, passkey_samples, wrong_tokens
from megarope.eval.report import PLOT_FILES, format_table, loss_figure, rescale_factors, write_report
from megarope.rope.config import RopeConfig
from megarope.data.tokenizer import ByteTokenizer, HFTokenizer

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def bpe():
    """A tiny byte-level BPE whose merges span digits and filler words, without BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["The grass is green. The sky is blue. The pass key is 12345. 67890 Remember it."] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>"))


# ---------------------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
def test_passkey_samples_length_answer_depth(tok_name, bpe):
    tok = ByteTokenizer() if tok_name == "bytes" else bpe
    length, n = 700, 3
    samples = passkey_samples(tok, length, DEPTHS, n, seed=7)
    assert len(samples) == len(DEPTHS) * n
    task = (
        "There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize them. I will quiz you about the important information there.\n"
    )
    head = len(tok.encode(task)) + (tok.bos_id is not None)
    for s in samples:
        tokens = s["tokens"]
        assert tokens.dtype == torch.int64 and tokens.shape == (length,)
        assert (tokens[0].item() == tok.bos_id) == (tok.bos_id is not None)
        assert s["answer_positions"][-1] == length - 1  # the answer ends the sample
        assert tok.decode(tokens[s["answer_positions"]].tolist()).strip() == s["passkey"]
        assert len(s["passkey"]) == 5 and s["passkey"][0] != "0"
        if tok_name == "bytes":  # the space before the digits is not scored
            assert tok.decode(tokens[s["answer_positions"]].tolist()) == s["passkey"]
        # the key line is where asked: at `depth` of the filler between the task and the question
        key_line = tok.encode(f"\nThe pass key is {s['passkey']}. Remember it. {s['passkey']} is the pass key.\n")
        start = s["key_position"]
        assert tokens[start : start + len(key_line)].tolist() == key_line
        filler = length - head - len(key_line) - len(tok.encode("\nWhat is the pass key? The pass key is"))
        filler -= len(tok.encode(" " + s["passkey"]))
        assert abs((start - head) / filler - s["depth"]) <= 1 / filler
    text = tok.decode(samples[2 * n]["tokens"].tolist())
    assert text.startswith("There is an important info") and "The grass is green. The sky is blue." in text
    assert text.endswith(f"What is the pass key? The pass key is {samples[2 * n]['passkey']}")


def test_passkey_deterministic_and_length_checked():
    tok = ByteTokenizer()
    a = passkey_samples(tok, 512, [0.1, 0.9], 2, seed=3)
    b = passkey_samples(tok, 512, [0.1, 0.9], 2, seed=3)
    c = passkey_samples(tok, 512, [0.1, 0.9], 2, seed=4)
    assert all(torch.equal(x["tokens"], y["tokens"]) and x["passkey"] == y["passkey"] for x, y in zip(a, b))
    assert [x["passkey"] for x in a] != [x["passkey"] for x in c]
    # the same keys at every length of one evaluation
    assert [x["passkey"] for x in passkey_samples(tok, 1024, [0.1, 0.9], 2, seed=3)] == [x["passkey"] for x in a]
    with pytest.raises(EvalConfigError, match="eval.passkey_lengths: passkey length=100 is shorter than the prompt"):
        passkey_samples(tok, 100, [0.5], 1, seed=0)
    with pytest.raises(EvalConfigError, match="eval.passkey_depths"):
        passkey_samples(tok, 512, [1.5], 1, seed=0)


def test_passkey_scoring():
    """The production scorer: the answer mask of passkey_lm_sample, wrong_tokens (as the engine
    counts them from its argmax) and accuracy_by_depth."""
    samples = passkey_samples(ByteTokenizer(), 400, DEPTHS, 2, seed=11)
    scored = [passkey_lm_sample(s) for s in samples]
    perfect = [wrong_tokens(x["labels"], x["labels"], x["loss_mask"]).item() for x in scored]  # guess for t+1 at t
    shifted = [wrong_tokens(x["tokens"], x["labels"], x["loss_mask"]).item() for x in scored]  # repeats token t
    assert accuracy_by_depth(samples, perfect) == {d: 1.0 for d in DEPTHS}
    assert accuracy_by_depth(samples, shifted) == {d: 0.0 for d in DEPTHS}
    # the mask covers exactly the scored answer tokens
    s, x = samples[0], scored[0]
    assert torch.equal(torch.nonzero(x["loss_mask"][0]).flatten() + 1, s["answer_positions"])
    # one wrong digit fails the sample
    wrong = x["labels"].clone()
    wrong[0, s["answer_positions"][2] - 1] += 1
    assert wrong_tokens(wrong, x["labels"], x["loss_mask"]).item() == 1
    half = [0, 1] * len(DEPTHS)
    assert accuracy_by_depth(samples, half) == {d: 0.5 for d in DEPTHS}


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_write_read_rewind(tmp_path):
    path = tmp_path / "run" / METRICS_FILE
    with MetricsWriter(path) as w:
        for step in (1, 2, 3):
            loss = torch.tensor(4.0 - step)  # as a training loop holds it
            w.write({"stage": "train", "step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 100.0})
        w.write({"stage": "eval", "run_stage": "eval", "method": "pi", "length": 64, "ppl": float("inf")})
        with pytest.raises(ValueError, match="missing"):
            w.write({"stage": "passkey", "method": "pi", "length": 64})
    with MetricsWriter(path, enabled=False) as w:  # another rank: validates, writes nothing
        w.write({"stage": "train", "step": 9, "loss": 0.0, "lr": 0.0, "tokens_per_s": 0.0})
        w.rewind("train")
    rows = read_metrics(path)
    assert [r["step"] for r in rows[:3]] == [1, 2, 3] and rows[0]["loss"] == 3.0 and "time" in rows[0]
    assert math.isinf(rows[3]["ppl"]) and len(rows) == 4

    # killed mid-line after step 3; the requeued job resumes training from its step-1 checkpoint
    with open(path, "a") as f:
        f.write('{"stage": "train", "st')
    assert len(read_metrics(path)) == 4  # the partial line is left out
    with MetricsWriter(path) as w:
        w.rewind("train", 1)
        for step in (2, 3, 4):
            w.write({"stage": "train", "step": step, "loss": 10.0 + step, "lr": 1e-3, "tokens_per_s": 100.0})
        w.rewind("eval")  # an eval stage starts over: all its rows go
    train = [(r["step"], r["loss"]) for r in read_metrics(path) if r["stage"] == "train"]
    assert train == [(1, 3.0), (2, 12.0), (3, 13.0), (4, 14.0)]  # each step once, the resumed values
    assert [r["stage"] for r in read_metrics(path)] == ["train"] * 4
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_tensorboard_sink_gets_every_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megarope.eval.metrics import TensorBoardSink

    with MetricsWriter(tmp_path / METRICS_FILE, sinks=[lambda: TensorBoardSink(tmp_path / "tb")]) as w:
        for step in (1, 2):
            w.write({"stage": "train", "step": step, "loss": 3.0 - step, "lr": 1e-3, "tokens_per_s": 10.0})
        w.write({"stage": "eval", "run_stage": "eval", "method": "yarn", "length": 256, "ppl": 7.5})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/train/loss")] == [(1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/yarn/ppl")] == [(256, 7.5)]


def test_wandb_sink_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from megarope.eval.metrics import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsWriter(tmp_path / METRICS_FILE,
                       sinks=[lambda: WandbSink(tmp_path / "wandb", project="megarope-test", name="unit")]) as w:
        w.write({"stage": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0})
        summary = dict(w.sinks[0]._run.summary)
    wandb.finish()
    assert summary["train/train/loss"] == 2.0
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # the offline run file, for `wandb sync`


# ---------------------------------------------------------------------------------------- report


def _synthetic_rows():
    rows = []
    lengths, depths = [256, 1024, 4096], [0.0, 0.5, 1.0]
    for i, method in enumerate(["pi", "yarn", "longrope"]):
        for j, length in enumerate(lengths):
            ppl = 5.0 + 1.37 * i + (3.11 * j if method == "pi" else 0.29 * j) + 0.013 * (i + j)
            ev = {"stage": "eval", "run_stage": "eval", "method": method, "length": length}
            rows.append({**ev, "ppl": ppl, "num_docs": 8})
            for k, depth in enumerate(depths):
                acc = round(((i + 1) * (k + 2) * (j + 3)) % 7 / 6, 4)
                rows.append({**ev, "stage": "passkey", "depth": depth, "accuracy": acc, "num_samples": 6})
    for step in range(1, 21):
        rows.append({"stage": "finetune", "step": step, "loss": 5.0 / step, "lr": 1e-4, "tokens_per_s": 1000.0 + step})
    for g in range(4):
        rows.append({"stage": "search", "run_stage": "search", "generation": g, "best_ppl": 9.0 - g, "mean_ppl": 12.0})
    rows[0] = {**rows[0], "ppl": 4.321}
    return rows


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Section title → rows (header first) of the first markdown table in that section."""
    tables, section, done = {}, None, set()
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("|") and section not in done:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-:"):  # not the separator line
                tables.setdefault(section, []).append(cells)
        elif section in tables:
            done.add(section)
    return tables


def _number(cell: str) -> float:
    return float(cell.strip("*"))


def test_report_numbers_plots_atomic(tmp_path):
    rows = _synthetic_rows()
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = {
        "pi": RopeConfig(rope_type="linear", head_dim=16, factor=4.0).to_dict(),
        "yarn": RopeConfig(rope_type="yarn", head_dim=16, factor=4.0, original_max_position_embeddings=1024).to_dict(),
    }
    path = write_report(tmp_path, "Synthetic run", configs)
    assert path == os.path.join(tmp_path, "report.md")
    text = open(path).read()
    tables = _tables(text)
    written = read_metrics(tmp_path / METRICS_FILE)

    ppl = tables["Perplexity"]
    lengths = [int(c) for c in ppl[0][1:]]
    assert lengths == [256, 1024, 4096]
    evals = {(r["method"], r["length"]): r["ppl"] for r in written if r["stage"] == "eval"}
    assert evals[("pi", 256)] == 4.321
    for line in ppl[1:]:
        for length, cell in zip(lengths, line[1:]):
            assert _number(cell) == pytest.approx(evals[(line[0], length)], abs=0.005)
        assert len(line) == 1 + len(lengths)
    for col, length in enumerate(lengths, start=1):  # exactly the column minimum is bold
        best = min(v for (m, n), v in evals.items() if n == length)
        bold = [line[0] for line in ppl[1:] if line[col].startswith("**")]
        assert bold == [m for (m, n), v in evals.items() if n == length and v == best]

    passkey = tables["Passkey retrieval"]
    for line in passkey[1:]:
        for length, cell in zip(lengths, line[1:]):
            accs = [
                r["accuracy"]
                for r in written
                if r["stage"] == "passkey" and r["method"] == line[0] and r["length"] == length
            ]
            assert len(accs) == 3 and _number(cell) == pytest.approx(sum(accs) / 3, abs=0.005)

    train = tables["Training"][1]
    finetune = [r for r in written if r["stage"] == "finetune"]
    assert train[0] == "finetune" and int(train[1]) == len(finetune) and int(train[2]) == finetune[-1]["step"]
    assert _number(train[3]) == pytest.approx(finetune[-1]["loss"], abs=5e-5)
    search = tables["Factor search"][1]
    assert int(search[1]) == 4 and _number(search[2]) == 9.0 and _number(search[3]) == 6.0

    assert "over 8 documents per length" in text and "6 samples per length and depth" in text
    for name in PLOT_FILES.values():
        assert f"](plots/{name})" in text
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp") or f.startswith(".")]
    assert leftovers == []


def test_factors_and_console_table():
    cfg = RopeConfig(rope_type="linear", head_dim=16, factor=4.0).to_dict()
    assert rescale_factors(cfg) == pytest.approx([4.0] * 8)
    abf = RopeConfig(rope_type="abf", head_dim=16, rope_theta=160_000.0).to_dict()
    lam = rescale_factors(abf, original_theta=10_000.0)
    assert lam[0] == pytest.approx(1.0) and lam[-1] == pytest.approx(16.0 ** (14 / 16))
    rows = [
        {"method": "pi", "length": 128, "ppl": 3.0},
        {"method": "pi", "length": 64, "ppl": 2.5},
        {"method": "yarn", "length": 128, "ppl": 2.0},
    ]
    lines = format_table(rows, best="min").splitlines()
    assert re.split(r"\s+", lines[0]) == ["method", "64", "128"]
    assert re.split(r"\s+", lines[1]) == ["pi", "2.50", "3.00"]  # alone at 64: nothing to be best against
    assert re.split(r"\s+", lines[2]) == ["yarn", "-", "2.00*"]


def test_best_marked_only_when_unique():
    rows = [
        {"method": m, "length": n, "accuracy": acc}
        for m, accs in (("pi", (0.0, 0.5, 0.25, 1.0)), ("yarn", (0.0, 0.5, 0.75, 0.998)), ("ntk", (0.0, 0.25, 0.5, 0.999)))
        for n, acc in zip((64, 128, 256, 512), accs)
    ]
    table = format_table(rows, value_key="accuracy", best="max", markdown=True)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    # 64: all 0.00; 128: a tie; 256: yarn alone; 512: 1.00 for all three as printed (a tie on the page)
    assert cells == [
        ["pi", "0.00", "0.50", "0.25", "1.00"],
        ["yarn", "0.00", "0.50", "**0.75**", "1.00"],
        ["ntk", "0.00", "0.25", "0.50", "1.00"],
    ]


def test_loss_plot_one_panel_per_stage():
    train = [{"stage": "pretrain", "step": s, "loss": 5.0 / s} for s in range(1, 151)]
    train += [{"stage": st, "step": s, "loss": 2.0 + k - 0.01 * s} for k, st in enumerate(["finetune_abf", "finetune_eabf"])
              for s in range(1, 11)]
    fig = loss_figure(train)
    assert [ax.get_title() for ax in fig.axes] == ["pretrain", "finetune_abf", "finetune_eabf"]
    for ax, (first, last, count) in zip(fig.axes, [(1, 150, 150), (1, 10, 10), (1, 10, 10)]):
        (line,) = ax.get_lines()
        x = list(line.get_xdata())
        assert (x[0], x[-1], len(x)) == (first, last, count)
        assert ax.get_xlim()[1] < 2 * last  # each stage on its own step axis


def test_report_stage_labels_and_sparse_rows(tmp_path):
    assert open(write_report(tmp_path, "Empty")).read().startswith("# Empty\n\nNo rows")
    with MetricsWriter(tmp_path / METRICS_FILE) as w:
        for stage, ppl in (("search", 9.5), ("finetune", 7.25)):
            w.write({"stage": "eval", "run_stage": stage, "method": "longrope", "length": 512, "ppl": ppl})
        w.write({"stage": "eval", "run_stage": "finetune", "method": "pi", "length": 512, "ppl": float("inf")})
    text = open(write_report(tmp_path, "Sparse")).read()
    ppl = _tables(text)["Perplexity"]
    assert ppl[1:] == [["longrope (search)", "9.50"], ["longrope (finetune)", "**7.25**"], ["pi", "inf"]]
    assert "## Training" not in text and "## Passkey retrieval" not in text
    assert sorted(os.listdir(tmp_path / "plots")) == [PLOT_FILES["ppl"]]


def test_what_this_run_shows_is_computed_from_the_rows(tmp_path):
    """The summary section names the best method beyond the window and the unextended model's
    ratio to it, every method's in-window change and passkey at the window and beyond: change a
    number and the sentence changes with it."""
    window = 128
    ppl = {"original": (4.0, 40.0), "pi": (5.0, 9.0), "yarn": (4.2, 6.0), "abf": (4.4, 5.0)}
    accuracy = {"original": (1.0, 0.0), "pi": (0.5, 0.25), "yarn": (1.0, 0.5), "abf": (0.75, 1.0)}
    with MetricsWriter(tmp_path / METRICS_FILE) as w:
        for method, values in ppl.items():
            for length, value in zip((window, 8 * window), values):
                w.write({"stage": "eval", "run_stage": method, "method": method, "length": length, "ppl": value})
            for length, acc in zip((window, 8 * window), accuracy[method]):
                for depth, shift in ((0.1, -0.25), (0.9, 0.25)):  # depths average to the value above
                    value = min(1.0, max(0.0, acc + shift)) if 0 < acc < 1 else acc
                    w.write({"stage": "passkey", "run_stage": method, "method": method, "length": length,
                             "depth": depth, "accuracy": value})
    plain = RopeConfig(head_dim=16, max_position_embeddings=window).to_dict()
    configs = {
        "original": plain,
        "pi": RopeConfig(rope_type="linear", head_dim=16, factor=8.0, original_max_position_embeddings=window).to_dict(),
        "yarn": RopeConfig(rope_type="yarn", head_dim=16, factor=8.0, original_max_position_embeddings=window).to_dict(),
        "abf": RopeConfig(rope_type="abf", head_dim=16, rope_theta=500_000.0).to_dict(),
    }
    text = open(write_report(tmp_path, "Shows", configs, original_window=window, original_theta=10_000.0)).read()
    section = text.split("## What this run shows\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert section == [
        "- Beyond the window, at 1024 tokens (8× the 128-token window), abf has the lowest perplexity, 5.00; "
        "the unextended model (original) reaches 40.00, 8.00× as high. The others, best first: yarn 6.00, pi 9.00.",
        "- Within the window (128 tokens) the unextended model's perplexity is 4.00; against it: "
        "pi 5.00 (+25.0%), yarn 4.20 (+5.0%), abf 4.40 (+10.0%).",
        "- Passkey retrieval at the window length (128 tokens): original 1.00 (unextended), yarn 1.00, abf 0.75, pi 0.50.",
        "- Passkey retrieval beyond the window (1024 tokens): original 0.00 (unextended), abf 1.00, yarn 0.50, pi 0.25.",
    ]
    assert text.index("## What this run shows") < text.index("## Perplexity")
    # without a window there is no "beyond" to speak of: no section
    assert "What this run shows" not in open(write_report(tmp_path, "No window", {"original": plain})).read()



def test_abf_factors_are_its_per_dimension_rescale(tmp_path):
    """A base change θ → θ' is the rescale (θ'/θ)^(2i/d) of frequency i: the report's factors
    (plot and table) show that for ABF, not ones, when it knows the original base."""
    with MetricsWriter(tmp_path / METRICS_FILE) as w:
        w.write({"stage": "eval", "run_stage": "abf", "method": "abf", "length": 64, "ppl": 3.0})
    abf = RopeConfig(rope_type="abf", head_dim=16, rope_theta=500_000.0).to_dict()
    i = torch.arange(8, dtype=torch.float64)
    assert rescale_factors(abf, 10_000.0) == pytest.approx((50.0 ** (2 * i / 16)).numpy())
    text = open(write_report(tmp_path, "ABF", {"abf": abf}, original_theta=10_000.0)).read()
    methods = _tables(text)["RoPE methods"]
    assert methods[0][2] == "λ, first to last" and methods[1][2] == f"1.00 to {50.0 ** (14 / 16):.2f}"
    assert (tmp_path / "plots" / PLOT_FILES["factors"]).is_file()
