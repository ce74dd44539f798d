"""acceltrain/data/mixture.py: weighted window mixtures, held-out windows, O(1) resume through the sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acceltrain.data import DataError, ResumableSampler
from acceltrain.data.mixture import build_mixture
from acceltrain.data.shards import ingest
from tests.unit.test_data_shards import docs, word_tokenizer


def sharded(tmp_path: Path, name: str, n_docs: int, seed: int, shard_bytes: int = 3_000):
    texts = docs(n_docs, seed=seed)
    return ingest(iter(texts), word_tokenizer(), tmp_path / "cache", key=f"{name}-{seed}-{n_docs}", workers=1,
                  shard_bytes=shard_bytes)


@pytest.fixture
def two_sources(tmp_path):
    return sharded(tmp_path, "code", 2500, 1), sharded(tmp_path, "prose", 600, 2)


def drawn_sources(train, seed: int, n: int) -> list[int]:
    order = ResumableSampler(len(train), seed=seed).epoch_order(0)[:n].tolist()
    return [train.source_of(i) for i in order]


def test_weights_0_7_0_3_over_2000_windows_and_the_same_seed_gives_the_same_order(two_sources):
    code, prose = two_sources
    train, _ = build_mixture([code, prose], seq_len=16, weights=[0.7, 0.3], names=["code", "prose"], seed=3)
    assert len(train) > 2000
    got = drawn_sources(train, seed=3, n=2000)
    share = got.count(0) / 2000
    assert abs(share - 0.7) <= 0.03, share
    assert train.counts()[0] == round(0.7 * len(train))  # the index itself holds the weights exactly
    again, _ = build_mixture([code, prose], seq_len=16, weights=[0.7, 0.3], names=["code", "prose"], seed=3)
    assert np.array_equal(again.source_index, train.source_index) and np.array_equal(again.window_index, train.window_index)
    assert torch.equal(again[123]["input_ids"], train[123]["input_ids"])
    other, _ = build_mixture([code, prose], seq_len=16, weights=[0.7, 0.3], names=["code", "prose"], seed=4)
    assert not np.array_equal(other.window_index, train.window_index)


def test_a_source_that_runs_out_is_recycled_whole_then_sampled(two_sources):
    code, prose = two_sources
    train, val = build_mixture([code, prose], seq_len=16, weights=[0.2, 0.8], seed=0, val_fraction=0.1)
    n_prose_train = (sum(s.num_tokens // 16 for s in prose.shards)) - int((val.source_index == 1).sum())
    share = train.counts()[1]
    assert share > n_prose_train  # prose is asked for more windows than it has
    uses = np.bincount(train.window_index[train.source_index == 1], minlength=n_prose_train)
    passes = share // n_prose_train
    assert set(uses.tolist()) <= {passes, passes + 1} and int((uses == passes + 1).sum()) == share % n_prose_train
    code_uses = np.bincount(train.window_index[train.source_index == 0])
    assert code_uses.max() == 1  # code is subsampled: no window twice


def test_validation_windows_are_never_in_the_training_index(two_sources):
    code, prose = two_sources
    train, val = build_mixture([code, prose], seq_len=16, weights=[0.5, 0.5], seed=0, val_fraction=0.05)
    for s in (0, 1):
        trained = set(train.window_index[train.source_index == s].tolist())
        held = set(val.window_index[val.source_index == s].tolist())
        assert held and not trained & held
        ranges_train = {train.token_range(i)[1:3] for i in np.flatnonzero(train.source_index == s)}
        ranges_val = {val.token_range(i)[1:3] for i in np.flatnonzero(val.source_index == s)}
        assert not ranges_train & ranges_val
    # A named validation source instead: every window of the training sources is trainable.
    held_out = sharded(Path(code.root).parent.parent, "eval", 100, 9)
    train2, val2 = build_mixture([code, prose], seq_len=16, weights=[0.5, 0.5], seed=0, eval_corpus=held_out)
    assert len(val2) == sum(s.num_tokens // 16 for s in held_out.shards)
    assert val2.sources[0].corpus is held_out and len(train2) == sum(
        s.num_tokens // 16 for c in (code, prose) for s in c.shards)


def test_one_source_is_the_packed_file_window_for_window(tmp_path):
    from acceltrain.data import pack_texts, train_val_split

    texts = docs(400, seed=5)
    tok = word_tokenizer()
    corpus = ingest(iter(texts), tok, tmp_path / "s", key="k", workers=1)  # one shard
    assert len(corpus.shards) == 1
    train, val = build_mixture([corpus], seq_len=8, seed=7, val_fraction=0.02)
    old_train, old_val = train_val_split(pack_texts(texts, tok, tmp_path / "p"), 8, val_fraction=0.02)
    assert len(train) == len(old_train) and len(val) == len(old_val)
    for new, old in ((train, old_train), (val, old_val)):
        for i in range(len(old)):
            assert torch.equal(new[i]["input_ids"], old[i]["input_ids"]), i


def test_windows_never_span_two_shards(tmp_path):
    corpus = sharded(tmp_path, "x", 300, 3, shard_bytes=500)
    train, _ = build_mixture([corpus], seq_len=16, seed=0)
    for i in range(len(train)):
        _, shard, start, stop = train.token_range(i)
        assert stop <= corpus.shards[shard].num_tokens


def test_zero_or_negative_weight_is_refused(two_sources):
    with pytest.raises(DataError, match="weight of 'b' must be > 0, got 0"):
        build_mixture(list(two_sources), seq_len=16, weights=[1.0, 0.0], names=["a", "b"])
    with pytest.raises(DataError, match="weight of 'a' must be > 0, got -1"):
        build_mixture(list(two_sources), seq_len=16, weights=[-1.0, 1.0], names=["a", "b"])


@pytest.mark.parametrize("steps", [10, 10_000])
def test_resuming_at_step_10_or_10000_reads_only_the_next_batch(two_sources, steps):
    """What a resume costs, counted: the windows read before the first batch after it."""
    from acceltrain.data_stream import DataPosition

    train, _ = build_mixture(list(two_sources), seq_len=16, weights=[0.7, 0.3], seed=0, num_windows=25_000)
    batch = 2
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True)
    position = DataPosition(loader, num_replicas=1, rank=0, seed=0)
    position.start_epoch(0, start=steps * batch)
    want = position.next_indices()
    train.reads = 0
    first = next(iter(position.loader))
    assert train.reads == batch  # nothing before the resumed position was read, at step 10 or 10,000
    assert torch.equal(first["input_ids"], torch.stack([train[i]["input_ids"] for i in want]))
    expected = ResumableSampler(len(train), seed=0).epoch_order(0)[steps * batch: steps * batch + batch].tolist()
    assert want == expected

