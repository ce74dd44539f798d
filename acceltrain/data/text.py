"""Loading raw text documents: local files and folders, Hub datasets, and the Python stdlib corpus.

Every loader returns a ``list[str]`` with one entry per document, in a deterministic order, with
empty and whitespace-only documents dropped. A list (not a stream) because the next stages need
to see the corpus twice: once to fingerprint it for the caches, once to tokenize it.

Example:
    >>> docs = load_texts("data/")                        # .txt / .jsonl / .json / .csv / .parquet
    >>> docs = load_texts("corpus.csv", text_column="body")
    >>> docs = load_texts("wikitext", config_name="wikitext-2-raw-v1", split="train")  # needs network
    >>> docs = load_texts("python-stdlib", max_bytes=2_000_000)  # offline default corpus
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from ..config import UserError

__all__ = [
    "DataError",
    "STDLIB_SOURCE",
    "TEXT_EXTENSIONS",
    "load_texts",
    "python_stdlib_corpus",
    "texts_fingerprint",
]

logger = logging.getLogger("acceltrain")

STDLIB_SOURCE = "python-stdlib"
"""The ``source`` name of the embedded default corpus (the running Python's own standard library)."""

TEXT_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
"""File extension -> ``datasets`` builder name (``.txt`` is read directly, see ``load_texts``)."""

# Stdlib folders that are not "the library": test suites (some files there are invalid on
# purpose), installed third-party packages, and the generated codec tables in ``encodings``
# (pages of hex literals that teach a language model nothing).
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


class DataError(UserError):
    """Input data is missing, malformed or empty; the message names the file or field."""


def texts_fingerprint(texts: Iterable[str]) -> str:
    """A content hash of a sequence of documents (order and boundaries included).

    Each document is hashed with its byte length in front, so ``["ab", "c"]`` and ``["a", "bc"]``
    differ. Used as the corpus part of the tokenizer and packing cache keys.

    Example:
        >>> texts_fingerprint(["hello", "world"]) != texts_fingerprint(["hello world"])
        True
    """
    h = hashlib.blake2b(digest_size=16)
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _cap_bytes(docs: list[str], max_bytes: int | None) -> list[str]:
    """Keep whole documents while they fit in ``max_bytes`` (UTF-8); cut the last one at a line end."""
    if max_bytes is None:
        return docs
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    out: list[str] = []
    total = 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if total + size <= max_bytes:
            out.append(doc)
            total += size
            continue
        head = doc.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
        head = head[: head.rfind("\n") + 1] if "\n" in head else head
        if head.strip():
            out.append(head)
        break
    return out


def _docstrings(source: str, filename: str) -> str | None:
    """The module, class and function docstrings of one file, joined by blank lines."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError:  # a few stdlib files target other grammars; they hold no docstrings we need
        return None
    nodes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)),
    ]
    parts = [doc for node in nodes if (doc := ast.get_docstring(node))]
    return "\n\n".join(parts) if parts else None


def python_stdlib_corpus(
    max_bytes: int | None = 4_000_000, *, kind: Literal["source", "docstrings"] = "source"
) -> list[str]:
    """The running interpreter's standard library as a corpus, read from disk at call time.

    Files come from ``sysconfig.get_paths()["stdlib"]`` in sorted path order, one document per
    ``.py`` file, skipping test suites, ``site-packages`` and ``encodings``. Nothing is copied into
    the repository: the corpus is whatever this Python ships, so it is deterministic for one
    installation (and differs slightly between Python versions).

    Args:
        max_bytes: Stop once the documents reach this many UTF-8 bytes (``None``: everything,
            about 10 MB of source on CPython 3.11).
        kind: ``"source"`` for the full files (code and comments), ``"docstrings"`` for the
            module/class/function docstrings only (English prose).

    Returns:
        The documents, non-empty.

    Raises:
        DataError: The stdlib folder is missing or yields no text.

    Example:
        >>> docs = python_stdlib_corpus(max_bytes=1_000_000)
        >>> sum(len(d.encode()) for d in docs) <= 1_000_000
        True
    """
    if kind not in ("source", "docstrings"):
        raise ValueError(f"kind must be 'source' or 'docstrings', got {kind!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"python stdlib folder not found: {root}")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into test suites or site-packages.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    docs: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a legacy-encoded file: skipping it keeps the corpus UTF-8 only
            continue
        if kind == "docstrings":
            text = _docstrings(text, str(path)) or ""
        if not text.strip():
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    docs = _cap_bytes(docs, max_bytes)
    if not docs:
        raise DataError(f"the python stdlib at {root} gave no {kind} text")
    return docs


def _read_txt(path: Path, txt_mode: str) -> list[str]:
    # Read directly: one file is one document (or its paragraphs), which needs no Arrow table.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [text] if txt_mode == "document" else _PARAGRAPH_BREAK.split(text)


def _read_table(path: Path, builder: str, text_column: str, cache_dir: str | os.PathLike[str] | None) -> list:
    import datasets

    # One file per load_dataset call: schemas may differ between files, and an error can then
    # name the one file that lacks the column.
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as {builder}: {str(cause).splitlines()[0]}") from e
    if text_column not in ds.column_names:
        raise DataError(f"{path}: no column {text_column!r}; available columns: {', '.join(ds.column_names)}")
    feature = ds.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{path}: column {text_column!r} holds {feature}, not text")
    return list(ds[text_column])


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() not in TEXT_EXTENSIONS:
            raise DataError(
                f"{root}: unknown extension {root.suffix!r}; expected one of {', '.join(TEXT_EXTENSIONS)}"
            )
        return [root]
    found = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    files = [p for p in found if p.suffix.lower() in TEXT_EXTENSIONS]
    if len(files) < len(found):
        logger.info(
            "load_texts: skipping %d file(s) under %s with other extensions", len(found) - len(files), root
        )
    if not files:
        raise DataError(f"{root}: no {', '.join(TEXT_EXTENSIONS)} files in this folder")
    return files


def _looks_local(source: str) -> bool:
    """A missing path that was meant as a local file rather than a Hub dataset name."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or Path(source).suffix.lower() in TEXT_EXTENSIONS


def load_texts(
    source: str | os.PathLike[str],
    *,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
    txt_mode: Literal["document", "paragraph"] = "document",
    max_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Load documents from a file, a folder, a Hub dataset or the stdlib corpus.

    ``source`` is resolved in this order:

    1. ``"python-stdlib"``: :func:`python_stdlib_corpus` (``max_bytes`` defaults to 4 MB).
    2. An existing file or folder. Folders are searched recursively, in sorted path order,
       skipping hidden entries and files with other extensions. ``.txt`` is one document per
       file (``txt_mode="document"``) or one per blank-line-separated paragraph
       (``txt_mode="paragraph"``); ``.jsonl``/``.json``/``.csv``/``.parquet`` give one
       document per row of ``text_column`` (read with ``datasets.load_dataset``).
    3. Anything else is a Hugging Face Hub dataset name, loaded with
       ``datasets.load_dataset(source, config_name, split=split)`` (network needed; ``split``
       accepts slices such as ``"train[:10%]"``).

    Args:
        source: Path, Hub dataset name or ``"python-stdlib"``.
        text_column: The column holding the text, for table formats and Hub datasets.
        config_name: The Hub dataset configuration, if it has several.
        split: The Hub dataset split.
        txt_mode: How ``.txt`` files are cut into documents.
        max_bytes: Keep documents until their UTF-8 size reaches this (``None``: no cap).
        cache_dir: Where ``datasets`` keeps its Arrow cache (``None``: its default).

    Returns:
        The non-empty documents, in order.

    Raises:
        DataError: A missing path, an unknown extension, a missing or non-text column, an
            unreadable file, an unreachable Hub dataset, or no text at all.

    Example:
        >>> docs = load_texts("notes/", txt_mode="paragraph", max_bytes=10_000_000)
    """
    if txt_mode not in ("document", "paragraph"):
        raise ValueError(f"txt_mode must be 'document' or 'paragraph', got {txt_mode!r}")
    name = os.fspath(source)
    if name == STDLIB_SOURCE:
        return python_stdlib_corpus(4_000_000 if max_bytes is None else max_bytes)

    path = Path(name).expanduser()
    raw: list = []
    if path.exists():
        for file in _local_files(path):
            builder = TEXT_EXTENSIONS[file.suffix.lower()]
            if builder == "text":
                raw.extend(_read_txt(file, txt_mode))
            else:
                raw.extend(_read_table(file, builder, text_column, cache_dir))
        where = str(path)
    elif _looks_local(name):
        raise DataError(f"file or folder not found: {path}")
    else:
        raw = _load_hub(
            name, text_column=text_column, config_name=config_name, split=split, cache_dir=cache_dir
        )
        where = f"hub dataset {name!r} ({split})"

    docs = [t for t in raw if isinstance(t, str) and t.strip()]
    docs = _cap_bytes(docs, max_bytes)
    if not docs:
        raise DataError(f"{where}: no text found (every document is empty)")
    return docs


def _load_hub(
    name: str,
    *,
    text_column: str,
    config_name: str | None,
    split: str,
    cache_dir: str | os.PathLike[str] | None,
) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot load {name!r} from the Hugging Face Hub (no local path has that name either): {first}"
        ) from e
    if text_column not in ds.column_names:
        raise DataError(
            f"hub dataset {name!r}: no column {text_column!r}; available columns: {', '.join(ds.column_names)}"
        )
    return list(ds[text_column])
