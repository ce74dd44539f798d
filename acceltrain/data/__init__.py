"""Data for language-model pretraining: text loading, BPE tokenizers, token packing, resumable sampling.

The pieces chain in one direction::

    docs = load_texts("python-stdlib")                       # list[str]
    tok = train_bpe_tokenizer(docs, 8192, "out/tokenizer")    # cached by content hash
    corpus = pack_texts(docs, tok, "out/cache")              # one flat token memmap, cached
    train, val = train_val_split(corpus, seq_len=256)         # non-overlapping windows
    loader = DataLoader(train, batch_size=8, sampler=ResumableSampler(len(train), seed=0))
"""

from .packing import PackedCorpus, PackedTokens, pack_texts, tokenizer_fingerprint, train_val_split
from .sampler import ResumableSampler
from .text import (
    STDLIB_SOURCE,
    TEXT_EXTENSIONS,
    DataError,
    load_texts,
    python_stdlib_corpus,
    texts_fingerprint,
)
from .tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "STDLIB_SOURCE",
    "TEXT_EXTENSIONS",
    "DataError",
    "PackedCorpus",
    "PackedTokens",
    "ResumableSampler",
    "load_texts",
    "load_tokenizer",
    "pack_texts",
    "python_stdlib_corpus",
    "texts_fingerprint",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "train_val_split",
]
