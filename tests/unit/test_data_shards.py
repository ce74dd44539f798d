"""acceltrain/data/shards.py and sources.py: streaming formats, parallel shards, caching, bad input."""

from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from acceltrain.data import DataError
from acceltrain.data.shards import MANIFEST, ShardedCorpus, default_workers, ingest
from acceltrain.data.sources import SourceSpec, TextSource, parse_sources, take_bytes

WORDS = ["the", "trainer", "saves", "a", "model", "rank", "loads", "every", "shard", "loss"]


def word_tokenizer():
    """A tiny fast tokenizer built from a config (no download): one id per word, EOS is 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def expected_tokens(texts: list[str]) -> list[int]:
    ids = {w: i + 2 for i, w in enumerate(WORDS)}
    out: list[int] = []
    for t in texts:
        out += [ids[w] for w in t.split()] + [0]
    return out


def all_tokens(corpus: ShardedCorpus) -> list[int]:
    return np.concatenate([np.asarray(corpus.tokens(i)) for i in range(len(corpus.shards))]).tolist()


def test_two_workers_write_byte_identical_shards_to_one(tmp_path):
    texts = docs(3000)
    source = TextSource(SourceSpec(str(write_jsonl(tmp_path / "a.jsonl", texts))))
    tok = word_tokenizer()
    one = ingest(source.documents(), tok, tmp_path / "c1", key=source.key(), workers=1, shard_bytes=8_000)
    two = ingest(source.documents(), tok, tmp_path / "c2", key=source.key(), workers=2, shard_bytes=8_000)
    assert len(one.shards) == len(two.shards) > 4
    for a, b in zip(one.shards, two.shards, strict=True):
        assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
    assert (one.root / MANIFEST).read_bytes() == (two.root / MANIFEST).read_bytes()
    assert all_tokens(one) == expected_tokens(texts)  # every document once, in order, EOS after each
    assert one.num_documents == 3000 and one.dtype == "uint16" and not one.from_cache


def test_a_second_run_reads_no_document(tmp_path):
    source = TextSource(SourceSpec(str(write_jsonl(tmp_path / "a.jsonl", docs(200)))))
    tok = word_tokenizer()
    first = ingest(source.documents(), tok, tmp_path / "c", key=source.key(), workers=2)

    def must_not_be_read():
        raise AssertionError("the cache hit read the documents")
        yield  # pragma: no cover

    again = ingest(must_not_be_read(), tok, tmp_path / "c", key=source.key(), workers=2)
    assert again.from_cache and again.shards == first.shards


def test_changed_content_changes_the_key_and_a_stat_memo_avoids_rereading(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", docs(50))
    memo = tmp_path / "memo"
    key = TextSource(SourceSpec(str(path)), hash_cache=memo).key()
    assert len(list(memo.iterdir())) == 1
    assert TextSource(SourceSpec(str(path)), hash_cache=memo).key() == key
    write_jsonl(path, docs(50, seed=1))
    assert TextSource(SourceSpec(str(path)), hash_cache=memo).key() != key


def test_a_torn_or_unlisted_shard_is_never_read(tmp_path):
    texts = docs(1000)
    source = TextSource(SourceSpec(str(write_jsonl(tmp_path / "a.jsonl", texts))))
    tok = word_tokenizer()
    corpus = ingest(source.documents(), tok, tmp_path / "c", key=source.key(), workers=1, shard_bytes=4_000)
    victim = corpus.shards[1].path
    victim.write_bytes(victim.read_bytes()[:-2])  # torn: one token short
    with pytest.raises(DataError, match=f"{victim.name}: size does not match"):
        ShardedCorpus.open(corpus.root)
    rebuilt = ingest(source.documents(), tok, tmp_path / "c", key=source.key(), workers=1, shard_bytes=4_000)
    assert not rebuilt.from_cache and all_tokens(rebuilt) == expected_tokens(texts)
    victim.with_suffix(".json").unlink()  # a shard without its sidecar is not trusted either
    with pytest.raises(DataError, match="sidecar is missing"):
        ShardedCorpus.open(corpus.root)
    # Same size, one bit changed: only the checksum tells, which verify=True recomputes.
    rebuilt = ingest(source.documents(), tok, tmp_path / "c", key=source.key(), workers=1, shard_bytes=4_000)
    flipped = rebuilt.shards[0].path
    data = bytearray(flipped.read_bytes())
    data[0] ^= 1
    flipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{flipped.name}: checksum does not match"):
        ShardedCorpus.open(rebuilt.root, verify=True)


def test_every_format_streams_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = docs(40)
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", texts)
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "d" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    with open(tmp_path / "d" / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body"])
        writer.writerows([[i, t] for i, t in enumerate(texts)])
    pq.write_table(pa.table({"text": texts}), tmp_path / "d" / "e.parquet", row_group_size=7)
    (tmp_path / "d" / "f.txt").write_text("first doc\n\nstill first\n")
    (tmp_path / "d" / ".hidden.jsonl").write_text("not json")
    (tmp_path / "d" / "notes.md").write_text("skipped")
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "e.parquet"):
        assert list(TextSource(SourceSpec(str(tmp_path / "d" / name))).documents()) == texts, name
    assert list(TextSource(SourceSpec(str(tmp_path / "d" / "d.csv"), text_column="body")).documents()) == texts
    assert list(TextSource(SourceSpec(str(tmp_path / "d" / "f.txt"))).documents()) == ["first doc\n\nstill first\n"]
    paragraphs = TextSource(SourceSpec(str(tmp_path / "d" / "f.txt")), txt_mode="paragraph")
    assert list(paragraphs.documents()) == ["first doc", "still first\n"]
    folder = TextSource(SourceSpec(str(tmp_path / "d")))
    assert [p.name for p in folder.files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.csv", "e.parquet", "f.txt"]
    glob = TextSource(SourceSpec(str(tmp_path / "d" / "*.jsonl*")))
    assert list(glob.documents()) == texts * 3


def test_take_bytes_matches_the_in_memory_cap():
    from acceltrain.data.text import _cap_bytes

    texts = ["aaaa\nbb", "cc\ndd\n", "eeeeee"]
    for cap in range(1, 22):
        assert list(take_bytes(iter(texts), cap)) == _cap_bytes(texts, cap), cap


def test_dataset_specs_parse_with_weights():
    assert parse_sources("code/:0.7,prose.jsonl:0.3") == [SourceSpec("code/", 0.7), SourceSpec("prose.jsonl", 0.3)]
    assert parse_sources("wikitext") == [SourceSpec("wikitext", 1.0)]
    listed = parse_sources(json.dumps([{"path": "a/", "weight": 2, "text_column": "body"}, {"path": "b.csv"}]))
    assert listed == [SourceSpec("a/", 2.0, "body"), SourceSpec("b.csv", 1.0, "text")]


@pytest.mark.parametrize("spec, message", [
    ("a.jsonl:0", "weight of 'a.jsonl' must be > 0, got '0'"),
    ("a.jsonl:-0.5", "weight of 'a.jsonl' must be > 0, got '-0.5'"),
    ("a.jsonl:0.5,,b", "empty entry"),
    ('[{"path": "a", "weight": 0}]', "weight of 'a' must be > 0, got 0"),
    ('[{"path": "a", "wieght": 1}]', "entry 0: unknown key(s) wieght"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(DataError) as e:
        parse_sources(spec)
    assert message in str(e.value)


@pytest.mark.parametrize("name, content, column, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "broken\n', "text", "bad.jsonl:2: not valid JSON"),
    ("bin.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n', "text", "bin.jsonl:3: not UTF-8 text"),
    ("col.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "text", "col.jsonl:2: no column 'text'; keys: body"),
    ("num.jsonl", b'{"text": 3}\n', "text", "num.jsonl:1: column 'text' holds int, not text"),
    ("empty.jsonl", b"\n\n", "text", "empty.jsonl: empty (no text in it)"),
    ("bin.txt", b"fine\n\xc3\x28\n", "text", "bin.txt:2: not UTF-8 text"),
    ("cols.csv", b"id,body\n1,x\n", "text", "cols.csv: no column 'text'; columns: id, body"),
])
def test_bad_input_names_the_file_and_line_and_leaves_no_cache_entry(tmp_path, name, content, column, message):
    good = write_jsonl(tmp_path / "good.jsonl", docs(30))
    bad = tmp_path / name
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    # A folder whose first file is fine: the error comes mid-stream, after shards were written.
    folder = tmp_path / "in"
    folder.mkdir()
    good.rename(folder / "0good.jsonl")
    bad.rename(folder / name)
    source = TextSource(SourceSpec(str(folder), text_column=column))
    with pytest.raises(DataError) as e:
        ingest(source.documents(), word_tokenizer(), cache, key=source.key(), workers=2, shard_bytes=100)
    assert message in str(e.value) and str(folder / name) in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    assert list(cache.iterdir()) == []  # no shard folder, no temporary folder


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(DataError, match="glob matches no"):
        TextSource(SourceSpec(str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match="file or folder not found"):
        TextSource(SourceSpec(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="unknown extension"):
        TextSource(SourceSpec(str(tmp_path / "x.bin")))


def test_default_workers_are_the_cores_this_process_may_use():
    import os

    assert default_workers() == len(os.sched_getaffinity(0))


def test_hub_streaming_resumes_from_the_iterable_state(tmp_path):
    """A "Hub" dataset loaded with streaming=True (here a local file, no network) keeps its position
    through datasets' own state_dict()/load_state_dict()."""
    import datasets

    texts = docs(50)
    path = write_jsonl(tmp_path / "h.jsonl", texts)
    ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    it = iter(ds)
    head = [next(it)["text"] for _ in range(17)]
    state = ds.state_dict()
    again = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    again.load_state_dict(state)
    assert head + [row["text"] for row in again] == texts


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def interrupted_copy(clean: ShardedCorpus, cache: Path, keep: int) -> Path:
    """What kill -9 leaves: the build folder of a dead process with `keep` complete shards and torn files."""
    import shutil

    dead = cache / f".{clean.root.name}.tmp-{dead_pid()}"
    shutil.copytree(clean.root, dead)
    (dead / MANIFEST).unlink()
    for shard in clean.shards[keep:]:
        (dead / shard.path.name).unlink()
        (dead / shard.path.name).with_suffix(".json").unlink()
    (dead / f".shard-{keep:06d}.bin.tmp").write_bytes(b"\x01\x02\x03")  # torn, never renamed
    (dead / f"shard-{keep + 2:06d}.bin").write_bytes(b"\x00" * 10)  # after a gap, no sidecar
    return dead


class CountingStream:
    """A streamed dataset that counts the rows it hands out (state passes through)."""

    def __init__(self, ds):
        self.ds, self.rows = ds, 0

    column_names = None

    def __iter__(self):
        for row in self.ds:
            self.rows += 1
            yield row

    def state_dict(self):
        return self.ds.state_dict()

    def load_state_dict(self, state):
        self.ds.load_state_dict(state)


def test_a_hub_stream_interrupted_mid_tokenization_resumes_from_its_iterable_state(tmp_path, monkeypatch):
    """A Hub dataset with streaming=True (here a local file through datasets.load_dataset, no network):
    the shards a killed run finished are kept, and the stream continues where the last one ended."""
    import datasets

    texts = docs(600)
    path = write_jsonl(tmp_path / "h.jsonl", texts)
    stream = lambda: datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)  # noqa: E731
    monkeypatch.setattr(TextSource, "hub_dataset", lambda self: stream())
    source = TextSource(SourceSpec("someone/corpus"))
    assert source.kind == "hub"
    tok = word_tokenizer()
    clean = ingest(source.documents(), tok, tmp_path / "clean", key=source.key(), workers=1, shard_bytes=3_000)
    assert len(clean.shards) >= 8 and all_tokens(clean) == expected_tokens(texts)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = interrupted_copy(clean, cache, keep=4)
    counting = CountingStream(stream())
    from acceltrain.data.sources import StreamDocuments

    resumed = ingest(StreamDocuments(counting), tok, cache, key=source.key(), workers=2, shard_bytes=3_000)
    assert resumed.reused_shards == 4 and not dead.exists()
    assert counting.rows == len(texts) - sum(s.num_documents for s in clean.shards[:4])  # nothing before read again
    assert [p.name for p in sorted(resumed.root.iterdir())] == [p.name for p in sorted(clean.root.iterdir())]
    for a, b in zip(clean.shards, resumed.shards, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes(), a.path.name
    # The stream states may be spelled differently after a resume (datasets' own counters); the
    # shards' sizes and checksums may not.
    drop = lambda m: [{k: v for k, v in s.items() if k != "stream_state"} for s in m["shards"]]  # noqa: E731
    assert drop(json.loads((clean.root / MANIFEST).read_text())) == drop(json.loads((resumed.root / MANIFEST).read_text()))


def test_a_file_source_interrupted_mid_tokenization_keeps_the_verified_shards(tmp_path):
    texts = docs(600)
    source = TextSource(SourceSpec(str(write_jsonl(tmp_path / "a.jsonl", texts))))
    tok = word_tokenizer()
    clean = ingest(source.documents(), tok, tmp_path / "clean", key=source.key(), workers=1, shard_bytes=3_000)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = interrupted_copy(clean, cache, keep=5)
    victim = dead / "shard-000003.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1  # a kept shard that does not match its checksum ends the trusted prefix
    victim.write_bytes(bytes(data))
    resumed = ingest(source.documents(), tok, cache, key=source.key(), workers=1, shard_bytes=3_000)
    assert resumed.reused_shards == 3
    for a, b in zip(clean.shards, resumed.shards, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()
    assert (clean.root / MANIFEST).read_bytes() == (resumed.root / MANIFEST).read_bytes()
