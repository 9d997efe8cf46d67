import json
import os
import re

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megarope.data.config import DataConfig, DataError
from megarope.data.retrieval import TASK
from megarope.data.sampler import DataIterator, collate, micro_batches
from megarope.data.samples import build_samples, eval_documents
from megarope.data.sources import builtin_corpus, load_documents
from megarope.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BOS, EOS, PAD = ByteTokenizer.BOS, ByteTokenizer.EOS, ByteTokenizer.PAD


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("megarope-cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def doc_ids(text):
    return [BOS] + list(text.encode()) + [EOS]


# ---------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    text = "héllo → 世界 🙂\n\tend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([BOS] + ids + [EOS, PAD]) == text  # special ids carry no text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny byte-level BPE saved as a transformers checkpoint folder, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Hello there, how are you?", "def f(x): return x + 1"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    hf.chat_template = template
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    hf.save_pretrained(folder)
    return str(folder)


def test_hf_tokenizer_from_folder(hf_folder, tmp_path, cache):
    tok = load_tokenizer(hf_folder)
    assert isinstance(tok, HFTokenizer)
    text = "The capital of France is Paris."
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id != tok.eos_id != tok.pad_id and tok.vocab_size >= 6
    assert tok.bos_id not in tok.encode(text)  # encode adds no specials: the data layer does

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": text * 10}])
    cfg = DataConfig(source=src, tokenizer=hf_folder, seq_len=16, num_samples=3, cache_dir=cache, eval_fraction=0)
    samples = build_samples(cfg)
    stream = [tok.bos_id] + tok.encode(text * 10) + [tok.eos_id]
    assert torch.cat([samples[i]["tokens"] for i in range(3)]).tolist() == stream[:48]


def test_sft_with_chat_template(hf_folder, tmp_path, cache):
    tok = load_tokenizer(hf_folder)
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Hello there, fine."},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    cfg = DataConfig(source=src, kind="sft", tokenizer=hf_folder, seq_len=80, cache_dir=cache, eval_fraction=0)
    x = build_samples(cfg)[0]
    full = tok.hf.apply_chat_template(conv, tokenize=False)
    ids = tok.hf.encode(full, add_special_tokens=False)
    n = len(ids)
    assert n < 80 and x["tokens"][:n].tolist() == ids and (x["tokens"][n:] == tok.pad_id).all()
    trained = x["labels"][x["loss_mask"] == 1]
    assert tok.hf.decode(trained) == "Paris.</s>Hello there, fine.</s>"
    # The trained labels are two contiguous runs, each ending on EOS.
    on = x["loss_mask"].nonzero().flatten().tolist()
    runs = [on[0]] + [b for a, b in zip(on, on[1:]) if b != a + 1]
    assert len(runs) == 2 and x["labels"][on[-1]] == tok.eos_id and x["loss_mask"][n - 1 :].sum() == 0


# ------------------------------------------------------------------------------------------ corpus


def test_builtin_corpus_has_long_docs_and_a_stable_split(cache):
    path = builtin_corpus(cache)
    assert builtin_corpus(cache) == path  # written once
    with open(path) as f:
        paths = [json.loads(line)["path"] for line in f]
    assert paths == sorted(paths) and len(paths) > 500
    assert not any(p.startswith("test/") or "/tests/" in p or "site-packages" in p for p in paths)

    cfg = DataConfig(cache_dir=cache)
    train, evals, fitness = (load_documents(cfg, split) for split in ("train", "eval", "fitness"))
    assert len(train) + len(evals) + len(fitness) == len(paths)
    assert not set(train["path"]) & set(evals["path"])
    # the search's fitness documents: held out from training and from every evaluation, about half
    # of the held-out share
    assert not set(fitness["path"]) & (set(evals["path"]) | set(train["path"]))
    assert 0.3 < len(fitness) / (len(fitness) + len(evals)) < 0.7
    assert sorted(evals["path"]) == sorted(load_documents(cfg, "eval")["path"])
    assert sum(len(t) >= 65536 for t in train["text"]) >= 10

    docs = eval_documents(evals, load_tokenizer("bytes"), 8192, 3)
    assert docs.shape == (3, 8192) and docs.dtype == torch.int64 and (docs[:, 0] == BOS).all()


def test_text_folder_gives_one_document_per_file(tmp_path, cache):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("first line\n\nsecond paragraph\n")
    (folder / "sub" / "two.txt").write_text("another file")
    (folder / "notes.md").write_text("not a data file")
    docs = load_documents(DataConfig(source=str(folder), cache_dir=cache), "all")
    assert sorted(docs["text"]) == ["another file", "first line\n\nsecond paragraph\n"]


# ----------------------------------------------------------------------------------------- LM samples


def test_packed_builtin_is_a_contiguous_stream(cache):
    cfg = DataConfig(cache_dir=cache, seq_len=256, num_samples=12)
    samples = build_samples(cfg)
    assert len(samples) == 12
    first_doc = load_documents(cfg, "train")[0]["text"]
    tokens = torch.cat([samples[i]["tokens"] for i in range(12)])
    assert tokens[:3000].tolist() == doc_ids(first_doc)[:3000]
    for i in range(12):
        x = samples[i]
        assert {k: v.dtype for k, v in x.items()} == {
            "tokens": torch.int64,
            "labels": torch.int64,
            "loss_mask": torch.float32,
            "position_ids": torch.int64,
        }
        assert torch.equal(x["labels"][:-1], x["tokens"][1:])
        assert torch.equal(x["position_ids"], torch.arange(256)) and (x["loss_mask"] == 1).all()
        if i + 1 < 12:
            assert x["labels"][-1] == samples[i + 1]["tokens"][0]


def test_packed_reset_positions_and_cu_seqlens(tmp_path, cache):
    texts = ["a" * 8, "b" * 3, "c" * 12, "d" * 5, "e" * 10]  # 10, 5, 14, 7, 12 tokens with BOS/EOS
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    cfg = DataConfig(source=src, seq_len=16, reset_position_ids=True, cache_dir=cache, eval_fraction=0)
    samples = build_samples(cfg)
    assert len(samples) == 2  # 48 tokens → (48 - 1) // 16 windows
    x0, x1 = samples[0], samples[1]
    # Window 0 holds stream [0, 16): a [0, 10), b [10, 15), c's first token.
    assert x0["cu_seqlens"].tolist() == [0, 10, 15, 16] and x0["cu_seqlens"].dtype == torch.int32
    assert x0["position_ids"].tolist() == list(range(10)) + list(range(5)) + [0]
    # Labels that open the next document (b's BOS, c's BOS) are not trained.
    assert (x0["loss_mask"] == 0).nonzero().flatten().tolist() == [9, 14]
    assert x0["labels"][9] == BOS and x0["labels"][14] == BOS
    # Window 1 holds [16, 32): the rest of c (a sequence of its own, from position 0), then d.
    assert x1["cu_seqlens"].tolist() == [0, 13, 16]
    assert x1["position_ids"].tolist() == list(range(13)) + list(range(3))
    assert (x1["loss_mask"] == 0).nonzero().flatten().tolist() == [12]
    batch = collate([x0, x1])
    assert batch["tokens"].shape == (2, 16) and batch["position_ids"].shape == (2, 16)
    assert batch["cu_seqlens"].tolist() == [0, 10, 15, 16, 29, 32]
    # micro-batches of one row each carry that row's own offsets again
    first, second = micro_batches(batch, 1)
    assert first["cu_seqlens"].tolist() == [0, 10, 15, 16] and second["cu_seqlens"].tolist() == [0, 13, 16]
    assert torch.equal(second["tokens"], x1["tokens"][None])
    assert micro_batches(batch, 2)[0]["cu_seqlens"].tolist() == batch["cu_seqlens"].tolist()


def test_truncated_cuts_skips_and_pads(tmp_path, cache):
    texts = ["x" * 3, "y" * 14, "z" * 40, "w" * 10]  # 5, 16, 42, 12 tokens
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    cfg = DataConfig(source=src, seq_len=16, mode="truncated", cache_dir=cache, eval_fraction=0)
    samples = build_samples(cfg)
    assert len(samples) == 2  # the 5- and 12-token documents are skipped
    exact, longer = samples[0], samples[1]
    assert exact["tokens"].tolist() == doc_ids("y" * 14)
    assert exact["labels"].tolist() == doc_ids("y" * 14)[1:] + [PAD]
    assert exact["loss_mask"].tolist() == [1.0] * 15 + [0.0]
    assert longer["tokens"].tolist() == doc_ids("z" * 40)[:16]
    assert longer["labels"].tolist() == doc_ids("z" * 40)[1:17] and (longer["loss_mask"] == 1).all()
    assert torch.equal(longer["position_ids"], torch.arange(16))


# ------------------------------------------------------------------------------------- retrieval mix


def test_retrieval_share_mixes_passkey_sequences_of_training_text(tmp_path, cache):
    """With retrieval_share 0.6, 60% of the samples are retrieval sequences: the passkey
    template (as the evaluation's), filler cut from the training text with its digits left out (the
    key is the only number, as in the evaluation), a random key at a random depth asked for at the
    end; full length, trained on every token, reproducible."""
    texts = [f"doc {i}: " + "".join(chr(97 + (i * 7 + j) % 26) for j in range(900)) for i in range(8)]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    base = DataConfig(source=src, seq_len=320, cache_dir=cache, eval_fraction=0)
    text_only = build_samples(base)
    mixed = build_samples(DataConfig(**{**base.__dict__, "retrieval_share": 0.6}))
    assert len(mixed) == len(text_only) + round(len(text_only) * 1.5)
    for i in range(len(text_only)):  # the text samples come first, unchanged
        assert torch.equal(mixed[i]["tokens"], text_only[i]["tokens"])
    tok = ByteTokenizer()
    keys, depths = [], []
    corpus = re.sub(r"\d", "", "".join(texts))
    for i in range(len(text_only), len(mixed)):
        x = mixed[i]
        assert x["tokens"].shape == (320,) and torch.equal(x["labels"][:-1], x["tokens"][1:])
        assert (x["loss_mask"] == 1).all() and torch.equal(x["position_ids"], torch.arange(320))
        assert x["tokens"][0] == BOS
        whole = tok.decode(x["tokens"].tolist() + [x["labels"][-1].item()])
        head, rest = whole.split("\n", 1)
        assert head == TASK
        match = re.fullmatch(r"(.*)\nThe pass key is (\d{5})\. Remember it\. \2 is the pass key\.\n(.*)\n"
                             r"What is the pass key\? The pass key is (\d{5})", rest, re.S)
        assert match and match[2] == match[4] and match[2][0] != "0"
        before, after = match[1], match[3]
        # the filler is the training text: a snippet of it without digits, tiled
        filler = before + after
        assert not re.search(r"\d", filler)
        unit = next(n for n in range(16, len(filler) + 1) if filler[n:] == (filler[:n] * len(filler))[: len(filler) - n])
        assert filler[:unit] in corpus
        keys.append(match[2])
        depths.append(len(before) / len(filler))
    assert len(set(keys)) == len(keys) and min(depths) < 0.2 and max(depths) > 0.8
    again = build_samples(DataConfig(**{**base.__dict__, "retrieval_share": 0.6}))
    assert torch.equal(again[len(mixed) - 1]["tokens"], mixed[len(mixed) - 1]["tokens"])


def test_retrieval_share_with_packed_positions_is_one_sequence(tmp_path, cache):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "x" * 2000}])
    cfg = DataConfig(source=src, seq_len=300, cache_dir=cache, eval_fraction=0, reset_position_ids=True,
                     retrieval_share=0.5)
    samples = build_samples(cfg)
    last = samples[len(samples) - 1]
    assert last["cu_seqlens"].tolist() == [0, 300] and torch.equal(last["position_ids"], torch.arange(300))
    batch = collate([samples[0], last])  # the sampler stacks both kinds into one batch
    assert batch["cu_seqlens"].tolist()[-2:] == [300, 600]


def test_copy_sequences_repeat_each_random_string_at_once(tmp_path, cache):
    """retrieval_kind="copy": BOS, then lines of a random string (3-10 letters/digits) written twice,
    to the full length; "mixed" alternates passkey (even index) and copy (odd) sequences."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "p" * 3000}])
    base = dict(source=src, seq_len=320, cache_dir=cache, eval_fraction=0, retrieval_share=0.5)
    tok = ByteTokenizer()
    copies = build_samples(DataConfig(**base, retrieval_kind="copy"))
    text_count = len(build_samples(DataConfig(**{**base, "retrieval_share": 0.0})))
    strings = []
    for i in range(text_count, len(copies)):
        x = copies[i]
        assert x["tokens"].shape == (320,) and x["tokens"][0] == BOS and (x["loss_mask"] == 1).all()
        lines = tok.decode(x["tokens"][1:].tolist()).split("\n")
        for line in lines[:-1]:  # the last line is cut at the sequence's end
            half = len(line) // 2
            assert re.fullmatch(r"[0-9A-Z]{6,20}", line) and line[:half] == line[half:], line
            strings.append(line[:half])
    assert len(set(strings)) > 0.9 * len(strings) and {len(s) for s in strings} == set(range(3, 11))
    mixed = build_samples(DataConfig(**base, retrieval_kind="mixed"))
    first = text_count  # retrieval index 0: a passkey sequence, index 1: a copy sequence
    assert tok.decode(mixed[first]["tokens"][1:].tolist()).startswith(TASK)
    assert torch.equal(mixed[first + 1]["tokens"], copies[first + 1]["tokens"])
    # copy sequences need no room for the passkey prompt
    short = build_samples(DataConfig(**{**base, "seq_len": 64}, retrieval_kind="copy"))
    assert short[len(short) - 1]["tokens"].shape == (64,)


def test_copy_gap_puts_filler_between_a_string_and_its_repeat(tmp_path, cache):
    """data.copy_gap=G: each repeat follows its string after 0..G characters none of which can occur
    in a string, all gap lengths drawn; with copy_gap=0 every repeat follows at once."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "p" * 3000}])
    base = dict(source=src, seq_len=320, cache_dir=cache, eval_fraction=0, retrieval_share=0.5, retrieval_kind="copy")
    plain, gapped = build_samples(DataConfig(**base)), build_samples(DataConfig(**base, copy_gap=12))
    first = len(build_samples(DataConfig(**{**base, "retrieval_share": 0.0})))
    assert {g for i in range(first, len(plain)) for g in _copy_gaps(plain[i]["tokens"])} == {0}
    gaps = []
    for i in range(first, len(gapped)):
        gaps += _copy_gaps(gapped[i]["tokens"])
    assert set(gaps) == set(range(13))


def test_retrieval_share_one_is_retrieval_sequences_only(tmp_path, cache):
    """retrieval_share=1.0: as many retrieval sequences as there are text samples, and no text."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "p" * 3000}])
    base = dict(source=src, seq_len=320, cache_dir=cache, eval_fraction=0, retrieval_kind="copy")
    text = build_samples(DataConfig(**base))
    only = build_samples(DataConfig(**base, retrieval_share=1.0))
    assert len(only) == len(text)
    for i in range(len(only)):
        gaps = _copy_gaps(only[i]["tokens"])
        assert gaps and set(gaps) == {0}  # a copy row (a text row has no line)


def _copy_gaps(row: torch.Tensor) -> list[int]:
    """The gap lengths of a copy sequence's complete lines (none for a text row: it has no line)."""
    lines = ByteTokenizer().decode(row[1:].tolist()).split("\n")[:-1]
    matches = [re.fullmatch(r"([0-9A-Z]{3,10})([a-z ,.]*)\1", line) for line in lines]
    assert all(matches), lines
    return [len(m[2]) for m in matches]


def test_copy_gap_ramp_grows_the_gap_limit_with_the_step(tmp_path, cache):
    """data.copy_gap_ramp=[2, 6]: the sampler tells the samples its step; gaps are 0 up to step 2, at
    most copy_gap*(step-2)/4 on the ramp, up to copy_gap from step 6 on; a resumed iterator makes
    the same batches as the uninterrupted one."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "p" * 3000}])
    cfg = DataConfig(source=src, seq_len=320, cache_dir=cache, eval_fraction=0, retrieval_share=0.9,
                     retrieval_kind="copy", copy_gap=20, copy_gap_ramp=[2, 6])
    samples = build_samples(cfg)
    batches = DataIterator(samples, 8, seed=3)
    longest = []
    for step in range(9):
        batch = next(batches)
        longest.append(max(g for row in batch["tokens"] for g in _copy_gaps(row) or [0]))
        if step == 4:
            state = batches.state_dict()
    limits = [0, 0, 0, 5, 10, 15, 20, 20, 20]
    assert all(m <= limit for m, limit in zip(longest, limits)) and longest[-3:] != [0, 0, 0], longest
    assert min(longest[-3:]) >= 15, longest
    resumed = DataIterator(samples, 8, seed=3)
    resumed.load_state_dict(state)
    again = DataIterator(build_samples(cfg), 8, seed=3)
    expected = [next(again) for _ in range(9)][5:]
    for want in expected:
        assert torch.equal(next(resumed)["tokens"], want["tokens"])
    # a ramp of no length ([3, 3]): no gaps before step 3, copy_gap from step 3 on
    retrieval = build_samples(DataConfig(**{**cfg.__dict__, "copy_gap_ramp": [3, 3]})).datasets[1]
    limits = []
    for step in range(5):
        retrieval.set_step(step)
        limits.append(retrieval.gap_limit())
    assert limits == [0, 0, 0, 20, 20]


@pytest.mark.parametrize("change, message", [
    ({"retrieval_kind": "needle"}, "expected one of passkey|copy|mixed"),
    ({"copy_gap": -1}, "expected a non-negative integer"),
    ({"copy_gap_ramp": [5, 2]}, "expected [first, last] steps"),
    ({"retrieval_share": 1.5}, "expected a share in"),
    ({"retrieval_share": -0.1}, "expected a share in"),
    ({"retrieval_share": 0.3, "kind": "sft"}, "kind='lm' only"),
    ({"retrieval_share": 0.3, "seq_len": 200}, "takes 254 tokens without filler"),
])
def test_retrieval_share_checked(change, message, tmp_path, cache):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "q" * 3000}])
    cfg = DataConfig(**{"source": src, "seq_len": 320, "cache_dir": cache, "eval_fraction": 0, **change})
    field = "data." + next(k for k in ("seq_len", "retrieval_kind", "copy_gap_ramp", "copy_gap", "retrieval_share")
                           if k in change)
    with pytest.raises(DataError, match=re.escape(field) + ".*" + re.escape(message)):
        build_samples(cfg)


# ------------------------------------------------------------------------------------------------ SFT

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Ciao"},
    ]
}
SHORT = {"conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]}


def as_messages(conv):
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    return {"messages": [{"role": role[t["from"]], "content": t["value"]} for t in conv["conversations"]]}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_sft_loss_mask_exactly_on_assistant_tokens(fmt, tmp_path, cache):
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "chat.jsonl", [SHORT, SHAREGPT])
    else:  # the OpenAI "messages" spelling, through the parquet builder
        src = str(tmp_path / "chat.parquet")
        pq.write_table(pa.Table.from_pylist([as_messages(SHORT), as_messages(SHAREGPT)]), src)
    cfg = DataConfig(source=src, kind="sft", seq_len=96, min_tokens=23, cache_dir=cache, eval_fraction=0)
    samples = build_samples(cfg)
    assert len(samples) == 1  # SHORT (22 tokens) is under min_tokens

    prompt1 = "System: Be brief.\nUser: Hi\nAssistant: "
    prompt2 = "User: Bye\nAssistant: "
    ids = [BOS] + list(prompt1.encode()) + list(b"Hello!") + [EOS] + list(prompt2.encode()) + list(b"Ciao") + [EOS]
    start1 = 1 + len(prompt1)  # index of the first assistant token
    start2 = start1 + len(b"Hello!") + 1 + len(prompt2)
    assistant = set(range(start1, start1 + 7)) | set(range(start2, start2 + 5))  # incl. each EOS
    x = samples[0]
    n = len(ids)
    assert x["tokens"].tolist() == ids + [PAD] * (96 - n)
    assert x["labels"].tolist() == ids[1:] + [PAD] * (97 - n)
    expected = [1.0 if j + 1 in assistant else 0.0 for j in range(96)]
    assert x["loss_mask"].tolist() == expected
    assert x["labels"][x["loss_mask"] == 1].tolist() == list(b"Hello!") + [EOS] + list(b"Ciao") + [EOS]


def test_sft_cut_to_seq_len(tmp_path, cache):
    src = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT])
    cfg = DataConfig(source=src, kind="sft", seq_len=44, cache_dir=cache, eval_fraction=0)
    x = build_samples(cfg)[0]
    # BOS and 38 prompt tokens, then "Hello!" at 39..44 and its EOS at 45: labels 0..43 reach token 44.
    assert x["tokens"].shape == (44,) and (x["tokens"] != PAD).all()
    assert x["loss_mask"].nonzero().flatten().tolist() == [38, 39, 40, 41, 42, 43]
    assert x["labels"][38:].tolist() == list(b"Hello!")


# ------------------------------------------------------------------------------------------ iterator


def test_iterator_resume_and_dp_slices():
    samples = [{"tokens": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(23)]
    it = DataIterator(samples, batch_size=2, seed=7, dp_rank=1, dp_size=2)
    assert it.steps_per_epoch == 5
    head = [next(it) for _ in range(7)]  # crosses into epoch 1
    state = it.state_dict()
    tail = [next(it)["tokens"].flatten().tolist() for _ in range(6)]
    resumed = DataIterator(samples, batch_size=2, seed=7, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert [next(resumed)["tokens"].flatten().tolist() for _ in range(6)] == tail
    assert state["epoch"] == 1 and state["position"] == 2 and head[0]["tokens"].shape == (2, 1)

    # Ranks take disjoint slices of one shuffled epoch; epochs are shuffled differently.
    ranks = [DataIterator(samples, 2, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    epoch0 = [[next(r)["tokens"].flatten().tolist() for _ in range(5)] for r in ranks]
    seen = sum((b for rank in epoch0 for b in rank), [])
    assert len(set(seen)) == 20
    assert [next(ranks[0])["tokens"].flatten().tolist() for _ in range(5)] != epoch0[0]

    with pytest.raises(DataError, match="train.seed: cannot resume, seed was 7"):
        DataIterator(samples, 2, seed=8, dp_rank=1, dp_size=2).load_state_dict(state)


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, field",
    [
        ({"source": "/no/such/corpus.jsonl"}, "data.source"),
        ({"format": "csv"}, "data.format"),
        ({"kind": "chat"}, "data.kind"),
        ({"mode": "sliding"}, "data.mode"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"seq_len": 10_000}, "data.seq_len"),  # more tokens than the file has
        ({"mode": "truncated", "num_samples": 3}, "data.num_samples"),  # only 2 documents long enough
        ({"num_samples": 1000}, "data.num_samples"),
        ({"text_key": "content"}, "data.text_key"),
        ({"tokenizer": "/no/such/tokenizer"}, "data.tokenizer"),
        ({"kind": "sft"}, "data.kind"),  # no conversations column
    ],
)
def test_errors_name_the_field(change, field, tmp_path, cache):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "q" * 200}, {"text": "r" * 300}, {"text": "s"}])
    cfg = DataConfig(**{"source": src, "seq_len": 64, "cache_dir": cache, "eval_fraction": 0, **change})
    with pytest.raises(DataError, match=field.replace(".", r"\.")):
        build_samples(cfg)


def test_auto_format_needs_a_known_suffix(tmp_path, cache):
    path = tmp_path / "corpus.dat"
    path.write_text('{"text": "abc"}\n')
    with pytest.raises(DataError, match=r"data\.format"):
        build_samples(DataConfig(source=str(path), cache_dir=cache, eval_fraction=0))
    samples = build_samples(DataConfig(source=str(path), format="json", seq_len=2, cache_dir=cache, eval_fraction=0))
    assert samples[0]["tokens"].tolist() == [BOS, ord("a")]
