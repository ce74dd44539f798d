"""train_bpe_tokenizer on a stream: a bounded sample of a corpus of any size, and a cache hit that reads nothing."""

from __future__ import annotations

import pytest

from acceltrain.data import train_bpe_tokenizer
from acceltrain.data.sources import take_bytes


def counting_stream(n: int, taken: list[int]):
    """n documents of 100 ASCII bytes each; records how many were pulled."""
    for i in range(n):
        taken[0] += 1
        yield (f"def f{i % 50}(x): return x + {i % 7}\n" * 4)[:99] + "\n"


def test_training_reads_only_the_byte_budget_of_the_stream(tmp_path):
    taken = [0]
    tok = train_bpe_tokenizer(counting_stream(1_000_000, taken), 300, tmp_path / "tok", sample_bytes=5_000)
    same = list(take_bytes(counting_stream(1_000_000, [0]), 5_000))
    # Whole documents up to 5,000 bytes, the last one cut at a line end: 51 of the million pulled.
    assert taken[0] == len(same) == 51 and sum(len(d) for d in same) <= 5_000
    assert not tok.acceltrain_cache_hit and len(tok) <= 300
    expected = train_bpe_tokenizer(same, 300, tmp_path / "tok_list")
    assert tok.backend_tokenizer.to_str() == expected.backend_tokenizer.to_str()  # trained on exactly that sample


def test_a_cache_hit_with_a_fingerprint_reads_nothing(tmp_path):
    train_bpe_tokenizer(counting_stream(100, [0]), 300, tmp_path / "tok", sample_bytes=5_000, fingerprint="corpus-v1")
    taken = [0]
    again = train_bpe_tokenizer(counting_stream(100, taken), 300, tmp_path / "tok", sample_bytes=5_000,
                                fingerprint="corpus-v1")
    assert again.acceltrain_cache_hit and taken[0] == 0


def test_sample_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="sample_bytes must be >= 1, got 0"):
        train_bpe_tokenizer(["x"], 300, tmp_path / "t", sample_bytes=0)
