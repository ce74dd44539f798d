"""Streaming ingestion: documents -> parallel tokenization -> token shards, cached by content.

``ingest`` reads a stream of documents, cuts it into pieces of about ``shard_bytes`` of text
(by the documents alone, so the cut does not depend on the number of workers), tokenizes each
piece in a worker process (the fast tokenizer's batch call on one core each) and writes it as
one shard: a raw ``uint16`` (or ``uint32``) token file with EOS after every document, and a JSON
sidecar beside it. At most ``workers + 1`` pieces are in flight, so memory is bounded by the
piece size and the worker count, never by the corpus.

Atomicity, from the inside out (the shard writer is written by hand: no library writes this
format with these guarantees):

1. each shard is written to a temporary name, fsynced, renamed, then its sidecar (size,
   checksum) is written the same way, last;
2. the shards are built in a temporary folder ``.<key>.tmp-<pid>``; ``manifest.json`` (every
   shard's size and checksum) is written last in it, and the folder is renamed to ``<key>``.

Only a folder named ``<key>`` with a manifest whose shards all match it is ever opened as a
corpus. A run killed with ``kill -9`` mid-tokenization leaves its temporary folder; the next run
with the same key takes it over, keeps the leading run of shards whose sidecar is there and
whose bytes match its checksum (recomputed), deletes everything else in it (torn files, shards
after a gap) and tokenizes from there on. A document stream with ``state_dict()`` /
``load_state_dict()`` (a Hub dataset streamed through ``datasets``, see
:class:`~acceltrain.data.sources.StreamDocuments`) is put back where the last kept shard ended,
so nothing before it is read again; any other stream is read again from the start and the
kept pieces are skipped without tokenizing. A bad input stops the run and removes the
temporary folder: no cache entry is left behind.

The key hashes the source's content key, the tokenizer, the dtype and the piece size, so a
second run with the same inputs finds the folder and tokenizes nothing.

Example:
    >>> corpus = ingest(source.documents(), tokenizer, "cache/shards", key=source.key(), workers=4)
    >>> corpus.num_tokens, len(corpus.shards), corpus.from_cache
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint_io import fsync_dir
from .packing import tokenizer_fingerprint
from .text import DataError

__all__ = ["Shard", "ShardedCorpus", "default_workers", "ingest"]

logger = logging.getLogger("acceltrain")

_FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 16 << 20
"""Text per shard (UTF-8 bytes; about 4-8 M tokens): the unit of parallel work and of memory."""
_BATCH_DOCS = 256  # documents per tokenizer call inside a piece, and at most
_BATCH_CHARS = 1 << 20  # this much text: the Encoding objects alive (~100 bytes a token) stay small


def default_workers() -> int:
    """The cores this process may use (``len(os.sched_getaffinity(0))``; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Shard:
    """One token file of a :class:`ShardedCorpus`."""

    path: Path
    num_tokens: int
    num_documents: int
    checksum: str


@dataclass(frozen=True)
class ShardedCorpus:
    """Token shards and what the manifest says about them.

    Attributes:
        root: The cache folder holding the shards and ``manifest.json``.
        shards: The shards, in corpus order.
        dtype: ``"uint16"`` or ``"uint32"``.
        eos_token_id: The separator appended after every document.
        key: The cache key.
        from_cache: ``True`` when this call found the folder and tokenized nothing.
    """

    root: Path
    shards: tuple[Shard, ...]
    dtype: str
    eos_token_id: int
    key: str
    from_cache: bool = False
    reused_shards: int = 0  # complete shards taken over from an interrupted run (not tokenized again)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    def tokens(self, shard: int) -> np.memmap:
        """Shard ``shard``'s tokens as a read-only memory map (nothing is read until indexed)."""
        s = self.shards[shard]
        return np.memmap(s.path, dtype=self.dtype, mode="r", shape=(s.num_tokens,))

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, verify: bool = False) -> ShardedCorpus:
        """Open a finished shard folder after checking every shard against the manifest.

        Args:
            root: The folder.
            verify: Also recompute every shard's checksum (reads the whole corpus).

        Raises:
            DataError: No manifest, or a shard whose sidecar, size or checksum does not match it.
        """
        root = Path(root)
        meta = _read_json(root / MANIFEST)
        if meta is None or meta.get("format") != _FORMAT:
            raise DataError(f"{root}: no valid {MANIFEST}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = []
        for entry in meta["shards"]:
            path = root / entry["file"]
            side = _read_json(path.with_suffix(".json"))
            if side is None or side.get("checksum") != entry["checksum"] or side.get("num_tokens") != entry["num_tokens"]:
                raise DataError(f"{path}: its sidecar is missing or disagrees with {root / MANIFEST}")
            if not path.is_file() or path.stat().st_size != entry["num_tokens"] * itemsize:
                raise DataError(f"{path}: size does not match {root / MANIFEST} ({entry['num_tokens']} tokens)")
            if verify and _file_checksum(path) != entry["checksum"]:
                raise DataError(f"{path}: checksum does not match {root / MANIFEST}")
            shards.append(Shard(path, int(entry["num_tokens"]), int(entry["num_documents"]), str(entry["checksum"])))
        return cls(root, tuple(shards), str(meta["dtype"]), int(meta["eos_token_id"]), str(meta["key"]), True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pieces(docs: Iterable[str], shard_bytes: int) -> Iterator[tuple[list[str], Any]]:
    """Consecutive runs of documents of at least ``shard_bytes`` of UTF-8 (the last may be less),
    each with the stream's state right after its last document (``None`` if it has no state)."""
    state = getattr(docs, "state_dict", None)
    piece: list[str] = []
    size = 0
    for doc in docs:
        piece.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= shard_bytes:
            yield piece, state() if state else None  # before the next document is pulled
            piece, size = [], 0
    if piece:
        yield piece, state() if state else None


# --- the worker side: one tokenizer per process, set up once ---------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str, vocab: int) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype), vocab=vocab)


def _batches(docs: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) == _BATCH_DOCS or size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_shard(index: int, docs: list[str], folder: str, stream_state: Any = None) -> dict[str, Any]:
    """Tokenize one piece into ``shard-<index>.bin`` (+ sidecar), atomically. Runs in a worker."""
    tok, eos, dtype = _WORKER["tokenizer"], _WORKER["eos"], _WORKER["dtype"]
    path = Path(folder) / f"shard-{index:06d}.bin"
    tmp = path.with_name(f".{path.name}.tmp")
    h = hashlib.blake2b(digest_size=16)
    num_tokens = 0
    with open(tmp, "wb") as f:
        for batch in _batches(docs):
            ids = [e.ids for e in tok.encode_batch_fast(batch, add_special_tokens=False)]
            count = sum(map(len, ids)) + len(ids)
            try:  # straight into the shard's dtype: no int64 copy (4x the bytes) per batch
                flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                                   dtype=dtype, count=count)
            except OverflowError:
                top = max(max(x, default=0) for x in ids)
                raise DataError(f"token id {top} does not fit {dtype.name} (vocabulary {_WORKER['vocab']})") from None
            data = flat.tobytes()
            h.update(data)
            f.write(data)
            num_tokens += count
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {"file": path.name, "num_tokens": num_tokens, "num_documents": len(docs), "checksum": h.hexdigest()}
    if stream_state is not None:
        meta["stream_state"] = stream_state
    _write_json_atomic(path.with_suffix(".json"), meta)  # last: a shard without a sidecar is not a shard
    return meta


def _tokenizer_parallelism_off() -> None:
    # Each worker is one core: the Rust tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextlib.contextmanager
def _parallelism_configured() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false for a while (this process's own setting is restored after).

    While the pool forks: the Rust tokenizer warns in every child forked after its thread pool
    was used, unless the variable is set. While tokenizing in-process: one worker, one core."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _pool_init(*args: Any) -> None:
    _tokenizer_parallelism_off()
    _init_worker(*args)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_over_stale(cache_dir: Path, name: str, build: Path) -> list[dict[str, Any]]:
    """Take over the temporary folder a dead run of this key left (kill -9): keep its leading
    complete shards, verified by checksum, as ``build``; delete everything else. Returns their sidecars."""
    best: tuple[list[dict[str, Any]], Path] | None = None
    for tmp in sorted(cache_dir.glob(f".{name}.tmp-*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue  # another live process is building it
        kept = _complete_prefix(tmp)
        if best is None or len(kept) > len(best[0]):
            if best is not None:
                shutil.rmtree(best[1], ignore_errors=True)
            best = (kept, tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if best is None:
        return []
    kept, tmp = best
    keep = {m["file"] for m in kept} | {Path(m["file"]).with_suffix(".json").name for m in kept}
    for entry in tmp.iterdir():
        if entry.name not in keep:  # torn files, shards after a gap, a stale manifest
            entry.unlink() if entry.is_file() else shutil.rmtree(entry)
    os.replace(tmp, build)
    logger.warning("taking over %s, left by an interrupted tokenization: %d complete shard(s) kept", tmp, len(kept))
    return kept


def _complete_prefix(folder: Path) -> list[dict[str, Any]]:
    """Sidecars of shards 0, 1, ... up to the first one missing, torn or not matching its checksum."""
    kept = []
    for index in itertools.count():
        path = folder / f"shard-{index:06d}.bin"
        meta = _read_json(path.with_suffix(".json"))
        if meta is None or not path.is_file() or _file_checksum(path) != meta.get("checksum"):
            return kept
        kept.append(meta)
    return kept  # unreachable: itertools.count() is endless


def ingest(
    documents: Iterable[str],
    tokenizer: Any,
    cache_dir: str | os.PathLike[str],
    *,
    key: str,
    workers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ShardedCorpus:
    """Tokenize a stream of documents into cached token shards, or open the ones already there.

    Args:
        documents: The documents, read once and only on a cache miss (a generator is fine).
        tokenizer: A ``transformers`` fast tokenizer with an EOS token.
        cache_dir: Folder holding one sub-folder per cache key.
        key: The content key of ``documents`` (e.g. :meth:`TextSource.key`); the cache key adds
            the tokenizer and the settings to it.
        workers: Tokenizer processes (default :func:`default_workers`); ``1`` tokenizes in
            this process. The shards are byte-identical for any number.
        shard_bytes: Text per shard, in UTF-8 bytes.

    Returns:
        The corpus; ``from_cache`` tells whether tokenizing was skipped.

    Raises:
        DataError: Bad input (from ``documents``), no documents, a token id that does not fit,
            or a tokenizer that is not a fast one or has no EOS token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"ingest needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token: set tokenizer.eos_token before packing")
    workers = default_workers() if workers is None else workers
    if workers < 1 or shard_bytes < 1:
        raise ValueError(f"workers and shard_bytes must be >= 1, got {workers} and {shard_bytes}")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    settings = {"format": _FORMAT, "source": key, "tokenizer": tokenizer_fingerprint(tokenizer), "eos_token_id": eos,
                "dtype": dtype.name, "shard_bytes": shard_bytes}
    full_key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()
    cache_dir = Path(cache_dir)
    name = full_key[:24]
    final = cache_dir / name
    if (final / MANIFEST).is_file():
        try:
            corpus = ShardedCorpus.open(final)
            logger.info("token shards cache hit: %s (%d tokens in %d shards)", final, corpus.num_tokens, len(corpus.shards))
            return corpus
        except DataError as e:
            logger.warning("%s; tokenizing again", e)
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = cache_dir / f".{name}.tmp-{os.getpid()}"
    kept = _take_over_stale(cache_dir, name, build)
    build.mkdir(exist_ok=True)
    try:
        metas = _tokenize_all(documents, tokenizer, build, eos=eos, dtype=dtype.name, vocab=vocab,
                              workers=workers, shard_bytes=shard_bytes, kept=kept)
        if not metas:
            raise DataError("no documents to tokenize")
        _write_json_atomic(build / MANIFEST, {**settings, "key": full_key, "shards": metas, "vocab_size": vocab})
        fsync_dir(build)
        if final.exists():  # a broken folder (checked above) or one another process just finished
            if (final / MANIFEST).is_file():
                try:
                    corpus = ShardedCorpus.open(final)
                    return corpus
                except DataError:
                    pass
            shutil.rmtree(final)
        os.replace(build, final)
        fsync_dir(cache_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    corpus = ShardedCorpus.open(final)
    logger.info("tokenized %d documents into %d tokens in %d shards: %s", corpus.num_documents, corpus.num_tokens,
                len(corpus.shards), final)
    return ShardedCorpus(corpus.root, corpus.shards, corpus.dtype, corpus.eos_token_id, corpus.key, from_cache=False,
                         reused_shards=len(kept))



def _tokenize_all(documents: Iterable[str], tokenizer: Any, build: Path, *, eos: int, dtype: str, vocab: int,
                  workers: int, shard_bytes: int, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    init = (tokenizer.backend_tokenizer.to_str(), eos, dtype, vocab)
    first = len(kept)
    resumable = first and hasattr(documents, "load_state_dict") and "stream_state" in kept[-1]
    if resumable:
        documents.load_state_dict(kept[-1]["stream_state"])  # nothing before the kept shards is read again
    pieces = _pieces(documents, shard_bytes)
    # Without a stream state the kept pieces are read again (cut the same way) and skipped.
    numbered = zip(itertools.count(first), pieces if resumable else itertools.islice(pieces, first, None))
    metas = list(kept)
    if workers == 1:
        # One worker is one core, here too: the Rust tokenizer's own thread pool stays off (its
        # threads' allocator arenas also made this process's peak memory vary by ~100 MB).
        _init_worker(*init)
        try:
            with _parallelism_configured():
                return metas + [_write_shard(i, piece, str(build), state) for i, (piece, state) in numbered]
        finally:
            _WORKER.clear()
    # fork: the workers need only numpy and tokenizers, and a spawned worker would re-import the
    # launching script (a recipe imports torch). The pool is bounded by hand below because
    # Pool.imap reads its whole input ahead, which would hold the corpus in memory.
    ctx = multiprocessing.get_context("fork")
    with _parallelism_configured(), ctx.Pool(workers, initializer=_pool_init, initargs=init) as pool:
        pending: collections.deque = collections.deque()
        for i, (piece, state) in numbered:
            pending.append(pool.apply_async(_write_shard, (i, piece, str(build), state)))
            del piece
            if len(pending) > workers:
                metas.append(pending.popleft().get())
        while pending:
            metas.append(pending.popleft().get())
    return metas
