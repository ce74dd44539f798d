"""A character-level tokenizer for any vocabulary size, saved as a standard Hugging Face tokenizer.

One token per Unicode character. The vocabulary is the special tokens, then the characters
of a corpus by frequency (``texts=...``, optional), then the code points in
order from U+0000 (surrogates skipped) filling the rest, up to ``vocab_size``; any other
character is ``<unk>``.
It is built with the ``tokenizers`` library (a ``WordLevel`` model over single characters, a
``Fuse`` decoder), so ``save_pretrained`` writes a ``tokenizer.json`` folder that
``transformers.AutoTokenizer.from_pretrained`` loads with no acceltrain installed.

Example:
    >>> tok = CharacterLevelTokenizer(vocab_size=100_000)
    >>> ids = tok.encode("Hello 世界!", max_length=512)["input_ids"]
    >>> tok.decode(ids)
    'Hello 世界!'
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CharacterLevelTokenizer", "DEFAULT_SPECIAL_TOKENS"]

DEFAULT_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
_SURROGATES = range(0xD800, 0xE000)


class CharacterLevelTokenizer:
    """One id per character; encode/decode like a Hugging Face tokenizer (it wraps one).

    Args:
        vocab_size: Size of the whole vocabulary, special tokens included (>= number of special
            tokens + 1).
        special_tokens: The special tokens, first in the vocabulary. The names ``<pad>``,
            ``<unk>``, ``<s>``, ``</s>`` become the pad, unknown, BOS and EOS tokens; ``<unk>``
            is added if missing.
        texts: Optional corpus: its characters come first, most frequent first (ties in order of
            first appearance), then code points from U+0000 fill the vocabulary.

    Attributes:
        hf: The ``transformers.PreTrainedTokenizerFast`` doing the work.
    """

    def __init__(self, vocab_size: int = 100_000, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *,
                 texts: Iterable[str] | None = None) -> None:
        specials = list(dict.fromkeys(special_tokens))
        if "<unk>" not in specials:
            specials.append("<unk>")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(specials):
            raise ValueError(f"vocab_size must be an int > {len(specials)} (the special tokens), got {vocab_size!r}")
        room = vocab_size - len(specials)
        chars: list[str] = []
        taken = set(specials)
        if texts is not None:  # the corpus's characters first, most frequent first
            counts = collections.Counter(c for text in texts for c in text)
            for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:room]:
                if c not in taken:
                    chars.append(c)
                    taken.add(c)
        code = 0  # then code points in order, so any text of the common scripts still encodes
        while len(chars) < room and code <= 0x10FFFF:
            if code not in _SURROGATES and chr(code) not in taken:
                chars.append(chr(code))
                taken.add(chr(code))
            code += 1
        self.hf = _build(specials, chars)
        self.special_tokens = specials

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Any:
        """The saved tokenizer, as ``AutoTokenizer.from_pretrained`` loads it."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str | Sequence[str], max_length: int | None = None, padding: bool | str = False,
               truncation: bool | None = None, return_tensors: str | None = None, **kwargs: Any) -> Any:
        """``{"input_ids", "attention_mask"}`` of ``text`` (no BOS/EOS unless ``add_special_tokens=True``);
        ``max_length`` truncates (and pads with ``padding="max_length"``)."""
        kwargs.setdefault("add_special_tokens", False)
        if truncation is None:
            truncation = max_length is not None
        return self.hf(text, max_length=max_length, padding=padding, truncation=truncation,
                       return_tensors=return_tensors, **kwargs)

    __call__ = encode

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> Path:
        """A Hugging Face tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``, ...)."""
        self.hf.save_pretrained(str(path))
        return Path(path)

    def to_hf(self) -> Any:
        """The wrapped ``PreTrainedTokenizerFast`` (for data modules, trainers, ``save_pretrained``)."""
        return self.hf

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return len(self.hf)

    def __getattr__(self, name: str) -> Any:  # pad_token_id, eos_token, convert_ids_to_tokens, ...
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)


def _build(specials: list[str], chars: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character its own piece, whitespace and newlines included.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    roles = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    kwargs = {role: tok for role, tok in roles.items() if tok in specials}
    extra = [t for t in specials if t not in roles.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                   additional_special_tokens=extra, **kwargs)
