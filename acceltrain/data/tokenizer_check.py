"""Check a tokenizer before training with it, and pick a tokenizer strategy for a vocabulary size.

:func:`validate_tokenizer` runs four checks (as Transformer Builder's ``TokenizerValidator``):
the vocabulary size, the special tokens (set, and each a single id in range), the
encode/decode round trip of sample texts, and every produced id inside the vocabulary.
``strict=True`` raises one :class:`TokenizerValidationError` listing every failed check;
``strict=False`` logs them and returns False.

:func:`tokenizer_for` gives a tokenizer for a strategy: ``"pretrained"`` (a folder or Hub id,
through :func:`acceltrain.data.tokenizer.load_tokenizer`), ``"bpe"`` (trained on the texts with
:func:`acceltrain.data.tokenizer.train_bpe_tokenizer`), ``"character"``
(:class:`acceltrain.data.char_tokenizer.CharacterLevelTokenizer`) or ``"auto"``
(:func:`detect_strategy`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .text import DataError

__all__ = ["TokenizerValidationError", "validate_tokenizer", "tokenizer_problems", "detect_strategy",
           "tokenizer_for", "STRATEGIES", "PRETRAINED_VOCABS"]

logger = logging.getLogger("acceltrain")

SAMPLES = ("Hello world!", "def f(x):\n    return x + 1", "The quick brown fox jumps over the lazy dog.")
STRATEGIES = ("auto", "pretrained", "bpe", "character")
#: Vocabulary sizes of well-known tokenizers (what ``auto`` maps to ``pretrained``), by Hub id.
PRETRAINED_VOCABS = {50257: "gpt2", 30522: "bert-base-uncased", 32000: "meta-llama/Llama-2-7b-hf",
                     50265: "roberta-base", 32128: "t5-small", 128256: "meta-llama/Llama-3.2-1B"}
_BPE_RANGE = (5_000, 100_000)


class TokenizerValidationError(DataError):
    """A tokenizer failed :func:`validate_tokenizer` (the message lists every failed check)."""


def tokenizer_problems(tokenizer: Any, expected_vocab_size: int | None = None, *,
                       samples: Sequence[str] = SAMPLES, required_special: Sequence[str] = ("pad_token",)) -> list[str]:
    """Every failed check, as one short sentence each (empty when the tokenizer passes)."""
    problems = []
    size = len(tokenizer)
    if expected_vocab_size is not None and size != expected_vocab_size:
        problems.append(f"vocabulary size is {size}, expected {expected_vocab_size}")
    for role in required_special:
        if getattr(tokenizer, role, None) is None:
            problems.append(f"no {role}")
    for token in getattr(tokenizer, "all_special_tokens", []):
        ids = tokenizer.convert_tokens_to_ids([token])
        if len(ids) != 1 or ids[0] is None or not 0 <= ids[0] < size:
            problems.append(f"special token {token!r} has no id in [0, {size})")
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            problems.append(f"ids {bad[:3]} of {text!r} are outside [0, {size})")
            continue
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if back.strip() != text.strip():
            problems.append(f"round trip of {text!r} gives {back!r}")
    return problems


def validate_tokenizer(tokenizer: Any, expected_vocab_size: int | None = None, *, strict: bool = True,
                       samples: Sequence[str] = SAMPLES, required_special: Sequence[str] = ("pad_token",)) -> bool:
    """True if every check passes; otherwise raise (``strict``) or log and return False.

    Raises:
        TokenizerValidationError: ``strict`` and a check failed (all failures in the message).
    """
    problems = tokenizer_problems(tokenizer, expected_vocab_size, samples=samples, required_special=required_special)
    if problems and strict:
        raise TokenizerValidationError("tokenizer: " + "; ".join(problems))
    for problem in problems:
        logger.warning("tokenizer: %s", problem)
    return not problems


def detect_strategy(vocab_size: int, dataset_size: int) -> str:
    """``pretrained`` for a well-known vocabulary size, ``bpe`` for 5K-100K tokens when the
    corpus has at least 10 characters per token to learn merges from, else ``character``."""
    if vocab_size in PRETRAINED_VOCABS:
        return "pretrained"
    if _BPE_RANGE[0] <= vocab_size <= _BPE_RANGE[1] and dataset_size >= 10 * vocab_size:
        return "bpe"
    return "character"


def tokenizer_for(strategy: str, *, vocab_size: int, texts: Sequence[str], cache_dir: str | Path,
                  name: str | None = None) -> Any:
    """A Hugging Face tokenizer for ``strategy`` (see the module docstring); the choice is logged.

    Raises:
        DataError: an unknown strategy, or ``pretrained`` with neither ``name`` nor a known vocabulary size.
    """
    if strategy not in STRATEGIES:
        raise DataError(f"tokenizer: unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if strategy == "auto":
        strategy = detect_strategy(vocab_size, sum(len(t) for t in texts))
        logger.info("tokenizer strategy for vocab_size %d: %s", vocab_size, strategy)
        if strategy == "pretrained":  # the tiers fall through: pretrained, then BPE, then characters
            try:
                return tokenizer_for("pretrained", vocab_size=vocab_size, texts=texts, cache_dir=cache_dir, name=name)
            except DataError as e:
                strategy = "bpe" if _BPE_RANGE[0] <= vocab_size <= _BPE_RANGE[1] and \
                    sum(len(t) for t in texts) >= 10 * vocab_size else "character"
                logger.warning("tokenizer: %s; using the %s strategy instead", e, strategy)
    if strategy == "pretrained":
        from .tokenizer import load_tokenizer

        name = name or PRETRAINED_VOCABS.get(vocab_size)
        if name is None:
            raise DataError(f"tokenizer: strategy 'pretrained' needs a tokenizer name (no well-known tokenizer "
                            f"has {vocab_size} tokens)")
        return load_tokenizer(name)
    if strategy == "bpe":
        from .tokenizer import train_bpe_tokenizer

        return train_bpe_tokenizer(texts, vocab_size, Path(cache_dir) / f"bpe_{vocab_size}")
    from .char_tokenizer import CharacterLevelTokenizer

    return CharacterLevelTokenizer(vocab_size=vocab_size, texts=texts).to_hf()
