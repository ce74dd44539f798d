"""Data for language-model pretraining: text loading, BPE tokenizers, token packing, resumable sampling.

The pieces chain in one direction::

    docs = load_texts("python-stdlib")                       # list[str]
    tok = train_bpe_tokenizer(docs, 8192, "out/tokenizer")    # cached by content hash
    corpus = pack_texts(docs, tok, "out/cache")              # one flat token memmap, cached
    train, val = train_val_split(corpus, seq_len=256)         # non-overlapping windows
    loader = DataLoader(train, batch_size=8, sampler=ResumableSampler(len(train), seed=0))

At scale (what ``recipes/pretrain.py`` does): streamed sources, token shards, a weighted mixture::

    sources = [TextSource(spec) for spec in parse_sources("code/:0.7,prose.jsonl:0.3")]
    corpora = [ingest(s.documents(), tok, "out/shards", key=s.key()) for s in sources]  # every core
    train, val = build_mixture(corpora, seq_len=256, weights=[0.7, 0.3], seed=0)
"""

from .mixture import MixtureDataset, build_mixture
from .packing import PackedCorpus, PackedTokens, pack_texts, tokenizer_fingerprint, train_val_split
from .sampler import ResumableSampler
from .shards import ShardedCorpus, ingest
from .sources import SourceSpec, StreamDocuments, TextSource, parse_sources, take_bytes
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
    "MixtureDataset",
    "PackedCorpus",
    "PackedTokens",
    "ResumableSampler",
    "ShardedCorpus",
    "SourceSpec",
    "StreamDocuments",
    "TextSource",
    "build_mixture",
    "ingest",
    "load_texts",
    "load_tokenizer",
    "pack_texts",
    "parse_sources",
    "python_stdlib_corpus",
    "take_bytes",
    "texts_fingerprint",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "train_val_split",
]
