"""Evaluation over the exact evaluation set across ranks (the hook that runs it during training
is :class:`acceltrain.hooks.EvaluationHook`).

Every rank gets ``ceil(N / world)`` samples: its share of the set, then, if the set does not
divide evenly, padding samples marked invalid. All ranks therefore run the same number of
forward passes (FSDP and DDP need that: their forwards are collective), and the padding is
masked out of every metric, so the result equals the single-process one exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, Sampler

from .accelerator_setup import max_over_ranks
from .utils import flatten_dict, map_nested_tensor

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = ["EvalProgress", "EvaluationInterrupted", "shard_eval_loader", "evaluate", "evaluate_resumable", "continuing"]


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


@dataclass
class EvalProgress:
    """How far an interrupted evaluation got: the training step it belongs to, the batches of
    this rank's share already done, and the running (sample-weighted) sums over them."""

    step: int
    batches: int
    sums: dict[str, torch.Tensor]
    count: torch.Tensor

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain values only: the checkpoint stores hook states without pickle.
        return {"step": self.step, "batches": self.batches, "sums": dict(self.sums), "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EvalProgress:
        return cls(int(state["step"]), int(state["batches"]), dict(state["sums"]), state["count"])


def _from_batch(loader: DataLoader, start: int) -> DataLoader:
    """``loader`` without its first ``start`` batches, which are never read (only the sampler's
    indices are sliced); the same batches as ``loader``'s from there on."""
    if start == 0:
        return loader
    indices = list(loader.sampler)[start * (loader.batch_size or 1):]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _stop_requested(trainer: BaseTrainer, before: bool) -> bool:
    """Did a stop (a signal) arrive since the evaluation began? Agreed by every rank (one small
    all-reduce per evaluation batch when distributed), so all of them stop after the same batch."""
    now = bool(trainer.should_stop or trainer.stop_requested) and not before
    return bool(max_over_ranks(int(now), trainer.device)) if trainer.accelerator.num_processes > 1 else now


@torch.no_grad()
def evaluate_resumable(trainer: BaseTrainer, progress: EvalProgress | None = None, *,
                       interruptible: bool = False) -> tuple[dict[str, float] | None, EvalProgress]:
    """Like :func:`evaluate`, continuing ``progress`` and, with ``interruptible``, stopping after
    the batch in which a stop request (a signal) arrives.

    Returns ``(metrics, progress)``; ``metrics`` is None when interrupted, and ``progress``
    then says where to continue. A continued evaluation adds the same batches to the same
    float64 sums in the same order, so its metrics equal an uninterrupted one's bitwise.
    """
    loader = trainer.eval_data_loader
    if loader is None:
        raise RuntimeError("evaluate() needs build_eval_data_loader() to return a DataLoader")
    if progress is None:
        progress = EvalProgress(trainer.step, 0, {}, torch.zeros((), dtype=torch.float64, device=trainer.device))
    sums = {k: v.to(trainer.device) for k, v in progress.sums.items()}
    count = progress.count.to(trainer.device).clone()
    stopped_before = bool(trainer.should_stop or trainer.stop_requested)
    model = trainer.model
    was_training = model.training
    model.eval()
    done = progress.batches
    try:
        for valid, batch in _from_batch(loader, progress.batches):
            trainer.eval_batch_idx = done  # which batch of this rank's share (validation_step's batch_idx)
            batch = send_to_device(batch, trainer.device)
            n_valid = int(valid.sum())
            if 0 < n_valid < valid.shape[0]:
                batch = _select(batch, valid)
            with trainer.autocast():
                values = trainer.evaluation_step(batch)
            for key, value in flatten_dict(values).items():
                value = torch.as_tensor(value, dtype=torch.float64, device=trainer.device)
                sums[key] = sums.get(key, 0) + value * n_valid  # a batch of padding weighs 0
            count += n_valid
            done += 1
            if interruptible and _stop_requested(trainer, stopped_before):
                # Every rank agreed: all stop after this step (a signal sets only its own rank's
                # flag), so the checkpoint is of this step, whose evaluation it holds.
                trainer.request_stop(trainer.stop_reason or "stop requested during evaluation")
                if done < len(loader):
                    return None, EvalProgress(progress.step, done, sums, count)
                break  # that was the last batch: the evaluation is complete anyway
    finally:
        model.train(was_training)
    keys = sorted(sums)
    flat = torch.stack([sums[k] for k in keys] + [count])
    if trainer.accelerator.num_processes > 1:
        torch.distributed.all_reduce(flat)
    totals = flat.tolist()
    metrics = {k: v / totals[-1] for k, v in zip(keys, totals[:-1], strict=True)}
    return metrics, EvalProgress(progress.step, done, sums, count)


class EvaluationInterrupted(BaseException):
    """Raised through ``trainer.evaluate()`` (and any override of it that calls ``super()``) when
    a stop request ended an interruptible evaluation; ``EvaluationHook`` catches it. A
    BaseException, so an ``except Exception`` in user code does not swallow it."""

    def __init__(self, progress: EvalProgress):
        super().__init__(f"evaluation interrupted after batch {progress.batches}")
        self.progress = progress


# What `trainer.evaluate()` (which takes no arguments: recipes override it) is to continue from,
# set around the call by EvaluationHook: (progress or None, interruptible).
_CONTINUING: contextvars.ContextVar[tuple[EvalProgress | None, bool]] = contextvars.ContextVar(
    "acceltrain_eval_continuing", default=(None, False))


@contextlib.contextmanager
def continuing(progress: EvalProgress | None, *, interruptible: bool) -> Iterator[None]:
    """Within this block, :func:`evaluate` continues ``progress`` (None: from the start) and, with
    ``interruptible``, stops after the batch in which a stop request arrives."""
    token = _CONTINUING.set((progress, interruptible))
    try:
        yield
    finally:
        _CONTINUING.reset(token)


def evaluate(trainer: BaseTrainer) -> dict[str, float]:
    """Average ``trainer.evaluation_step`` over the evaluation set, weighted by samples.

    Sums and sample counts are all-reduced, so every rank returns the same numbers. Inside
    :func:`continuing` (as ``EvaluationHook`` calls it), it continues the hook's interrupted
    evaluation and may itself be interrupted (:class:`EvaluationInterrupted`).
    """
    progress, interruptible = _CONTINUING.get()
    metrics, state = evaluate_resumable(trainer, progress, interruptible=interruptible)
    if metrics is None:
        raise EvaluationInterrupted(state)
    return metrics


def __getattr__(name: str) -> Any:
    # The hook moved to acceltrain.hooks.evaluation; importing it here eagerly would be circular.
    if name == "EvaluationHook":
        from .hooks.evaluation import EvaluationHook

        return EvaluationHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
