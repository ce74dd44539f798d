"""Held-out splits, exact evaluation gathered from every rank, and a checkpoint's weights for export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import verify_checkpoint
from ..checkpoint_io import add_frozen_weights, restore_tied
from ..config import UserError
from ..trainer import BaseTrainer

__all__ = ["split_indices", "gather_eval_outputs", "load_checkpoint_weights"]


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
    the optimizer, schedule and data position stay as they are. Every rank must call it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    manifest = verify_checkpoint(folder)
    weights = load_file(str(folder / "model.safetensors"))
    if manifest.get("frozen"):  # a LoRA checkpoint stores only what trains
        add_frozen_weights(trainer.unwrapped_model, weights, manifest["frozen"], folder)
    restore_tied(trainer.unwrapped_model, weights)
    set_model_state_dict(trainer.model, weights, options=StateDictOptions(full_state_dict=True))
