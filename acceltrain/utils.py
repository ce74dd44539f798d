"""Small helpers shared by the trainer, the hooks and the recipes (the `mini.trainer.utils` API)."""

from __future__ import annotations

import math
import os
import random
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "map_nested_tensor",
    "key_average",
    "flatten_dict",
    "seed_everything",
    "count_parameters",
    "format_params",
    "peak_memory_gib",
    "to_float",
    "dedupe_tensors",
    "in_workspace",
    "folder_problem",
    "mean_records",
]


def in_workspace(path: str | os.PathLike, workspace: str | os.PathLike | None) -> Path:
    """The one path rule of hooks and exports: a relative ``path`` is inside ``workspace``,
    unless it already starts with it (so the seed's ``path=self.workspace / "checkpoints"``
    with a relative workspace is not nested twice). Absolute paths, or no workspace: unchanged.

    Example:
        >>> in_workspace("checkpoints", "runs/exp1"), in_workspace("runs/exp1/checkpoints", "runs/exp1")
        (PosixPath('runs/exp1/checkpoints'), PosixPath('runs/exp1/checkpoints'))
    """
    path = Path(path)
    if workspace is None or path.is_absolute():
        return path
    workspace = Path(workspace)
    if path.parts[: len(workspace.parts)] == workspace.parts:
        return path
    return workspace / path


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes into, or None.

    Catches, before anything is written: a file where the folder should be, a file among its
    parents, and a folder (or nearest existing parent) that is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" if existing != path else "is not writable"
    return None


def map_nested_tensor(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts, lists, tuples and namedtuples.

    Non-tensor leaves are returned unchanged; containers keep their type.

    Example:
        >>> batch = {"x": torch.zeros(2, 3), "y": [torch.ones(4)], "name": "a"}
        >>> out = map_nested_tensor(lambda t: t * 2, batch)
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_nested_tensor(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:  # keep dict subclasses such as transformers' BatchEncoding
            return type(obj)(items)
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_nested_tensor(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_nested_tensor(fn, v) for v in obj)
    return obj


def to_float(value: Any) -> float:
    """A Python float from a number or a one-element tensor (this syncs a device tensor)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1


def key_average(records: Iterable[Mapping[str, Any]], exclude_nan: bool = False) -> dict[str, Any]:
    """Average numbers key by key over a list of nested dicts.

    The result has the union of the nested keys. A dict that lacks a key is skipped for that
    key (the average is over the dicts that have it). A NaN makes that key's average NaN,
    unless ``exclude_nan=True``, which drops NaNs (a key whose values are all NaN stays NaN).
    Values that are not numbers (strings, lists) are ignored. An empty list gives ``{}``.

    Example:
        >>> key_average([{"loss": 0.5, "m": {"acc": 0.9}}, {"loss": 0.6, "m": {"acc": 0.85}}])
        {'loss': 0.55, 'm': {'acc': 0.875}}
    """
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    nan_only: dict[str, Any] = {}

    def add(s: dict, c: dict, n: dict, rec: Mapping[str, Any]) -> None:
        for key, value in rec.items():
            if isinstance(value, Mapping):
                add(s.setdefault(key, {}), c.setdefault(key, {}), n.setdefault(key, {}), value)
            elif _is_number(value):
                value = to_float(value)
                if exclude_nan and math.isnan(value):
                    n[key] = True
                    continue
                s[key] = s.get(key, 0.0) + value
                c[key] = c.get(key, 0) + 1

    for rec in records:
        add(sums, counts, nan_only, rec)

    def finish(s: dict, c: dict, n: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in list(s.keys()) + [k for k in n if k not in s]:
            if isinstance(s.get(key), dict) or isinstance(n.get(key), dict):
                sub = finish(s.get(key, {}), c.get(key, {}), n.get(key, {}))
                if sub:
                    out[key] = sub
            elif key in s:
                out[key] = s[key] / c[key]
            else:
                out[key] = float("nan")
        return out

    return finish(sums, counts, nan_only)


def flatten_dict(records: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``: the flat form trackers and JSON lines want."""
    flat: dict[str, Any] = {}
    for key, value in records.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, sep, name))
        else:
            flat[name] = value
    return flat


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        # DTensor (FSDP2) reports its global shape through numel().
        total += p.numel()
    return total


def format_params(n: int | float) -> str:
    """Human form of a parameter count: 950 -> '950', 1_234_567 -> '1.23M', 7e9 -> '7.00B'."""
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def peak_memory_gib(device: torch.device | None = None) -> float:
    """Peak memory of this process: max allocated on CUDA, peak resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def dedupe_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of tensors, one name per shared storage (safetensors refuses aliases)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """key_average without host syncs: tensor values are averaged as tensors."""
    keys: dict[str, list[Any]] = {}
    for rec in records:
        for key, value in rec.items():
            keys.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in keys.items():
        if all(isinstance(v, dict) for v in values):
            out[key] = mean_records(values)
        elif all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
            out[key] = torch.stack([v.detach().reshape(()).float() for v in values]).mean()
        else:
            out.update(key_average([{key: v} for v in values]))
    return out
