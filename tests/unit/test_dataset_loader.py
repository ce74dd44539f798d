"""DatasetLoader (Hub by name, local files, cleaning, statistics) and the tokenizer validator / strategies."""

from __future__ import annotations

import pytest

from acceltrain.data.char_tokenizer import CharacterLevelTokenizer
from acceltrain.data.dataset_loader import DatasetLoader
from acceltrain.data.text import DataError
from acceltrain.data.tokenizer_check import (
    TokenizerValidationError,
    detect_strategy,
    tokenizer_for,
    tokenizer_problems,
    validate_tokenizer,
)


def test_hub_name_config_and_split_reach_datasets(monkeypatch):
    import datasets

    seen = {}

    def fake(name, config, split=None, cache_dir=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"text": ["  a long enough line  ", "tiny", "a long enough line"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    loader = DatasetLoader(min_length=5, remove_duplicates=True)
    ds = loader.load_huggingface("wikitext", "wikitext-2-raw-v1", split="validation")
    assert seen == {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation"}
    assert ds["text"] == ["a long enough line"]
    assert loader.last_report == {"read": 3, "kept": 1, "too_short": 1, "too_long": 0, "duplicates": 1}


def test_local_formats_and_bad_input(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "first row of text"}\n{"body": "second row, longer text"}\n')
    loader = DatasetLoader(max_length=18)
    assert loader.load_local_file(tmp_path / "d.jsonl", file_format="jsonl", text_column="body")["text"] == [
        "first row of text"]
    assert loader.last_report["too_long"] == 1
    with pytest.raises(DataError, match=r"d.jsonl: file_format 'csv' but the file ends in .jsonl"):
        loader.load_local_file(tmp_path / "d.jsonl", file_format="csv")
    with pytest.raises(DataError, match=r"missing.txt: no such file or folder"):
        loader.load_local_file(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("x\n\ny")
    with pytest.raises(DataError, match=r"short.txt: no text left after preprocessing"):
        loader.load_local_file(tmp_path / "short.txt")
    with pytest.raises(ValueError, match="max_length None or >= min_length"):
        DatasetLoader(min_length=10, max_length=5)
    assert DatasetLoader().get_statistics([]) == {"num_samples": 0}


def test_validator_checks_each_property():
    tok = CharacterLevelTokenizer(vocab_size=300).to_hf()
    assert tokenizer_problems(tok, 300) == [] and validate_tokenizer(tok, 300)
    assert tokenizer_problems(tok, 301) == ["vocabulary size is 300, expected 301"]
    tok.pad_token = None
    assert "no pad_token" in tokenizer_problems(tok)
    with pytest.raises(TokenizerValidationError, match="^tokenizer: no pad_token"):
        validate_tokenizer(tok, strict=True)
    assert validate_tokenizer(tok, strict=False) is False
    latin = CharacterLevelTokenizer(vocab_size=100).to_hf()  # code points < 96: no lower-case letters
    assert any(p.startswith("round trip of 'Hello world!'") for p in tokenizer_problems(latin))


def test_strategies(tmp_path, caplog, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    texts = ["the cat sat on the mat " * 40] * 20
    assert detect_strategy(50257, 10) == "pretrained" and detect_strategy(100, 10**9) == "character"
    bpe = tokenizer_for("bpe", vocab_size=300, texts=texts, cache_dir=tmp_path)
    assert bpe.decode(bpe("the cat")["input_ids"]) == "the cat" and len(bpe) <= 300
    chars = tokenizer_for("character", vocab_size=64, texts=texts, cache_dir=tmp_path)
    assert len(chars) == 64 and chars.decode(chars("the mat")["input_ids"]) == "the mat"
    with pytest.raises(DataError, match="strategy 'pretrained' needs a tokenizer name"):
        tokenizer_for("pretrained", vocab_size=123, texts=texts, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"unknown strategy 'wordpiece'"):
        tokenizer_for("wordpiece", vocab_size=123, texts=texts, cache_dir=tmp_path)
