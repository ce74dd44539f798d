"""Text sources as streams of documents: local files, folders and globs, Hub datasets, weighted specs.

A :class:`TextSource` names where documents come from and reads them lazily, one at a time, so
memory does not grow with the corpus. Its :meth:`~TextSource.key` is a content hash computed
without tokenizing anything (file bytes, memoised by file stat), which keys the tokenizer and
shard caches downstream.

Formats (compressed with ``.gz`` or ``.zst`` too: ``corpus.jsonl.zst``):

- ``.txt``: one document per file (``txt_mode="document"``; a file over 64 MiB is cut at blank
  lines into documents of about that size so it never sits in memory whole), or one per
  blank-line-separated paragraph (``txt_mode="paragraph"``).
- ``.jsonl`` / ``.json``: one document per line, from ``text_column`` (a ``.json`` file that
  starts with ``[`` is a JSON array, read whole).
- ``.csv``: one document per row of ``text_column``.
- ``.parquet``: one document per row of ``text_column``, read in record batches with pyarrow.

Every bad input is a :class:`~acceltrain.data.text.DataError` naming the file and, where there
is one, the line: a malformed JSON line, bytes that are not UTF-8, a missing or non-text column,
a file with no text, a glob that matches nothing.

Example:
    >>> specs = parse_sources("code/:0.7,prose.jsonl:0.3")
    >>> [(s.path, s.weight) for s in specs]
    [('code/', 0.7), ('prose.jsonl', 0.3)]
    >>> source = TextSource(specs[1])
    >>> next(iter(source.documents()))[:20]
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from .text import _PARAGRAPH_BREAK, STDLIB_SOURCE, DataError, python_stdlib_corpus, texts_fingerprint

__all__ = ["SourceSpec", "StreamDocuments", "TextSource", "parse_sources", "take_bytes", "STREAM_EXTENSIONS"]

logger = logging.getLogger("acceltrain")

STREAM_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
"""Base extensions read as text sources; each may carry a ``.gz`` or ``.zst`` suffix (not parquet)."""

_COMPRESSED = (".gz", ".zst")
_TXT_DOC_LIMIT = 64 << 20  # a .txt "document" is cut at a blank line once it passes this many chars
_HASH_CHUNK = 1 << 20
_KEY_FORMAT = 1


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a dataset spec.

    Attributes:
        path: A file, folder, glob, ``"python-stdlib"`` or a Hub dataset name.
        weight: Share of the mixture (relative; normalised over all sources), > 0.
        text_column: Column holding the text (jsonl/csv/parquet/Hub).
    """

    path: str
    weight: float = 1.0
    text_column: str = "text"


def _weight(value: Any, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise DataError(f"--dataset: weight of {where!r} must be a number, got {value!r}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"--dataset: weight of {where!r} must be > 0, got {value!r}")
    return weight


def parse_sources(spec: str | list[dict[str, Any]], *, text_column: str = "text") -> list[SourceSpec]:
    """Parse ``"a/:0.7,b.jsonl:0.3"``, one path, or a list of ``{path, weight, text_column}``.

    The list may also arrive as JSON text (a YAML list under ``dataset:`` reaches the recipe so).
    A weight is written after the last ``:`` of an entry; an entry without one has weight 1.

    Raises:
        DataError: An empty entry, a weight that is not a number or not > 0, an unknown key.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise DataError(f"--dataset: not a valid list of sources: {e.msg}") from None
    if isinstance(spec, list):
        out = []
        for i, entry in enumerate(spec):
            if not isinstance(entry, dict) or not entry.get("path"):
                raise DataError(f"--dataset: entry {i} must be a mapping with a 'path', got {entry!r}")
            unknown = set(entry) - {"path", "weight", "text_column"}
            if unknown:
                raise DataError(f"--dataset: entry {i}: unknown key(s) {', '.join(sorted(unknown))}")
            path = str(entry["path"])
            out.append(SourceSpec(path, _weight(entry.get("weight", 1.0), path),
                                  str(entry.get("text_column", text_column))))
        if not out:
            raise DataError("--dataset: the list of sources is empty")
        return out
    out = []
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            raise DataError(f"--dataset: empty entry in {spec!r}")
        path, sep, tail = item.rpartition(":")
        if sep and path and not tail.startswith(("/", "\\")):
            out.append(SourceSpec(path, _weight(tail, path), text_column))
        else:
            out.append(SourceSpec(item, 1.0, text_column))
    return out


def take_bytes(docs: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Documents while they fit in ``max_bytes`` of UTF-8; the last one is cut at a line end.

    The streaming form of the in-memory cap of :func:`~acceltrain.data.load_texts` (same result).
    """
    if max_bytes is None:
        yield from docs
        return
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    total = 0
    for doc in docs:
        data = doc.encode("utf-8")
        if total + len(data) <= max_bytes:
            yield doc
            total += len(data)
            if total == max_bytes:
                return
            continue
        head = data[: max_bytes - total].decode("utf-8", errors="ignore")
        head = head[: head.rfind("\n") + 1] if "\n" in head else head
        if head.strip():
            yield head
        return


def _split_ext(path: Path) -> tuple[str, str]:
    """``(base extension, compression)``: ``a.jsonl.zst`` -> ``(".jsonl", ".zst")``."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSED else ""
    base = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not comp else "")
    return base, comp


def _is_text_file(path: Path) -> bool:
    base, comp = _split_ext(path)
    return base in STREAM_EXTENSIONS and not (base == ".parquet" and comp)


def _open_binary(path: Path) -> IO[bytes]:
    _, comp = _split_ext(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install 'acceltrain[zstd]')") from None
        # Buffered: zstandard's reader has no readline, which line iteration needs.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a file, decoded line by line so an error can name the line."""
    with _open_binary(path) as raw:
        for lineno, line in enumerate(raw, 1):
            try:
                yield lineno, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None


def _read_txt(path: Path, txt_mode: str) -> Iterator[str]:
    parts: list[str] = []
    size = 0
    for _, line in _lines(path):
        parts.append(line)
        size += len(line)
        blank = not line.strip()
        if txt_mode == "paragraph" and blank:
            yield from _PARAGRAPH_BREAK.split("".join(parts))
            parts, size = [], 0
        elif txt_mode == "document" and blank and size >= _TXT_DOC_LIMIT:
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        text = "".join(parts)
        yield from (_PARAGRAPH_BREAK.split(text) if txt_mode == "paragraph" else [text])


def _text_value(value: Any, where: str, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        if lineno == 1 and line.lstrip().startswith("[") and _split_ext(path)[0] == ".json":
            yield from _read_json_array(path, column)
            return
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        if column not in row:
            raise DataError(f"{path}:{lineno}: no column {column!r}; keys: {', '.join(map(str, row)) or 'none'}")
        text = _text_value(row[column], f"{path}:{lineno}", column)
        if text is not None:
            yield text


def _read_json_array(path: Path, column: str) -> Iterator[str]:
    # A JSON array has no line structure to stream by: it is read whole (use .jsonl for big data).
    with _open_binary(path) as f:
        try:
            rows = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or column not in row:
            raise DataError(f"{path}: item {i} has no column {column!r}")
        text = _text_value(row[column], f"{path}: item {i}", column)
        if text is not None:
            yield text


def _read_csv(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are long; the default is 128 KiB
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if header is None:
                return
            if column not in header:
                raise DataError(f"{path}: no column {column!r}; columns: {', '.join(header)}")
            col = header.index(column)
            for row in reader:
                if col < len(row):
                    yield row[col]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot be read as parquet: {str(e).splitlines()[0]}") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path}: no column {column!r}; columns: {', '.join(schema.names)}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not text")
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):  # bounded: one record batch at a time
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def read_file(path: Path, *, text_column: str = "text", txt_mode: str = "document") -> Iterator[str]:
    """The raw documents of one file, in order (empty ones included; see :class:`TextSource`)."""
    base, _ = _split_ext(path)
    if base == ".txt":
        return _read_txt(path, txt_mode)
    if base in (".jsonl", ".json"):
        return _read_jsonl(path, text_column)
    if base == ".csv":
        return _read_csv(path, text_column)
    if base == ".parquet":
        return _read_parquet(path, text_column)
    raise DataError(f"{path}: unknown extension; expected one of {', '.join(STREAM_EXTENSIONS)} (optionally .gz/.zst)")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", "\\")) or any(
        name.lower().endswith(ext + comp) for ext in STREAM_EXTENSIONS for comp in ("", *_COMPRESSED))


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _visible(root: Path, p: Path) -> bool:
    return p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)


class TextSource:
    """One source of documents, read lazily.

    Args:
        spec: What to read (see :class:`SourceSpec`).
        txt_mode: How ``.txt`` files are cut into documents.
        max_bytes: Read at most this many UTF-8 bytes of documents (``None``: all).
        config_name: The Hub dataset configuration.
        split: The Hub dataset split.
        hash_cache: A folder memoising file content hashes by file stat, so a second run (or
            another rank) does not read the corpus to find its caches.

    Raises:
        DataError: A missing path, a glob matching nothing, a folder with no text files.
    """

    def __init__(self, spec: SourceSpec, *, txt_mode: Literal["document", "paragraph"] = "document",
                 max_bytes: int | None = None, config_name: str | None = None, split: str = "train",
                 hash_cache: str | os.PathLike[str] | None = None) -> None:
        self.spec = spec
        self.txt_mode = txt_mode
        self.max_bytes = max_bytes
        self.config_name = config_name
        self.split = split
        self.hash_cache = Path(hash_cache) if hash_cache is not None else None
        self.kind, self.files = self._resolve(spec.path)
        self._memos: list[Path] = []

    @property
    def name(self) -> str:
        return self.spec.path

    def _resolve(self, name: str) -> tuple[str, list[Path]]:
        if name == STDLIB_SOURCE:
            return "stdlib", []
        if _is_glob(name):
            files = sorted((Path(p) for p in glob.glob(os.path.expanduser(name), recursive=True)),
                           key=lambda p: p.as_posix())
            files = [p for p in files if p.is_file() and _is_text_file(p)]
            if not files:
                raise DataError(f"{name}: glob matches no {', '.join(STREAM_EXTENSIONS)} file")
            return "files", files
        path = Path(name).expanduser()
        if path.is_file():
            if not _is_text_file(path):
                raise DataError(f"{path}: unknown extension {''.join(path.suffixes)!r}; expected one of "
                                f"{', '.join(STREAM_EXTENSIONS)} (optionally .gz/.zst)")
            return "files", [path]
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if _visible(path, p)), key=lambda p: p.relative_to(path).as_posix())
            files = [p for p in found if _is_text_file(p)]
            if len(files) < len(found):
                logger.info("%s: skipping %d file(s) with other extensions", path, len(found) - len(files))
            if not files:
                raise DataError(f"{path}: no {', '.join(STREAM_EXTENSIONS)} files in this folder")
            return "files", files
        if _looks_like_path(name):
            raise DataError(f"file or folder not found: {path}")
        return "hub", []

    def raw_documents(self) -> Iterator[str]:
        """Every non-blank document in order, before the byte cap."""
        if self.kind == "stdlib":
            yield from python_stdlib_corpus(4_000_000 if self.max_bytes is None else self.max_bytes)
            return
        if self.kind == "hub":
            yield from self._hub_documents()
            return
        for file in self.files:
            count = 0
            for doc in read_file(file, text_column=self.spec.text_column, txt_mode=self.txt_mode):
                if doc.strip():
                    count += 1
                    yield doc
            if count == 0:
                raise DataError(f"{file}: empty (no text in it)")

    def documents(self) -> Iterable[str]:
        """The documents this source contributes: non-blank, in order, within ``max_bytes``.

        For a Hub dataset this is a :class:`StreamDocuments`, whose position can be saved and
        restored (an interrupted tokenization continues where its last shard ended)."""
        if self.kind == "hub":
            return StreamDocuments(self.hub_dataset, text_column=self.spec.text_column, max_bytes=self.max_bytes,
                                   where=f"hub dataset {self.name!r}")
        return take_bytes(self.raw_documents(), self.max_bytes)

    def hub_dataset(self) -> Any:
        """The Hub dataset as a ``datasets.IterableDataset`` (``streaming=True``): nothing downloaded whole."""
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=True)
        except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot load {self.name!r} from the Hugging Face Hub (no local path has that name "
                            f"either): {first}") from e

    def _hub_documents(self) -> Iterator[str]:
        yield from StreamDocuments(self.hub_dataset, text_column=self.spec.text_column, max_bytes=None,
                                   where=f"hub dataset {self.name!r}")

    def key(self) -> str:
        """A content hash of what this source reads, with the settings that change its documents.

        Files are hashed by their bytes (memoised in ``hash_cache`` by path, size, mtime and
        inode); the stdlib by its documents; a Hub dataset by name, config and split.
        """
        h = hashlib.blake2b(digest_size=16)
        settings = {"format": _KEY_FORMAT, "kind": self.kind, "txt_mode": self.txt_mode, "max_bytes": self.max_bytes,
                    "text_column": self.spec.text_column}
        if self.kind == "hub":
            settings.update(name=self.name, config=self.config_name, split=self.split)
        h.update(json.dumps(settings, sort_keys=True).encode())
        if self.kind == "stdlib":
            h.update(texts_fingerprint(self.documents()).encode())
        for file in self.files:
            h.update(file.name.encode() + b"\0" + self._file_hash(file).encode())
        return h.hexdigest()

    def _file_hash(self, path: Path) -> str:
        st = path.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        memo = None
        if self.hash_cache is not None:
            memo = self.hash_cache / (hashlib.blake2b(str(path.resolve()).encode(), digest_size=12).hexdigest() + ".json")
            try:
                saved = json.loads(memo.read_text())
                if saved.get("stat") == stamp:
                    return str(saved["hash"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError, AttributeError):
                pass
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if memo is not None:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"path": str(path.resolve()), "stat": stamp, "hash": digest}))
            os.replace(tmp, memo)
            self._memos.append(memo)
        return digest

    def forget_hashes(self) -> None:
        """Delete the hash memos this source wrote (after bad input: no cache entry stays behind)."""
        for memo in self._memos:
            memo.unlink(missing_ok=True)
        self._memos.clear()


class StreamDocuments:
    """The documents of a ``datasets.IterableDataset`` (``streaming=True``), with a position to resume.

    ``state_dict()`` is the dataset's own iterable state (``datasets``' ``state_dict()``) and the
    bytes taken so far; ``load_state_dict()`` puts both back, so the next iteration starts after
    the last document handed out, reading nothing before it. Blank documents are skipped and
    ``max_bytes`` caps the stream as :func:`take_bytes` does.

    Args:
        dataset: The streamed dataset, or a function returning it: called on first use, so a
            cache hit downstream never contacts the Hub.
        text_column: The column holding the text.
        max_bytes: Stop after this many UTF-8 bytes (``None``: no cap).
        where: How errors name the source.

    Example:
        >>> ds = datasets.load_dataset("json", data_files="corpus.jsonl", split="train", streaming=True)
        >>> docs = StreamDocuments(ds, text_column="text")
    """

    def __init__(self, dataset: Any, *, text_column: str = "text", max_bytes: int | None = None,
                 where: str = "stream") -> None:
        self._dataset = dataset
        self.text_column = text_column
        self.max_bytes = max_bytes
        self.where = where
        self.taken = 0  # UTF-8 bytes handed out so far

    @property
    def dataset(self) -> Any:
        if callable(self._dataset) and not hasattr(self._dataset, "state_dict"):
            self._dataset = self._dataset()
        return self._dataset

    def __iter__(self) -> Iterator[str]:
        names = getattr(self.dataset, "column_names", None)
        if names is not None and self.text_column not in names:
            raise DataError(f"{self.where}: no column {self.text_column!r}; available columns: {', '.join(names)}")
        for row in self.dataset:
            text = _text_value(row.get(self.text_column), self.where, self.text_column)
            if text is None or not text.strip():
                continue
            size = len(text.encode("utf-8"))
            if self.max_bytes is not None and self.taken + size > self.max_bytes:
                head = next(take_bytes([text], self.max_bytes - self.taken), None) if self.taken < self.max_bytes else None
                self.taken = self.max_bytes
                if head is not None:
                    yield head
                return
            self.taken += size
            yield text
            if self.max_bytes is not None and self.taken >= self.max_bytes:
                return

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the dataset's iterable state and the bytes taken."""
        return {"dataset": self.dataset.state_dict(), "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the position ``state`` recorded."""
        self.dataset.load_state_dict(state["dataset"])
        self.taken = int(state["taken"])
