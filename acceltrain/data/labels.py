"""Labelled text for sequence classification: loading, label spaces, exact metrics, and the
offline default task built from the Python standard library.

The three problem types are Hugging Face's ``problem_type`` values:

- ``single_label_classification``: one class per text; labels are class ids or class names.
- ``multi_label_classification``: a set of classes per text; a list (of ids or names) or a string
  of names joined by a separator (CSV has no lists).
- ``regression``: one number per text.

Example:
    >>> texts, raw, names = load_labelled("reviews.csv", text_column="text", label_column="stars")
    >>> space = LabelSpace.fit("single_label_classification", raw, names=names, where="reviews.csv")
    >>> y = space.encode(raw, where="reviews.csv")         # [0, 2, 1, ...]
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .text import TEXT_EXTENSIONS, DataError

__all__ = [
    "PROBLEM_TYPES",
    "ProblemType",
    "LabelSpace",
    "load_columns",
    "load_labelled",
    "classification_metrics",
    "macro_f1",
    "StdlibDocstring",
    "stdlib_docstrings",
    "STDLIB_FAMILIES",
    "stdlib_family_task",
]

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
PROBLEM_TYPES: tuple[str, ...] = ("single_label_classification", "multi_label_classification", "regression")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a classification task (none for regression) and how raw labels map to them.

    Attributes:
        problem_type: One of :data:`PROBLEM_TYPES`.
        num_labels: Output width of the model (1 for regression).
        names: Class names by id, or ``None`` when the labels are bare ids (the model config then
            keeps transformers' ``LABEL_i`` names).
        separator: For multi-label strings, what joins the names.
    """

    problem_type: str
    num_labels: int
    names: tuple[str, ...] | None = None
    separator: str = "|"

    @classmethod
    def fit(cls, problem_type: str, values: Sequence[Any], *, num_labels: int | None = None,
            names: Sequence[str] | None = None, separator: str = "|", where: str = "data") -> LabelSpace:
        """The label space of the training labels ``values``.

        Class names (strings) are sorted, so ids do not depend on row order; ``names`` (e.g. a Hub
        ``ClassLabel``) fixes them instead. Integer ids need ``num_labels`` or count up to the
        largest id seen.

        Raises:
            DataError: a missing label, mixed kinds, floats as classes, or ids out of range.
        """
        if problem_type not in PROBLEM_TYPES:
            raise DataError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if not values:
            raise DataError(f"{where}: no labels")
        if problem_type == "regression":
            space = cls(problem_type, 1)
            space.encode(values, where=where)  # checks that every label is a number
            return space
        items = [item for i, v in enumerate(values) for item in cls._items(problem_type, v, i, where, separator)]
        kinds = {type(x) for x in items}
        if kinds == {str}:
            found = sorted(set(items))
            if names is None:
                names = found
            if num_labels is not None and num_labels != len(names):
                raise DataError(f"{where}: {len(names)} label names ({', '.join(names[:8])}...) but num_labels is "
                                f"{num_labels}")
            space = cls(problem_type, len(names), tuple(names), separator)
        elif kinds <= {int} and items:
            width = num_labels if num_labels is not None else (len(names) if names is not None else max(items) + 1)
            space = cls(problem_type, width, tuple(names) if names is not None else None, separator)
        elif not items:
            raise DataError(f"{where}: every row has an empty label set")
        else:
            shown = ", ".join(sorted(k.__name__ for k in kinds))
            hint = " (use --problem_type regression for numbers)" if float in kinds else ""
            raise DataError(f"{where}: class labels must be all integer ids or all names, got {shown}{hint}")
        space.encode(values, where=where)  # range checks with row numbers
        if space.num_labels < (1 if problem_type == "multi_label_classification" else 2):
            raise DataError(f"{where}: {space.num_labels} class(es); a classifier needs at least 2")
        return space

    @staticmethod
    def _items(problem_type: str, value: Any, row: int, where: str, separator: str) -> list[Any]:
        """The class items of one raw label (one for single-label, a set for multi-label)."""
        if value is None:
            raise DataError(f"{where}: row {row} has no label")
        if problem_type == "multi_label_classification":
            if isinstance(value, str):
                return [s.strip() for s in value.split(separator) if s.strip()]
            if isinstance(value, list | tuple):
                return [_class_item(v, row, where) for v in value]
            raise DataError(f"{where}: row {row}: a multi-label label must be a list or a {separator!r}-separated "
                            f"string, got {_describe(value)}")
        return [_class_item(value, row, where)]

    def encode(self, values: Sequence[Any], *, where: str = "data") -> list[Any]:
        """Raw labels as model targets: an id (single), a multi-hot list of floats (multi), a float.

        Raises:
            DataError: naming the row of a missing label, an unknown name or an id out of range.
        """
        if self.problem_type == "regression":
            out = []
            for row, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise DataError(f"{where}: row {row}: regression labels must be numbers, got {_describe(value)}")
                out.append(float(value))
            return out
        index = {name: i for i, name in enumerate(self.names or ())}
        encoded = []
        for row, value in enumerate(values):
            ids = []
            for item in self._items(self.problem_type, value, row, where, self.separator):
                if isinstance(item, str):
                    if item not in index:
                        known = ", ".join(self.names or ()) or "integer ids"
                        raise DataError(f"{where}: row {row}: label {item!r} is not a training label ({known})")
                    ids.append(index[item])
                elif not 0 <= item < self.num_labels:
                    raise DataError(f"{where}: row {row}: label {item} is out of range: with num_labels "
                                    f"{self.num_labels} ids must be 0..{self.num_labels - 1}")
                else:
                    ids.append(item)
            if self.problem_type == "single_label_classification":
                encoded.append(ids[0])
            else:
                hot = [0.0] * self.num_labels
                for i in ids:
                    hot[i] = 1.0
                encoded.append(hot)
        return encoded

    def model_config_kwargs(self) -> dict[str, Any]:
        """``num_labels``, ``problem_type`` and, with names, ``id2label``/``label2id`` for a model config."""
        kwargs: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        if self.names is not None:
            kwargs["id2label"] = dict(enumerate(self.names))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.names)}
        return kwargs


def _class_item(value: Any, row: int, where: str) -> Any:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():  # e.g. a CSV column with a missing cell
        return int(value)
    raise DataError(f"{where}: row {row}: a class label must be an integer id or a name, got {_describe(value)}")


def load_columns(source: str, columns: dict[str, str], *, config_name: str | None = None, split: str = "train",
                 cache_dir: str | os.PathLike[str] | None = None) -> tuple[dict[str, list[Any]], Any, str]:
    """Whole columns of a local ``.csv``/``.jsonl``/``.json``/``.parquet`` file or a Hub dataset.

    ``columns`` maps a role to a column name (``{"text": "review", "label": "stars"}``); roles
    whose column must hold text are those named ``text``, ``prompt`` or ``response``.

    Returns:
        ``(values by role, the dataset's features, a description of the source for messages)``.

    Raises:
        DataError: a missing file, an unknown extension, a missing column (naming the columns
            there are), a text column that is not text or has an empty cell, no rows, or an
            unreachable Hub dataset.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = TEXT_EXTENSIONS.get(path.suffix.lower())
        if builder in (None, "text"):
            raise DataError(f"{path}: expected a .csv, .jsonl, .json or .parquet file with named columns")
        where = str(path)
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as e:
            raise DataError(f"{path}: cannot be read as {builder}: {str(e.__cause__ or e).splitlines()[0]}") from e
    elif path.exists() or source.startswith(("/", "./", "../", "~")) or path.suffix.lower() in TEXT_EXTENSIONS:
        raise DataError(f"{path}: no such file (pass one table file, not a folder)")
    else:
        where = f"hub dataset {source!r} ({split})"
        try:
            ds = datasets.load_dataset(source, config_name, split=split, cache_dir=cache_dir)
        except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot load {source!r} ({split}) from the Hugging Face Hub: {first}") from e
    out = {}
    for role, column in columns.items():
        if column not in ds.column_names:
            raise DataError(f"{where}: no {role} column {column!r}; available columns: {', '.join(ds.column_names)}")
        values = list(ds[column])
        if role in ("text", "prompt", "response"):
            if getattr(ds.features[column], "dtype", None) not in ("string", "large_string"):
                raise DataError(f"{where}: column {column!r} holds {ds.features[column]}, not text")
            empty = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if empty is not None:
                raise DataError(f"{where}: row {empty}: column {column!r} is empty")
        out[role] = values
    if ds.num_rows == 0:
        raise DataError(f"{where}: no rows")
    return out, ds.features, where


def load_labelled(source: str, *, text_column: str, label_column: str, config_name: str | None = None,
                  split: str = "train", cache_dir: str | os.PathLike[str] | None = None,
                  ) -> tuple[list[str], list[Any], list[str] | None]:
    """``(texts, raw labels, class names or None)`` through :func:`load_columns`; a Hub
    ``ClassLabel`` column (or a sequence of them, for multi-label) gives the class names."""
    values, features, _ = load_columns(source, {"text": text_column, "label": label_column},
                                       config_name=config_name, split=split, cache_dir=cache_dir)
    feature = features[label_column]
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel)
    names = getattr(feature, "names", None) or getattr(inner, "names", None)
    return values["text"], values["label"], list(names) if names else None


# ---------------------------------------------------------------------------- metrics
def macro_f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in ``true`` or ``pred`` (scikit-learn's default label set
    for single-label input). Both are ``(N, C)`` 0/1 indicator matrices."""
    pred, true = pred.bool(), true.bool()
    tp = (pred & true).sum(0).double()
    fp = (pred & ~true).sum(0).double()
    fn = (~pred & true).sum(0).double()
    seen = (tp + fp + fn) > 0
    if not seen.any():
        return 0.0
    return float((2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])).mean())


def classification_metrics(problem_type: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss and metrics of a whole evaluation set from its logits ``(N, C)`` and targets.

    The loss is the one transformers' sequence classifiers train with for ``problem_type``
    (cross-entropy, BCE with logits, MSE), averaged over the set. Single-label: ``accuracy`` and
    ``f1`` (macro). Multi-label: ``accuracy`` is the exact-match ratio (every class right, as
    scikit-learn's ``accuracy_score``), ``f1`` is macro over classes, a class predicted when its
    logit is > 0. Regression: ``mse`` and ``mae``. ``samples`` is N.
    """
    logits = logits.double()
    n = float(labels.shape[0])
    if problem_type == "regression":
        err = logits.reshape(-1) - labels.double().reshape(-1)
        mse = float((err**2).mean())
        return {"loss": mse, "mse": mse, "mae": float(err.abs().mean()), "samples": n}
    if problem_type == "single_label_classification":
        loss = torch.nn.functional.cross_entropy(logits, labels.long())
        pred = logits.argmax(-1)
        width = logits.shape[-1]
        f1 = macro_f1(torch.nn.functional.one_hot(pred, width), torch.nn.functional.one_hot(labels.long(), width))
        return {"loss": float(loss), "accuracy": float((pred == labels).double().mean()), "f1": f1, "samples": n}
    if problem_type == "multi_label_classification":
        true = labels.double()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, true)
        pred = logits > 0
        exact = (pred == true.bool()).all(-1).double().mean()
        return {"loss": float(loss), "accuracy": float(exact), "f1": macro_f1(pred, true), "samples": n}
    raise ValueError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")


# ---------------------------------------------------------------------------- the stdlib task
# Same exclusions as the pretraining corpus (acceltrain.data.text): test suites, installed
# packages, generated codec tables.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"})


@dataclass(frozen=True)
class StdlibDocstring:
    """One docstring of the running Python's standard library.

    Attributes:
        path: The file, relative to the stdlib folder (``"asyncio/tasks.py"``).
        name: The function or class name (``""`` for a module docstring).
        signature: ``def name(args):`` / ``async def ...`` / ``class Name(bases):``, or ``""``.
        text: The cleaned docstring (``ast.get_docstring``).
    """

    path: str
    name: str
    signature: str
    text: str


def stdlib_docstrings(packages: Collection[str] | None = None,
                      root: str | os.PathLike[str] | None = None) -> Iterator[StdlibDocstring]:
    """Every module, class and function docstring of the standard library, read at call time from
    ``sysconfig.get_paths()["stdlib"]`` in sorted path order (nothing is copied into the repo).

    ``packages`` limits the walk to those top-level packages (parsing the whole library takes
    seconds). Skips test suites, ``site-packages`` and ``encodings``; files that do not parse or
    are not UTF-8 are skipped too (a few target other grammars or encodings on purpose).
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"python stdlib folder not found: {base}")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        top = Path(dirpath) == base
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and (not top or packages is None or d in packages)]
        if top and packages is not None:
            continue  # top-level modules belong to no package
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_"))
    for file in sorted(files, key=lambda p: p.relative_to(base).as_posix()):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        rel = file.relative_to(base).as_posix()
        for node in ast.walk(tree):  # the module first, then its classes and functions
            if not isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            text = ast.get_docstring(node)
            if not text:
                continue
            yield StdlibDocstring(rel, getattr(node, "name", ""), _signature(node), text)


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
        return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
        return f"class {node.name}({bases}):" if bases else f"class {node.name}:"
    return ""


STDLIB_FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio", "concurrent"),
    "email": ("email",),
    "importlib": ("importlib",),
    "logging": ("logging",),
    "multiprocessing": ("multiprocessing",),
    "unittest": ("unittest",),
    "web": ("http", "urllib", "wsgiref", "xmlrpc"),
    "xml": ("xml",),
}
"""Class name -> the stdlib packages whose docstrings belong to it. All ship with CPython 3.10+
on every platform (unlike tkinter/idlelib, which distributions package separately)."""


def stdlib_family_task(min_chars: int = 40, max_chars: int = 2000,
                       root: str | os.PathLike[str] | None = None) -> tuple[list[str], list[str]]:
    """The offline default classification task: which package family a stdlib docstring is from.

    ``(texts, labels)`` with labels from :data:`STDLIB_FAMILIES` (about 1,900 docstrings on
    CPython 3.11). Docstrings shorter than ``min_chars`` are dropped (``"Return self."`` says
    nothing about its package), longer ones are cut at ``max_chars``, and a text that occurs in
    two families is dropped (it cannot be told apart).

    Raises:
        DataError: fewer than two families with docstrings (an unusual Python installation).
    """
    family_of = {pkg: fam for fam, pkgs in STDLIB_FAMILIES.items() for pkg in pkgs}
    seen: dict[str, str | None] = {}
    for doc in stdlib_docstrings(family_of, root):
        family = family_of.get(doc.path.split("/", 1)[0]) if "/" in doc.path else None
        if family is None or len(doc.text) < min_chars:
            continue
        text = doc.text[:max_chars]
        seen[text] = family if seen.get(text, family) == family else None
    pairs = [(text, fam) for text, fam in seen.items() if fam is not None]
    if len({fam for _, fam in pairs}) < 2:
        raise DataError("the python stdlib here has docstrings of fewer than two package families; pass --dataset")
    return [t for t, _ in pairs], [f for _, f in pairs]
