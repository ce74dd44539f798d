"""Byte-level BPE tokenizer training (cached) and tokenizer loading.

``train_bpe_tokenizer`` trains with the ``tokenizers`` library and saves a standard Hugging Face
tokenizer folder, so ``transformers.AutoTokenizer.from_pretrained(save_dir)`` loads it with no
acceltrain installed. A stamp file records a content hash of (corpus, vocab size, settings); a
second call with the same inputs loads the saved tokenizer instead of training again.

Example:
    >>> docs = load_texts("python-stdlib", max_bytes=1_000_000)
    >>> tok = train_bpe_tokenizer(docs, 4096, "out/tokenizer")
    >>> tok.acceltrain_cache_hit        # False the first time, True on an identical re-run
    False
    >>> ids = tok("def f(x):", add_special_tokens=False)["input_ids"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .text import DataError, texts_fingerprint

if TYPE_CHECKING:  # transformers is imported on first use: it takes a second or two
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["STAMP_FILE", "load_tokenizer", "train_bpe_tokenizer"]

logger = logging.getLogger("acceltrain")

STAMP_FILE = "acceltrain_tokenizer.json"
"""Written last into ``save_dir``: the cache key and the settings the tokenizer was trained with."""

_BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte value


def _cache_key(settings: dict) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def _read_stamp(save_dir: Path) -> dict | None:
    try:
        stamp = json.loads((save_dir / STAMP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike[str],
    *,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|pad|>",
    extra_special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
    model_max_length: int = 1024,
    fingerprint: str | None = None,
    sample_bytes: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer, or load the one an identical earlier call saved.

    The tokenizer is GPT-2 style: a byte-level pre-tokenizer and decoder (any UTF-8 text
    round-trips, so there is no unknown token), ``eos_token`` doubling as the BOS token (one
    document separator, as in GPT-2), and a separate ``pad_token``. Special tokens get the first
    ids: ``eos_token`` is 0, ``pad_token`` is 1, then ``extra_special_tokens``.

    The vocabulary can come out smaller than ``vocab_size`` when the corpus has fewer distinct
    merges: size the model with ``len(tokenizer)``.

    Caching: the key hashes the corpus fingerprint, every argument here and the ``tokenizers``
    version (a new version may merge differently). When ``save_dir`` holds a tokenizer stamped
    with the same key, it is loaded and ``tokenizer.acceltrain_cache_hit`` is ``True``; otherwise
    the tokenizer is trained, its files are moved into ``save_dir`` one by one with
    ``os.replace``, and the stamp is written last (a crash leaves no stamp, so the next call
    trains again). Other files in ``save_dir`` are left alone.

    Args:
        texts: The training documents (materialised into a list if it is a one-shot iterator
            and no ``fingerprint`` is given, since it must be read twice).
        vocab_size: Target vocabulary size, special tokens included; at least 256 plus the
            number of special tokens.
        save_dir: Folder to save into (created if missing).
        eos_token: End-of-document token, also used as BOS.
        pad_token: Padding token (never produced by encoding text).
        extra_special_tokens: More special tokens, e.g. chat markers.
        min_frequency: A pair must occur this often to be merged.
        model_max_length: Stored in ``tokenizer_config.json``; long inputs are not truncated
            unless asked.
        fingerprint: A precomputed corpus fingerprint (e.g. from :func:`texts_fingerprint`) to
            skip hashing ``texts`` again. With it, a cache hit reads nothing from ``texts``; it
            must then identify the sample (the stream and ``sample_bytes``), not only the corpus.
        sample_bytes: Train on the first ``sample_bytes`` of UTF-8 text of ``texts`` (whole
            documents, the last one cut at a line end) and stop reading there, so ``texts`` can
            be a stream of a corpus of any size; only the sample is held in memory. ``None``:
            all of ``texts``. The recipes default to 100 MB (``--tokenizer_sample_bytes``).

    Returns:
        The tokenizer, with a boolean ``acceltrain_cache_hit`` attribute.

    Raises:
        ValueError: ``vocab_size`` or ``min_frequency`` is out of range, or special tokens repeat.
        DataError: ``texts`` is empty.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a collection of documents, not one str")
    specials = [eos_token, pad_token, *extra_special_tokens]
    if len(set(specials)) != len(specials) or not all(specials):
        raise ValueError(f"special tokens must be distinct and non-empty, got {specials}")
    if vocab_size < _BYTE_ALPHABET + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{_BYTE_ALPHABET} byte tokens + {len(specials)} special tokens"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    import tokenizers

    if sample_bytes is not None and sample_bytes < 1:
        raise ValueError(f"sample_bytes must be >= 1, got {sample_bytes}")
    if sample_bytes is not None:
        texts = _Lazy(texts, sample_bytes)  # read (and held) only on a cache miss
    if fingerprint is None:
        texts = texts if isinstance(texts, list) else list(texts)
        fingerprint = texts_fingerprint(texts)
    settings = {
        "format": 1,
        "corpus": fingerprint,
        "vocab_size": vocab_size,
        "special_tokens": specials,
        "min_frequency": min_frequency,
        "tokenizers_version": tokenizers.__version__,
    }  # not model_max_length: a setting of the wrapper, applied on load, not of what is trained
    key = _cache_key(settings)
    save_dir = Path(save_dir)
    stamp = _read_stamp(save_dir)
    if stamp is not None and stamp.get("key") == key and (save_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        logger.info("tokenizer cache hit: loading %s (key %s)", save_dir, key[:12])
        tok = PreTrainedTokenizerFast.from_pretrained(save_dir, model_max_length=model_max_length)
        tok.acceltrain_cache_hit = True
        return tok

    texts = texts if isinstance(texts, list) else list(texts)
    if not texts:
        raise DataError("train_bpe_tokenizer: texts is empty")
    logger.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(texts))
    tok = _train(texts, vocab_size, specials, min_frequency, eos_token, pad_token, model_max_length)

    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / STAMP_FILE).unlink(missing_ok=True)  # no stamp until every file is in place
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=save_dir))
    try:
        tok.save_pretrained(tmp)
        _portable_config(tmp / "tokenizer_config.json")
        for file in sorted(tmp.iterdir()):
            os.replace(file, save_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_json_atomic(save_dir / STAMP_FILE, {"key": key, "settings": settings})
    tok.acceltrain_cache_hit = False
    return tok


class _Lazy:
    """The first ``limit`` bytes of a document stream, taken on first iteration."""

    def __init__(self, texts: Iterable[str], limit: int) -> None:
        self.texts, self.limit = texts, limit

    def __iter__(self) -> Iterator[str]:
        from .sources import take_bytes

        return take_bytes(self.texts, self.limit)


def _train(
    texts: list[str],
    vocab_size: int,
    specials: list[str],
    min_frequency: int,
    eos_token: str,
    pad_token: str,
    model_max_length: int,
) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word keeps its own spelling (GPT-2 convention).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # Seed all 256 byte symbols so any input encodes, even bytes the corpus never shows.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def _portable_config(path: Path) -> None:
    # transformers 5 writes its own class name ("TokenizersBackend"); the 4.x name loads in both.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder or Hub tokenizer with ``AutoTokenizer``; give it a pad token.

    A tokenizer without a pad token (GPT-2, Llama) gets its EOS token as pad, which is safe for
    causal LM training because padded positions are masked out of attention and labels.

    Args:
        name_or_path: A local folder (as saved by :func:`train_bpe_tokenizer`) or a Hub id.
        trust_remote_code: Allow a Hub repository's own Python code to run. Off unless asked.

    Returns:
        The tokenizer.

    Raises:
        DataError: The folder does not exist, or the tokenizer cannot be loaded.

    Example:
        >>> tok = load_tokenizer("out/tokenizer")
        >>> tok.pad_token is not None
        True
    """
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if not path.exists() and name.startswith(("/", "./", "../", "~")):
        raise DataError(f"tokenizer folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path) if path.exists() else name, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot load a tokenizer from {name!r}: {first}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
