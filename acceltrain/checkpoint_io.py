"""File-format helpers under every checkpoint layout (plain, FSDP2 shards, DeepSpeed ZeRO).

:mod:`acceltrain.checkpoint` and :mod:`acceltrain.checkpoint_deepspeed` both build on these and
neither imports the other's internals: safe loading (``weights_only=True`` pickles and
safetensors, each failure naming its file), safetensors writing without the frozen weights of a
LoRA base, tied-weight restoration, DTensor tests and durable directory entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .config import UserError
from .utils import dedupe_tensors

__all__ = ["CheckpointError", "safe_load", "load_safetensors", "write_weights", "frozen_names", "frozen_digest",
           "add_frozen_weights", "restore_tied", "is_dtensor", "local_tensor", "fsync_dir"]


class CheckpointError(UserError):
    """A checkpoint is missing, torn, altered or does not fit this run."""


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable (fsync the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU; any refusal names the file.

    ``mmap=True`` maps the tensors from the file instead of reading them into memory: pages are
    read as they are touched and belong to the page cache (shared by the ranks of a node), for
    files of which a caller reads only parts or one tensor at a time."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unpickling refusal or corruption names the file
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: {e})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a torn or foreign file names itself."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a torn or foreign file names itself
        raise CheckpointError(f"{path}: {e}") from None


def frozen_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that do not train (tied aliases included)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def frozen_digest(model: torch.nn.Module, frozen: set[str]) -> str:
    """Names, shapes and dtypes of the frozen parameters (not their values: hashing a 7B base
    at every save would cost more than the save). ZeRO-3 keeps the full shape in ``ds_shape``."""
    shapes = {n: [list(getattr(p, "ds_shape", p.shape)), str(p.dtype)]
              for n, p in model.named_parameters(remove_duplicate=False) if n in frozen}
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def write_weights(model: torch.nn.Module, path: Path, frozen: set[str], *, flat: bool = False) -> None:
    """The model's weights as safetensors; without the frozen ones (see ``add_frozen_weights``).

    ``flat``: the parameters are views into one flat buffer (DeepSpeed ZeRO 1-2), which
    safetensors refuses as shared storage: each is copied to the CPU first.
    """
    from safetensors.torch import save_file, save_model

    if frozen or flat:
        # Frozen weights (a LoRA base) come back from build_model on resume: store only
        # what trains, so a checkpoint of a 7B LoRA run is megabytes, not gigabytes.
        weights = dedupe_tensors({k: v for k, v in model.state_dict().items() if k not in frozen})
        if flat:
            weights = {k: v.to("cpu", copy=True) for k, v in weights.items()}
        save_file(weights, str(path), metadata={"format": "pt"})
    else:
        save_model(model, str(path))


def add_frozen_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], digest: str, folder: Path) -> None:
    """Complete a checkpoint saved without frozen parameters from the live (same) base model."""
    frozen = frozen_names(model)
    if frozen_digest(model, frozen) != digest:
        raise CheckpointError(f"{folder}: saved without its frozen (base) parameters, and this run's frozen "
                              "parameters differ from that run's; build the same base model to resume")
    live = model.state_dict()
    for name in frozen:
        weights.setdefault(name, live[name])


def restore_tied(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """safetensors stores tied tensors once; give the other names the same tensor back."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if not missing:
        return
    by_ptr: dict[int, str] = {}
    for name, tensor in expected.items():
        if name in weights:
            by_ptr.setdefault(tensor.data_ptr(), name)
    for name in missing:
        source = by_ptr.get(expected[name].data_ptr())
        if source is None:
            raise CheckpointError(f"model.safetensors has no tensor for {name!r}")
        weights[name] = weights[source]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters and optimizer state)."""
    # No DTensor exists before torch.distributed.tensor is imported (it pulls in sympy, ~50 MiB,
    # which `import acceltrain` does not pay for).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor as a plain contiguous tensor; other tensors as they are."""
    return t.to_local().contiguous() if is_dtensor(t) else t
