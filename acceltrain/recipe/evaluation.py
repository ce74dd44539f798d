"""Held-out splits, exact evaluation gathered from every rank, and a checkpoint's weights for export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import full_model_from_shards, verify_checkpoint
from ..checkpoint_deepspeed import live_setup
from ..checkpoint_io import CheckpointError, add_frozen_weights, load_safetensors, restore_tied
from ..config import UserError
from ..trainer import BaseTrainer

__all__ = ["split_indices", "gather_eval_outputs", "load_checkpoint_weights", "check_weights_loadable"]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle of ``range(n)`` cut into ``(train, held out)``; at least one of each.

    Raises:
        UserError: fewer than two examples.
    """
    import random

    if n < 2:
        raise UserError(f"{n} example(s): a train/evaluation split needs at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


@torch.no_grad()
def gather_eval_outputs(trainer: BaseTrainer, step: Callable[[Any], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample outputs over the exact evaluation set, gathered from every rank.

    For metrics that are not means of per-batch values (macro-F1 needs every prediction).
    ``step(batch)`` returns tensors whose first dimension is the batch. Each rank's share of the
    set is ``ceil(N / world)`` samples long (:mod:`acceltrain.evaluation` pads the tail with
    samples flagged invalid), so the all-gather needs no padding of its own; the invalid rows are
    dropped after it. Every rank must call this and gets the same ``N`` rows, ordered by rank.
    """
    loader = trainer.eval_data_loader
    if loader is None:
        raise RuntimeError("gather_eval_outputs() needs build_eval_data_loader() to return a DataLoader")
    from accelerate.utils import send_to_device

    model, acc = trainer.model, trainer.accelerator
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    masks: list[torch.Tensor] = []
    try:
        for valid, batch in loader:
            with acc.autocast():
                out = step(send_to_device(batch, trainer.device))
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach())
            masks.append(valid.to(trainer.device, torch.int64))  # gloo cannot all-gather bool
    finally:
        model.train(was_training)
    keep = acc.gather(torch.cat(masks)).bool()
    return {key: acc.gather(torch.cat(values))[keep] for key, values in parts.items()}


def load_checkpoint_weights(trainer: BaseTrainer, folder: Path) -> None:
    """Load only the model weights of a checkpoint folder (verified first) into the running model:
    the optimizer, schedule and data position stay as they are. Every rank must call it.

    Reads every layout a run writes: one ``model.safetensors`` (one process, DDP, DeepSpeed ZeRO
    0-2) or FSDP2's per-rank shards, reassembled whatever the number of processes now. DeepSpeed
    ZeRO-3 keeps its weights only in the optimizer partitions: refused (see
    :func:`check_weights_loadable`, which a recipe calls before training).

    Raises:
        CheckpointError: the folder fails verification, or it is a ZeRO-3 checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    manifest = verify_checkpoint(folder)
    stage = (manifest.get("deepspeed") or {}).get("zero_stage")
    if stage == 3:
        raise CheckpointError(f"{folder}: {_ZERO3}")
    model = trainer.unwrapped_model
    if manifest.get("sharded"):
        weights = full_model_from_shards(folder, manifest)
    else:
        weights = load_safetensors(folder / "model.safetensors")
        if manifest.get("frozen"):  # a LoRA checkpoint stores only what trains
            add_frozen_weights(model, weights, manifest["frozen"], folder)
    restore_tied(model, weights)
    if trainer.engine_kind == "deepspeed":  # ZeRO 0-2: whole parameters on every rank, loaded in place
        model.load_state_dict(weights)
    else:
        set_model_state_dict(trainer.model, weights, options=StateDictOptions(full_state_dict=True))


_ZERO3 = ("DeepSpeed ZeRO-3 keeps the weights only in its optimizer partitions, which cannot be loaded "
          "into the model alone; export the last step (--export_best false) or train with ZeRO-2 or FSDP2")


def check_weights_loadable(trainer: BaseTrainer, what: str = "--export_best true") -> None:
    """Refuse, before training, a run whose checkpoints :func:`load_checkpoint_weights` cannot read
    (DeepSpeed ZeRO-3); ``what`` names the option that asks for it.

    Raises:
        UserError: the run trains under ZeRO-3.
    """
    setup = live_setup(trainer)  # None without DeepSpeed
    if setup is not None and setup["zero_stage"] == 3:
        raise UserError(f"{what} under {_ZERO3}")
