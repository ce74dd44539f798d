"""``DatasetLoader``: text datasets from local files or the Hub, cleaned, with their statistics.

Reading goes through :func:`acceltrain.data.text.load_texts` (local ``.txt`` / ``.jsonl`` /
``.json`` / ``.csv`` / ``.parquet`` files and folders, or a Hub name through
``datasets.load_dataset``); the result is a ``datasets.Dataset`` with one ``text`` column.

Example:
    >>> loader = DatasetLoader(min_length=10, remove_duplicates=True)
    >>> ds = loader.load_local_file("data.txt")
    >>> loader.get_statistics(ds)["num_samples"]
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .text import DataError, load_texts

__all__ = ["DatasetLoader"]

logger = logging.getLogger("acceltrain")
_FORMATS = {"txt": ".txt", "text": ".txt", "json": ".json", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}


class DatasetLoader:
    """Load and clean text datasets.

    Args:
        preprocessing: Strip whitespace and apply the filters below (False: texts as read).
        min_length: Drop texts shorter than this many characters (after stripping).
        max_length: Drop texts longer than this many characters (None: no limit).
        remove_duplicates: Keep only the first copy of each identical text.
        txt_mode: How a ``.txt`` file splits into samples: ``"paragraph"`` (blank-line separated,
            the default) or ``"document"`` (one sample per file).

    Attributes:
        last_report: What the last load kept and removed: ``{"read", "kept", "too_short",
            "too_long", "duplicates"}``.
    """

    def __init__(self, preprocessing: bool = True, min_length: int = 10, max_length: int | None = None,
                 remove_duplicates: bool = False, txt_mode: str = "paragraph") -> None:
        if min_length < 0 or (max_length is not None and max_length < max(1, min_length)):
            raise ValueError(f"min_length must be >= 0 and max_length None or >= min_length, got {min_length}, "
                             f"{max_length}")
        self.preprocessing, self.min_length, self.max_length = preprocessing, min_length, max_length
        self.remove_duplicates, self.txt_mode = remove_duplicates, txt_mode
        self.last_report: dict[str, int] = {}

    # ------------------------------------------------------------------ loading
    def load_huggingface(self, dataset_name: str, config_name: str | None = None, split: str = "train",
                         text_column: str = "text") -> Any:
        """A Hub dataset's ``text_column`` (network needed), cleaned."""
        texts = load_texts(dataset_name, text_column=text_column, config_name=config_name, split=split,
                           txt_mode=self.txt_mode)  # type: ignore[arg-type]
        return self._dataset(texts, dataset_name)

    def load_local_file(self, file_path: str | Path, file_format: str | None = None, text_column: str = "text") -> Any:
        """A local file or folder (``file_format`` overrides the extension: txt, json, jsonl, csv, parquet)."""
        path = Path(file_path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if file_format is not None:
            if file_format not in _FORMATS:
                raise DataError(f"file_format must be one of {sorted(_FORMATS)}, got {file_format!r}")
            if path.is_file() and path.suffix != _FORMATS[file_format]:
                raise DataError(f"{path}: file_format {file_format!r} but the file ends in {path.suffix or 'nothing'}")
        texts = load_texts(path, text_column=text_column, txt_mode=self.txt_mode)  # type: ignore[arg-type]
        return self._dataset(texts, str(path))

    def load_from_drive(self, drive_path: str | Path, text_column: str = "text") -> Any:
        """A file on a mounted Google Drive (Colab: ``drive.mount('/content/drive')`` first): a local file."""
        path = Path(drive_path)
        if not path.exists() and str(path).startswith("/content/drive"):
            raise DataError(f"{path}: not found; mount Google Drive first (from google.colab import drive; "
                            "drive.mount('/content/drive'))")
        return self.load_local_file(path, text_column=text_column)

    def from_texts(self, texts: Sequence[str], source: str = "texts") -> Any:
        """A cleaned dataset from texts in memory."""
        return self._dataset(list(texts), source)

    def _dataset(self, texts: list[str], source: str) -> Any:
        from datasets import Dataset

        kept = self._clean(texts)
        if not kept:
            raise DataError(f"{source}: no text left after preprocessing ({self.last_report})")
        return Dataset.from_dict({"text": kept})

    def _clean(self, texts: list[str]) -> list[str]:
        report = {"read": len(texts), "kept": 0, "too_short": 0, "too_long": 0, "duplicates": 0}
        if not self.preprocessing:
            report["kept"] = len(texts)
            self.last_report = report
            return list(texts)
        out, seen = [], set()
        for text in texts:
            text = text.strip()
            if len(text) < self.min_length:
                report["too_short"] += 1
            elif self.max_length is not None and len(text) > self.max_length:
                report["too_long"] += 1
            elif self.remove_duplicates and text in seen:
                report["duplicates"] += 1
            else:
                seen.add(text)
                out.append(text)
        report["kept"] = len(out)
        self.last_report = report
        logger.info("dataset: kept %(kept)d of %(read)d texts (%(too_short)d too short, %(too_long)d too long, "
                    "%(duplicates)d duplicates)", report)
        return out

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def _texts(dataset: Any, text_column: str = "text") -> list[str]:
        if isinstance(dataset, (list, tuple)):
            return list(dataset)
        if text_column not in dataset.column_names:
            raise DataError(f"dataset has no {text_column!r} column (columns: {dataset.column_names})")
        return list(dataset[text_column])

    def get_statistics(self, dataset: Any, text_column: str = "text") -> dict[str, Any]:
        """``num_samples``, ``total_characters``, ``total_words``, ``unique_words``, ``avg_length``,
        ``median_length``, ``min_length``, ``max_length`` (characters), ``avg_words``."""
        texts = self._texts(dataset, text_column)
        if not texts:
            return {"num_samples": 0}
        lengths = [len(t) for t in texts]
        words = [t.split() for t in texts]
        return {
            "num_samples": len(texts), "total_characters": sum(lengths), "total_words": sum(map(len, words)),
            "unique_words": len({w for ws in words for w in ws}), "avg_length": sum(lengths) / len(texts),
            "median_length": float(statistics.median(lengths)), "min_length": min(lengths),
            "max_length": max(lengths), "avg_words": sum(map(len, words)) / len(texts),
        }

    def print_statistics(self, dataset: Any, text_column: str = "text") -> None:
        """The statistics as a small table."""
        stats = self.get_statistics(dataset, text_column)
        print("Dataset statistics")
        for key, value in stats.items():
            print(f"  {key:<16} {value:,.1f}" if isinstance(value, float) else f"  {key:<16} {value:,}")

    def preview_samples(self, dataset: Any, num_samples: int = 3, max_chars: int = 200,
                        text_column: str = "text") -> list[str]:
        """Print (and return) the first ``num_samples`` texts, cut at ``max_chars``."""
        texts = self._texts(dataset, text_column)[:num_samples]
        for i, text in enumerate(texts):
            shown = text if len(text) <= max_chars else text[:max_chars] + "..."
            print(f"[{i}] {shown}")
        return texts
