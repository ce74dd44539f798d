"""Elastic resume: continue a checkpoint on another number of processes.

What changes with the world size, and what this module decides about it:

- **Samples per optimizer step** (micro-batch x accumulation x processes) are kept: the
  accumulation is scaled when it divides (2 processes x accumulation 2 -> 1 process x
  accumulation 4), else the resume is refused, naming both batch sizes, unless
  ``allow_global_batch_change`` (then the new global batch is used and logged). The LR schedule
  continues by optimizer step either way.
- **Data order**: the data position is global (:mod:`acceltrain.data.sampler`), so the new ranks
  continue the saved run's sample order exactly.
- **RNG**: ranks that still exist keep their saved generator states; a rank the saved run did
  not have is seeded from ``(seed, step, rank)``. Dropout streams therefore differ from an
  unresized run after a resize, while the data order does not.
- **Weights and optimizer state**: DDP and single-process checkpoints hold full tensors; FSDP2
  shards are reassembled into full tensors here (:func:`full_from_shards`) and laid out again
  on the live mesh. DeepSpeed ZeRO partitions are re-cut for the new world size
  (:mod:`acceltrain.zero_reshard`).

The log and refusal lines are part of the interface (cluster scripts grep them)::

    resumed on 1 process from a 2-process checkpoint at step 40: accumulation 2 -> 4, same 64 samples per step
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint_io import is_dtensor
from .config import UserError

__all__ = ["ResizePlan", "plan_resize", "batch_layout", "manifest_layout", "seed_new_rank", "full_from_shards",
           "dtensor_shapes"]


def _procs(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


@dataclass(frozen=True)
class ResizePlan:
    """What a resume on another world size does: the accumulation to use and the line to log."""

    accumulation: int
    global_batch: int | None
    message: str


def batch_layout(*, world: int, micro_batch: int | None, accumulation: int) -> dict[str, Any]:
    """The manifest's record of how a step was made (``micro_batch`` None: unknown, e.g. an iterable)."""
    return {"micro_batch": micro_batch, "accumulation": accumulation,
            "global_batch": micro_batch * accumulation * world if micro_batch else None}


def plan_resize(manifest: dict[str, Any], *, folder: Path | str, world: int, micro_batch: int | None,
                accumulation: int, allow_global_batch_change: bool = False) -> ResizePlan | None:
    """The plan for resuming ``manifest``'s checkpoint on ``world`` processes (None: same world).

    Raises:
        UserError: the samples per step cannot be kept and ``allow_global_batch_change`` is off,
            or the checkpoint does not record its batch layout (written before elastic resume).
    """
    saved_world = int(manifest["world_size"])
    if saved_world == world:
        return None
    step = manifest.get("step")
    head = f"resumed on {_procs(world)} from a {saved_world}-process checkpoint at step {step}"
    saved = manifest.get("batch") or {}
    saved_global, saved_micro, saved_accum = saved.get("global_batch"), saved.get("micro_batch"), saved.get("accumulation")
    if saved_global is None or micro_batch is None:
        what = "the checkpoint does not record its samples per step" if saved_global is None else \
            "this run's data has no fixed micro-batch size (only a map-style DataLoader does)"
        raise UserError(f"{folder}: saved by {_procs(saved_world)}, this run has {world}; {what}, so the global "
                        f"batch cannot be kept: resume with {saved_world} processes")
    per_micro_step = micro_batch * world
    new_global = per_micro_step * accumulation
    if new_global == saved_global:
        return ResizePlan(accumulation, saved_global, f"{head}: accumulation {accumulation}, same {saved_global} "
                                                      "samples per step")
    if saved_global % per_micro_step == 0:
        keep = saved_global // per_micro_step
        return ResizePlan(keep, saved_global,
                          f"{head}: accumulation {accumulation} -> {keep}, same {saved_global} samples per step")
    if allow_global_batch_change:
        return ResizePlan(accumulation, new_global,
                          f"{head}: {saved_global} -> {new_global} samples per step (allow_global_batch_change), "
                          f"accumulation {accumulation}")
    raise UserError(
        f"{folder}: saved with {saved_global} samples per step ({saved_micro} per process x accumulation "
        f"{saved_accum} x {_procs(saved_world)}); on {_procs(world)} with micro-batch {micro_batch} a step is a "
        f"multiple of {per_micro_step} samples, so no accumulation keeps {saved_global} (this run would use "
        f"{new_global}): resume on a number of processes that keeps it, or pass --allow_global_batch_change "
        "true (allow_global_batch_change=True) to continue with the new global batch")


def seed_new_rank(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch of a rank the saved run did not have, from (seed, step, rank)."""
    value = int(np.random.SeedSequence([seed % 2**63, step, rank]).generate_state(2, np.uint32).astype(np.uint64)
                .dot(np.array([1, 2**32], dtype=np.uint64))) % 2**63
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # all CUDA devices too


def full_from_shards(shards: list[Any], shapes: dict[str, list[int]], *, prefix: str = "") -> Any:
    """Reassemble FSDP2's dim-0 shards (one object per saved rank, in rank order) into full tensors.

    ``shapes`` maps the dotted path of every tensor that was a sharded DTensor to its full shape;
    every other value (AdamW's scalar ``step``, replicated buffers, ``param_groups``) is taken
    from rank 0. FSDP2 shards with ``torch.chunk`` semantics (``Shard(0)``, the first ranks get
    the larger chunks, trailing ranks may hold none), so concatenating in rank order is exact.
    """
    first = shards[0]
    if isinstance(first, dict):
        return {k: full_from_shards([s[k] for s in shards], shapes, prefix=f"{prefix}{k}.") for k in first}
    path = prefix[:-1]
    if isinstance(first, torch.Tensor) and path in shapes:
        full = torch.cat(list(shards), dim=0)
        if list(full.shape) != shapes[path]:
            raise UserError(f"{path}: the shards make a {list(full.shape)} tensor, the manifest says {shapes[path]}")
        return full
    return first


def dtensor_shapes(obj: Any, *, prefix: str = "") -> dict[str, list[int]]:
    """The dotted path and full shape of every DTensor in a nested state dict (for the manifest)."""
    if isinstance(obj, dict):
        out: dict[str, list[int]] = {}
        for k, v in obj.items():
            out.update(dtensor_shapes(v, prefix=f"{prefix}{k}."))
        return out
    if is_dtensor(obj) and obj.dim() > 0:
        from torch.distributed.tensor import Shard

        if tuple(obj.placements) != (Shard(0),):  # only what FSDP2's fully_shard makes
            raise UserError(f"{prefix[:-1]}: sharded as {obj.placements}; only Shard(0) (FSDP2) is supported")
        return {prefix[:-1]: list(obj.shape)}
    return {}


def manifest_layout(trainer: Any) -> dict[str, Any]:
    """The manifest's record of the step's make-up and the sampler (for a resume on another world)."""
    position = trainer.data.position if trainer.data is not None else None
    world = trainer.accelerator.num_processes
    layout: dict[str, Any] = {"batch": batch_layout(world=world, micro_batch=position.batch_size if position else None,
                                                    accumulation=trainer.gradient_accumulation_steps)}
    if position is not None:
        sampler = position.sampler
        layout["sampler"] = {"layout": "global", "num_replicas": sampler.num_replicas,
                             "dataset_len": sampler.dataset_len, "shuffle": sampler.shuffle,
                             "drop_last": sampler.drop_last, "seed": position.seed}
    else:  # iterables and custom samplers resume by re-reading their batches, per rank
        layout["sampler"] = {"layout": "per-rank batches"}
    return layout
