"""acceltrain.data: text loading, BPE tokenizer training, token packing, the resumable sampler."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import acceltrain.data.tokenizer as tokenizer_module
from acceltrain.data import (
    DataError,
    PackedCorpus,
    PackedTokens,
    ResumableSampler,
    load_texts,
    load_tokenizer,
    pack_texts,
    python_stdlib_corpus,
    texts_fingerprint,
    train_bpe_tokenizer,
    train_val_split,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def _docs(n: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 40)))
        docs.append(
            f"doc {i}: " + " ".join(words) + ("\n\ndef f(x):\n    return x * 2\n" if i % 3 == 0 else ".")
        )
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _docs()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs):
    return train_bpe_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"), min_frequency=1)


# ---------------------------------------------------------------------------- packing
def test_packing_keeps_every_token_once_with_eos_after_each_document(tmp_path, docs, tok):
    corpus = pack_texts(docs, tok, tmp_path, batch_size=7)  # batch edges inside the corpus
    eos = tok.eos_token_id
    per_doc = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    expected = np.array([t for ids in per_doc for t in [*ids, eos]])

    tokens = corpus.tokens()
    assert corpus.dtype == "uint16" and tokens.dtype == np.uint16
    assert corpus.num_tokens == sum(len(ids) for ids in per_doc) + len(docs) == len(tokens)
    assert corpus.num_documents == len(docs)
    np.testing.assert_array_equal(tokens, expected)
    # EOS sits exactly at every document end and nowhere else.
    ends = np.cumsum([len(ids) + 1 for ids in per_doc]) - 1
    np.testing.assert_array_equal(np.flatnonzero(tokens == eos), ends)
    sidecar = json.loads(corpus.path.with_suffix(".json").read_text())
    assert sidecar["num_tokens"] == corpus.num_tokens and sidecar["dtype"] == "uint16"
    assert sidecar["key"] == corpus.key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_packing_second_run_is_a_cache_hit_without_tokenizing(tmp_path, docs, tok, monkeypatch):
    first = pack_texts(docs, tok, tmp_path)
    assert not first.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(type(tok), "__call__", no_tokenizing)
    second = pack_texts(docs, tok, tmp_path)
    assert second.from_cache and second.path == first.path and second.num_tokens == first.num_tokens
    # A stream with its fingerprint hits the same cache entry.
    third = pack_texts(iter(docs), tok, tmp_path, fingerprint=texts_fingerprint(docs))
    assert third.from_cache and third.key == first.key
    monkeypatch.undo()

    changed = pack_texts([*docs, "one more document"], tok, tmp_path)
    assert not changed.from_cache and changed.key != first.key


def test_packing_repacks_when_the_sidecar_is_missing(tmp_path, docs, tok):
    first = pack_texts(docs, tok, tmp_path)
    first.path.with_suffix(".json").unlink()  # as if the run died between the two renames
    again = pack_texts(docs, tok, tmp_path)
    assert not again.from_cache and again.num_tokens == first.num_tokens
    with pytest.raises(DataError, match="sidecar"):
        first.path.with_suffix(".json").unlink()
        PackedCorpus.open(first.path)


def test_packing_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no documents"):
        pack_texts([], tok, tmp_path)
    with pytest.raises(TypeError):
        pack_texts("a single string", tok, tmp_path)


def test_windows_items_and_split_never_overlap(tmp_path, docs, tok):
    corpus = pack_texts(docs, tok, tmp_path)
    seq_len = 16
    train, val = train_val_split(corpus, seq_len, val_fraction=0.1)
    n = corpus.num_tokens // seq_len
    assert len(train) + len(val) == n and len(val) == max(1, round(n * 0.1))

    train_tokens = set()
    for i in range(len(train)):
        start, stop = train.token_range(i)
        assert stop - start == seq_len
        train_tokens.update(range(start, stop))
    val_tokens = set()
    for i in range(len(val)):
        val_tokens.update(range(*val.token_range(i)))
    assert not train_tokens & val_tokens
    assert max(train_tokens) < min(val_tokens)  # held out at the end of the stream
    assert len(train_tokens) + len(val_tokens) == n * seq_len  # windows tile the stream

    tokens = corpus.tokens()
    item = val[len(val) - 1]
    start, stop = val.token_range(len(val) - 1)
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (seq_len,)
    assert torch.equal(item["input_ids"], item["labels"]) and item["labels"] is not item["input_ids"]
    np.testing.assert_array_equal(item["input_ids"].numpy(), tokens[start:stop])
    with pytest.raises(IndexError):
        val[len(val)]

    # At least one validation window, however small the fraction.
    _, tiny_val = train_val_split(corpus, seq_len, val_fraction=1e-9)
    assert len(tiny_val) == 1
    with pytest.raises(DataError, match="at least 2"):
        train_val_split(corpus, corpus.num_tokens, val_fraction=0.5)


def test_packed_tokens_pickle_drops_the_memmap_and_loads_from_a_path(tmp_path, docs, tok):
    corpus = pack_texts(docs, tok, tmp_path)
    ds = PackedTokens(corpus.path, 8)  # reopened from the sidecar
    first = ds[0]["input_ids"]
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # the token file is not in the pickle
    assert torch.equal(pickle.loads(blob)[0]["input_ids"], first)
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=ResumableSampler(len(ds), seed=1))))
    assert batch["input_ids"].shape == (4, 8)


# ---------------------------------------------------------------------------- sampler
def test_sampler_is_deterministic_per_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    assert list(a) == list(b)
    assert sorted(ResumableSampler(50, seed=3)) == list(range(50))
    assert list(ResumableSampler(50, seed=3)) != list(ResumableSampler(50, seed=4))
    c = ResumableSampler(50, seed=3)
    epoch0 = list(c)
    epoch1 = list(c)  # a complete pass moves to the next epoch by itself
    assert c.epoch == 2 and epoch0 != epoch1
    c.set_epoch(1)
    assert list(c) == epoch1
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_shards_are_disjoint_and_cover_the_epoch(drop_last):
    n, replicas = 103, 4
    shards = [
        list(ResumableSampler(n, num_replicas=replicas, rank=r, seed=7, drop_last=drop_last))
        for r in range(replicas)
    ]
    sizes = {len(s) for s in shards}
    assert sizes == {n // replicas if drop_last else -(-n // replicas)}
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == 100  # disjoint; the 3 left over are dropped
    else:
        assert set(flat) == set(range(n)) and len(flat) == 104  # covers all; one sample padded
    # Interleaving the shards gives back the single global permutation.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert [shards[k % replicas][k // replicas] for k in range(100)] == order[:100]


def test_sampler_set_start_yields_the_tail_and_reads_no_skipped_index(monkeypatch):
    full = list(ResumableSampler(1000, num_replicas=2, rank=1, seed=5))
    for k in (0, 1, 137, 499, 500):
        s = ResumableSampler(1000, num_replicas=2, rank=1, seed=5)
        s.set_start(k)
        assert len(s) == 500 - k
        assert list(s) == full[k:]

    calls = []
    real_randperm = torch.randperm

    def counting_randperm(*args, **kwargs):
        calls.append(args)
        return real_randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting_randperm)
    n = 2_000_000
    big = ResumableSampler(n, seed=0)
    big.set_start(n - 3)  # resume at the very end of a huge epoch
    tail = list(big)
    assert len(tail) == 3 and len(calls) == 1  # one permutation, sliced: nothing replayed
    with pytest.raises(ValueError, match="start"):
        big.set_start(n + 1)


def test_sampler_state_dict_round_trip_and_accelerate_style_set_epoch():
    s = ResumableSampler(40, num_replicas=2, rank=0, seed=11)
    s.set_epoch(3)
    expected = list(ResumableSampler(40, num_replicas=2, rank=0, seed=11).epoch_order(3).tolist())
    it = iter(s)
    taken = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 3 and state["offset"] == 7 and taken == expected[:7]
    assert s.state_dict(consumed=4)["offset"] == 4

    resumed = ResumableSampler(40, num_replicas=2, rank=0, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(3)  # Accelerate calls set_epoch at every pass: same epoch keeps the offset
    assert len(resumed) == 13 and list(resumed) == expected[7:]
    assert resumed.state_dict()["epoch"] == 4 and resumed.state_dict()["offset"] == 0

    resumed.set_start(5)
    resumed.set_epoch(6)  # another epoch starts from its beginning
    assert len(resumed) == 20


def test_sampler_resume_in_a_dataloader_matches_the_uninterrupted_run():
    data = list(range(37))
    full = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=ResumableSampler(37, seed=2))]
    sampler = ResumableSampler(37, seed=2)
    sampler.set_start(3 * 4)  # three batches consumed
    rest = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)]
    assert rest == full[3:]


def test_sampler_refuses_a_different_world_or_dataset():
    state = ResumableSampler(40, num_replicas=2, rank=0).state_dict()
    old_format = {k: v for k, v in state.items() if k != "global_offset"}  # other worlds: tests/unit/test_sampler.py
    with pytest.raises(ValueError, match="num_replicas=2.*num_replicas=4"):
        ResumableSampler(40, num_replicas=4, rank=0).load_state_dict(old_format)
    with pytest.raises(ValueError, match="dataset_len"):
        ResumableSampler(41, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="dataset_len"):
        ResumableSampler(0)


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_trains_saves_and_loads_without_acceltrain(tmp_path, docs):
    out = tmp_path / "tok"
    tok = train_bpe_tokenizer(docs, 320, out, min_frequency=1)
    assert tok.acceltrain_cache_hit is False
    assert {"tokenizer.json", "tokenizer_config.json", tokenizer_module.STAMP_FILE} <= {
        p.name for p in out.iterdir()
    }
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1 and len(tok) <= 320
    text = "doc 7: gamma delta — naïve ☃ 🙂\n\tx = 1"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte level: any UTF-8 round-trips

    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        ids = tok(sys.argv[2], add_special_tokens=False)["input_ids"]
        assert not any(m == "acceltrain" or m.startswith("acceltrain.") for m in sys.modules)
        print(json.dumps({"ids": ids, "eos": tok.eos_token, "pad": tok.pad_token, "n": len(tok)}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out), text],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"ids": ids, "eos": "<|endoftext|>", "pad": "<|pad|>", "n": len(tok)}


def test_tokenizer_second_call_loads_the_cache(tmp_path, docs, monkeypatch):
    out = tmp_path / "tok"
    first = train_bpe_tokenizer(docs, 300, out, min_frequency=1)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again on a cache hit")

    monkeypatch.setattr(tokenizer_module, "_train", no_training)
    again = train_bpe_tokenizer(list(docs), 300, out, min_frequency=1)
    assert again.acceltrain_cache_hit is True
    assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    # Another window length (model_max_length) is the same trained tokenizer, applied on load.
    shorter = train_bpe_tokenizer(list(docs), 300, out, min_frequency=1, model_max_length=32)
    assert shorter.acceltrain_cache_hit is True and shorter.model_max_length == 32
    with pytest.raises(AssertionError, match="trained again"):
        train_bpe_tokenizer(docs, 310, out, min_frequency=1)  # another vocab size is another key
    monkeypatch.undo()

    loaded = load_tokenizer(out)
    assert loaded.eos_token == "<|endoftext|>" and len(loaded) == len(first)


def test_tokenizer_argument_errors(tmp_path, docs):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(docs, 100, tmp_path)
    with pytest.raises(DataError, match="empty"):
        train_bpe_tokenizer([], 300, tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------- text loading
def _write_corpus_folder(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    (root / "a.txt").write_text("first text file\n\nsecond paragraph\n")
    (root / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["j1", "", "j2"]))
    )
    (root / "c.csv").write_text('text,label\nc1,0\n,1\n"c2\nwith newline",2\n')
    sub = root / "sub"
    sub.mkdir()
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "n": [1, 2, 3]}), sub / "d.parquet")
    (root / "README.md").write_text("not data")  # other extensions in a folder are skipped
    (root / ".hidden.txt").write_text("hidden files are skipped")


def test_load_texts_files_and_folders(tmp_path):
    root = tmp_path / "corpus"
    _write_corpus_folder(root)
    cache = tmp_path / "hf"
    docs = load_texts(root, cache_dir=cache)
    assert docs == ["first text file\n\nsecond paragraph\n", "j1", "j2", "c1", "c2\nwith newline", "p1", "p2"]
    assert load_texts(root / "a.txt", txt_mode="paragraph") == ["first text file", "second paragraph\n"]
    assert load_texts(root / "b.jsonl", cache_dir=cache) == ["j1", "j2"]
    assert load_texts(root / "sub" / "d.parquet", cache_dir=cache) == ["p1", "p2"]
    capped = load_texts(root, cache_dir=cache, max_bytes=40)
    assert sum(len(d.encode()) for d in capped) <= 40 and capped[0].startswith("first")


def test_load_texts_errors_name_the_file_or_field(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    with pytest.raises(DataError, match="not found: .*missing.jsonl"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(DataError, match=r"notes.xyz: unknown extension '\.xyz'"):
        load_texts(tmp_path / "notes.xyz")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "b", "title": "t"}) + "\n")
    with pytest.raises(DataError, match="rows.jsonl: no column 'text'; available columns: body, title"):
        load_texts(tmp_path / "rows.jsonl", cache_dir=cache)
    with pytest.raises(DataError, match="'title'.*not text") as err:
        (tmp_path / "nums.jsonl").write_text(json.dumps({"title": 3}) + "\n")
        load_texts(tmp_path / "nums.jsonl", text_column="title", cache_dir=cache)
    assert "nums.jsonl" in str(err.value)
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    with pytest.raises(DataError, match="blank.txt: no text"):
        load_texts(tmp_path / "blank.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files"):
        load_texts(tmp_path / "empty")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load 'someone/corpus' from the Hugging Face Hub"):
        load_texts("someone/corpus")


def test_hub_dataset_name_config_and_split_reach_load_dataset(monkeypatch):
    # No network here: datasets.load_dataset is replaced by an in-memory table, and what the
    # loader was asked for is recorded.
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, *, split, cache_dir=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict({"body": ["first doc", "second doc"], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load_texts("someone/corpus", text_column="body", config_name="raw-v1", split="train[:10%]")
    assert got == ["first doc", "second doc"]
    assert calls == [("someone/corpus", "raw-v1", "train[:10%]")]
    with pytest.raises(DataError, match=r"hub dataset 'someone/corpus': no column 'text'; available columns: body, id"):
        load_texts("someone/corpus")


def test_stdlib_corpus_is_deterministic_and_capped():
    docs = python_stdlib_corpus(max_bytes=300_000)
    assert docs and docs == python_stdlib_corpus(max_bytes=300_000)
    assert 250_000 < sum(len(d.encode()) for d in docs) <= 300_000
    assert load_texts("python-stdlib", max_bytes=300_000) == docs
    prose = python_stdlib_corpus(max_bytes=50_000, kind="docstrings")
    assert prose and "def " not in prose[0][:200]


def test_texts_fingerprint_sees_boundaries_and_order():
    assert texts_fingerprint(["ab", "c"]) != texts_fingerprint(["a", "bc"])
    assert texts_fingerprint(["a", "b"]) != texts_fingerprint(["b", "a"])
    assert texts_fingerprint(iter(["a", "b"])) == texts_fingerprint(["a", "b"])
