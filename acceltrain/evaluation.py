"""Evaluation over the exact evaluation set across ranks, and the hook that runs it.

Every rank gets ``ceil(N / world)`` samples: its share of the set, then, if the set does not
divide evenly, padding samples marked invalid. All ranks therefore run the same number of
forward passes (FSDP and DDP need that: their forwards are collective), and the padding is
masked out of every metric, so the result equals the single-process one exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, Sampler

from .hooks.base import BaseHook
from .utils import flatten_dict, map_nested_tensor, to_float

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = ["EvaluationHook", "shard_eval_loader", "evaluate"]


class _Padded(Dataset):
    """``(is_real, sample)`` for indices past the end wrapping to the start."""

    def __init__(self, dataset: Dataset, total: int):
        self.dataset, self.total, self.n = dataset, total, len(dataset)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> tuple[bool, Any]:
        return i < self.n, self.dataset[i % self.n]


class _Strided(Sampler[int]):
    def __init__(self, total: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, total, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """This rank's share of ``loader``'s dataset, padded to an equal length; batches are
    ``(valid_mask, batch)`` with ``valid_mask`` a bool tensor of shape ``(B,)``."""
    dataset = loader.dataset
    n = len(dataset)
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    total = math.ceil(n / num_replicas) * num_replicas
    collate = loader.collate_fn

    def collate_with_mask(items: list[tuple[bool, Any]]) -> tuple[torch.Tensor, Any]:
        return torch.tensor([valid for valid, _ in items]), collate([sample for _, sample in items])

    return DataLoader(_Padded(dataset, total), batch_size=loader.batch_size or 1,
                      sampler=_Strided(total, num_replicas, rank), collate_fn=collate_with_mask,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _select(batch: Any, valid: torch.Tensor) -> Any:
    size = valid.shape[0]
    return map_nested_tensor(lambda t: t[valid] if t.dim() > 0 and t.shape[0] == size else t, batch)


@torch.no_grad()
def evaluate(trainer: BaseTrainer) -> dict[str, float]:
    """Average ``trainer.evaluation_step`` over the evaluation set, weighted by samples.

    Sums and sample counts are all-reduced, so every rank returns the same numbers.
    """
    loader = trainer.eval_data_loader
    if loader is None:
        raise RuntimeError("evaluate() needs build_eval_data_loader() to return a DataLoader")
    model = trainer.model
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=trainer.device)
    try:
        for valid, batch in loader:
            batch = send_to_device(batch, trainer.device)
            n_valid = int(valid.sum())
            if 0 < n_valid < valid.shape[0]:
                batch = _select(batch, valid)
            with trainer._autocast():
                values = trainer.evaluation_step(batch)
            for key, value in flatten_dict(values).items():
                value = torch.as_tensor(value, dtype=torch.float64, device=trainer.device)
                sums[key] = sums.get(key, 0) + value * n_valid  # a batch of padding weighs 0
            count += n_valid
    finally:
        model.train(was_training)
    keys = sorted(sums)
    flat = torch.stack([sums[k] for k in keys] + [count])
    if trainer.accelerator.num_processes > 1:
        torch.distributed.all_reduce(flat)
    totals = flat.tolist()
    return {k: v / totals[-1] for k, v in zip(keys, totals[:-1], strict=True)}


class EvaluationHook(BaseHook):
    """Run ``trainer.evaluate()`` every ``interval`` steps (and after the last step) and log it.

    The metrics are logged under ``eval/`` (so ``CheckpointingHook(metric="eval/loss")`` and
    early stopping can use them), kept in ``hook.history`` and printed on the main process.
    Every rank must run this hook.

    Example:
        >>> EvaluationHook(interval=200)
    """

    def __init__(self, interval: int = 1000, at_end: bool = True, prefix: str = "eval"):
        if interval < 1:
            raise ValueError(f"EvaluationHook interval must be >= 1, got {interval}")
        self.interval, self.at_end, self.prefix = interval, at_end, prefix
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last: dict[str, float] | None = None

    def on_after_step(self, trainer: BaseTrainer) -> None:
        last = trainer.step == trainer.max_steps and self.at_end
        if trainer.step % self.interval == 0 or last:
            self.run(trainer)

    def run(self, trainer: BaseTrainer) -> dict[str, float]:
        metrics = trainer.evaluate()
        self.last = metrics
        self.history.append((trainer.step, metrics))
        trainer.step_info[self.prefix] = metrics
        trainer.log({self.prefix: metrics}, dry_run=not trainer.is_main_process)
        if trainer.is_main_process:
            shown = " ".join(f"{k} {to_float(v):.4f}" for k, v in metrics.items())
            print(f"Eval  {trainer.step}/{trainer.max_steps}: {shown}", flush=True)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[step, metrics] for step, metrics in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), dict(metrics)) for step, metrics in state.get("history", [])]
        self.last = self.history[-1][1] if self.history else None
