"""Packing a corpus into one flat token file, and fixed-length windows over it.

``pack_texts`` tokenizes every document once (the fast tokenizer's batch call), appends EOS after
each, and writes the concatenation to ``packed-<key>.bin``: a raw ``uint16`` (or ``uint32``)
array that ``np.memmap`` opens without reading it. A JSON sidecar ``packed-<key>.json`` is
written last and marks the pair complete. The key hashes the corpus, the tokenizer and the
settings, so a second run with the same inputs finds the files and tokenizes nothing.

``PackedTokens`` serves non-overlapping ``seq_len`` windows as ``{"input_ids", "labels"}`` for a
Hugging Face causal LM (which shifts the labels itself); ``train_val_split`` holds out the last
windows of the stream for validation.

Example:
    >>> corpus = pack_texts(docs, tokenizer, "cache/")
    >>> train, val = train_val_split(corpus, seq_len=256, val_fraction=0.01)
    >>> train[0]["input_ids"].shape
    torch.Size([256])

With several processes, pack on the main process first (``with accelerator.main_process_first():``)
so the others find the cache instead of tokenizing the same corpus in parallel.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .text import DataError, texts_fingerprint

__all__ = ["PackedCorpus", "PackedTokens", "pack_texts", "tokenizer_fingerprint", "train_val_split"]

logger = logging.getLogger("acceltrain")

_FORMAT = 1


@dataclass(frozen=True)
class PackedCorpus:
    """A packed token file and what the sidecar says about it.

    Attributes:
        path: The ``.bin`` token file (the sidecar is the same name with ``.json``).
        num_tokens: Tokens in the file, one EOS per document included.
        num_documents: Documents packed.
        dtype: ``"uint16"`` (vocabulary up to 65,536) or ``"uint32"``.
        eos_token_id: The separator appended after every document.
        key: The cache key (content hash of corpus, tokenizer and settings).
        from_cache: ``True`` when this call found the files and tokenized nothing.
    """

    path: Path
    num_tokens: int
    num_documents: int
    dtype: str
    eos_token_id: int
    key: str
    from_cache: bool = False

    def tokens(self) -> np.memmap:
        """The whole token stream as a read-only memory map (nothing is read until indexed)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PackedCorpus:
        """Reopen a packed ``.bin`` file from its sidecar.

        Raises:
            DataError: The sidecar is missing or does not match the file.
        """
        path = Path(path)
        sidecar = _read_sidecar(path.with_suffix(".json"))
        if sidecar is None:
            raise DataError(f"{path}: no valid sidecar {path.with_suffix('.json').name} next to it")
        corpus = cls._from_sidecar(path, sidecar, from_cache=True)
        if not corpus._size_ok():
            raise DataError(
                f"{path}: size does not match its sidecar ({corpus.num_tokens} {corpus.dtype} tokens)"
            )
        return corpus

    @classmethod
    def _from_sidecar(cls, path: Path, meta: dict[str, Any], *, from_cache: bool) -> PackedCorpus:
        return cls(
            path=path,
            num_tokens=int(meta["num_tokens"]),
            num_documents=int(meta["num_documents"]),
            dtype=str(meta["dtype"]),
            eos_token_id=int(meta["eos_token_id"]),
            key=str(meta["key"]),
            from_cache=from_cache,
        )

    def _size_ok(self) -> bool:
        return (
            self.path.is_file()
            and self.path.stat().st_size == self.num_tokens * np.dtype(self.dtype).itemsize
        )


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    needed = ("format", "key", "num_tokens", "num_documents", "dtype", "eos_token_id")
    if not isinstance(meta, dict) or any(k not in meta for k in needed) or meta["format"] != _FORMAT:
        return None
    return meta


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content hash of a fast tokenizer's ``tokenizer.json`` (vocabulary, merges, normalizers).

    The truncation and padding settings are left out: the ``transformers`` call resets them on
    the backend as a side effect, and packing never truncates or pads.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def pack_texts(
    texts: Iterable[str],
    tokenizer: Any,
    cache_dir: str | os.PathLike[str],
    *,
    fingerprint: str | None = None,
    batch_size: int = 1000,
) -> PackedCorpus:
    """Tokenize documents once into a flat token file with EOS after each one, or reuse it.

    Args:
        texts: The documents. Read twice (hash, then tokenize) unless ``fingerprint`` is given,
            so a one-shot iterator is materialised into a list first.
        tokenizer: A ``transformers`` fast tokenizer with an EOS token.
        cache_dir: Folder for ``packed-<key>.bin`` and ``.json`` (created if missing).
        fingerprint: A precomputed corpus fingerprint (see :func:`texts_fingerprint`); with it,
            ``texts`` is only read on a cache miss and may be a stream.
        batch_size: Documents per tokenizer call (the Rust tokenizer parallelises inside a batch).

    Returns:
        The packed corpus; ``from_cache`` tells whether tokenizing was skipped.

    Raises:
        DataError: The tokenizer is not a fast one or has no EOS token, or there are no documents.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a collection of documents, not one str")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"pack_texts needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token: set tokenizer.eos_token before packing")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    if fingerprint is None:
        texts = texts if isinstance(texts, Sequence) else list(texts)
        fingerprint = texts_fingerprint(texts)
    settings = {
        "format": _FORMAT,
        "texts": fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos_token_id": eos,
        "dtype": dtype.name,
    }
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"packed-{key[:24]}.bin"
    sidecar = path.with_suffix(".json")

    meta = _read_sidecar(sidecar)
    if meta is not None and meta["key"] == key:
        corpus = PackedCorpus._from_sidecar(path, meta, from_cache=True)
        if corpus._size_ok():
            logger.info("packed tokens cache hit: %s (%d tokens)", path, corpus.num_tokens)
            return corpus
        logger.warning("packed token file %s does not match its sidecar; packing again", path)

    cache_dir.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)  # the pair is only valid once the new sidecar lands
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    num_tokens = num_docs = 0
    try:
        with open(tmp, "wb") as f:
            # Streamed batch by batch: the total length is unknown until everything is
            # tokenized, and holding every id list at once would cost ~30x the file size.
            for batch in _batches(texts, batch_size):
                ids = tokenizer(
                    batch,
                    add_special_tokens=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    verbose=False,  # documents longer than model_max_length are expected here
                )["input_ids"]
                count = sum(len(x) for x in ids) + len(ids)
                flat = np.fromiter(
                    itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                    dtype=np.int64,
                    count=count,
                )
                if flat.size and int(flat.max()) > np.iinfo(dtype).max:
                    raise DataError(
                        f"token id {int(flat.max())} does not fit {dtype.name} (len(tokenizer)={vocab})"
                    )
                flat.astype(dtype).tofile(f)
                num_tokens += count
                num_docs += len(ids)
            f.flush()
            os.fsync(f.fileno())
        if num_docs == 0:
            raise DataError("pack_texts: no documents to pack")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {**settings, "key": key, "num_tokens": num_tokens, "num_documents": num_docs, "vocab_size": vocab}
    tmp_meta = sidecar.with_name(f".{sidecar.name}.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_meta, sidecar)
    logger.info("packed %d documents into %d tokens: %s", num_docs, num_tokens, path)
    return PackedCorpus._from_sidecar(path, meta, from_cache=False)


def _batches(texts: Iterable[str], size: int) -> Iterable[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


class PackedTokens(Dataset):
    """Non-overlapping ``seq_len`` windows of a packed token file, for a causal LM.

    Window ``w`` covers tokens ``[w * seq_len, (w + 1) * seq_len)``. Each item is
    ``{"input_ids": x, "labels": x}`` with ``x`` a ``(seq_len,)`` int64 tensor: Hugging Face
    causal LMs shift the labels themselves. Documents run across window edges, separated by EOS.
    The trailing ``num_tokens % seq_len`` tokens belong to no window.

    The memory map is opened lazily in each process and left out of the pickle, so DataLoader
    workers (fork or spawn) share the file through the page cache instead of copying it.

    Args:
        source: A :class:`PackedCorpus` or the path of a packed ``.bin`` file.
        seq_len: Tokens per window.
        windows: The window indices to serve (default: all of them), e.g. from
            :func:`train_val_split`.

    Example:
        >>> ds = PackedTokens(corpus, seq_len=128)
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=ResumableSampler(len(ds)))
    """

    def __init__(
        self, source: PackedCorpus | str | os.PathLike[str], seq_len: int, *, windows: range | None = None
    ):
        self.corpus = source if isinstance(source, PackedCorpus) else PackedCorpus.open(source)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.num_windows_total = self.corpus.num_tokens // seq_len
        if windows is None:
            windows = range(self.num_windows_total)
        if len(windows) and (windows.step != 1 or windows.start < 0 or windows.stop > self.num_windows_total):
            raise ValueError(
                f"windows={windows} must be a contiguous range within [0, {self.num_windows_total})"
            )
        self.windows = windows
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def token_range(self, index: int) -> tuple[int, int]:
        """The ``[start, stop)`` token positions item ``index`` reads."""
        start = self.windows[index] * self.seq_len
        return start, start + self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            self._tokens = self.corpus.tokens()
        start, stop = self.token_range(index)
        x = torch.from_numpy(self._tokens[start:stop].astype(np.int64))  # (T,)
        return {"input_ids": x, "labels": x.clone()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None  # pickling a memmap would copy the whole file into the pickle
        return state


def train_val_split(
    source: PackedCorpus | str | os.PathLike[str], seq_len: int, *, val_fraction: float = 0.01
) -> tuple[PackedTokens, PackedTokens]:
    """Split a packed corpus into training windows and the held-out windows at its end.

    Both sets index the same window grid, so they never share a token: training gets windows
    ``[0, n - v)`` and validation ``[n - v, n)`` with ``v = max(1, round(n * val_fraction))``.

    Args:
        source: A :class:`PackedCorpus` or the path of a packed ``.bin`` file.
        seq_len: Tokens per window.
        val_fraction: Fraction of windows held out, in ``(0, 1)``; at least one window.

    Returns:
        ``(train, validation)``.

    Raises:
        ValueError: ``val_fraction`` is not in ``(0, 1)``.
        DataError: The corpus has fewer than two windows.

    Example:
        >>> train, val = train_val_split(corpus, seq_len=512, val_fraction=0.05)
        >>> train.token_range(len(train) - 1)[1] <= val.token_range(0)[0]
        True
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    corpus = source if isinstance(source, PackedCorpus) else PackedCorpus.open(source)
    n = corpus.num_tokens // seq_len
    if n < 2:
        raise DataError(
            f"{corpus.path}: {corpus.num_tokens} tokens make {n} window(s) of seq_len={seq_len}; "
            "a train/validation split needs at least 2"
        )
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    train = PackedTokens(corpus, seq_len, windows=range(0, n - n_val))
    val = PackedTokens(corpus, seq_len, windows=range(n - n_val, n))
    return train, val
