"""Where the trainer is in its data, so a resume continues with the very next sample.

A user's map-style ``DataLoader`` (sequential or shuffled) is rebuilt around a
:class:`~acceltrain.data.sampler.ResumableSampler`: same dataset, batch size, collate_fn and
workers, but the order is a seeded permutation per epoch, sharded by rank. Its state is counted
in samples, so resuming at step 10,000 costs what resuming at step 10 does: the epoch's order
is computed once and sliced, and no skipped sample is read. The loader gets its own generator,
re-seeded every epoch, so creating an iterator (which draws the workers' base seed) never
touches the global RNG that dropout uses.

Anything else (iterable datasets, custom samplers, plain iterables) is resumed by reading and
dropping the consumed batches, with a progress message.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

from .config import UserError
from .data.sampler import ResumableSampler

logger = logging.getLogger("acceltrain")

_LOADER_KEYS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                "multiprocessing_context", "persistent_workers", "pin_memory_device")


class DataPositionError(UserError):
    """The checkpoint's data position does not fit this run's data."""


def fingerprint(indices: list[int]) -> str:
    """A short hash of a list of sample indices."""
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]


def can_rebuild(loader: Any) -> bool:
    """A plain map-style DataLoader with a default sampler, which a ResumableSampler can replace."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        return False
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return not sampler.replacement and sampler._num_samples is None
    return type(sampler) is SequentialSampler


class DataPosition:
    """Owns the resumable loader and counts what the trainer consumed."""

    def __init__(self, loader: DataLoader, *, num_replicas: int, rank: int, seed: int):
        self.seed = seed
        self.batch_size = loader.batch_size
        self.sampler = ResumableSampler(
            len(loader.dataset), num_replicas=num_replicas, rank=rank,
            shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
        )
        self.generator = torch.Generator()
        kwargs = {k: getattr(loader, k) for k in _LOADER_KEYS if hasattr(loader, k)}
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        self.loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=self.sampler,
                                 generator=self.generator, **kwargs)
        self.epoch = 0
        self.samples_in_epoch = 0  # consumed by the trainer (not prefetched by workers)
        self._check: str | None = None

    def start_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.samples_in_epoch = start
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        # The workers' base seed comes from this generator: the same for an epoch however it began.
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def consumed(self, batch_size: int) -> None:
        self.samples_in_epoch += batch_size

    def next_indices(self) -> list[int]:
        order = self.sampler.epoch_order(self.epoch)
        return order[self.samples_in_epoch: self.samples_in_epoch + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_replicas": self.sampler.num_replicas,
            "dataset_len": self.sampler.dataset_len,
            "next_fingerprint": fingerprint(self.next_indices()),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        for key, mine in (("num_replicas", self.sampler.num_replicas), ("dataset_len", self.sampler.dataset_len)):
            if state[key] != mine:
                raise DataPositionError(
                    f"checkpoint data position: {key} was {state[key]}, this run has {mine}; "
                    "resume with the same data and number of processes"
                )
        if state["batch_size"] != self.batch_size:
            logger.warning("batch size changed from %d to %d: resuming at sample %d of epoch %d",
                           state["batch_size"], self.batch_size, state["samples_in_epoch"], state["epoch"])
        self.seed = int(state["seed"])
        self.sampler.seed = self.seed
        self.start_epoch(int(state["epoch"]), int(state["samples_in_epoch"]))
        expected = state.get("next_fingerprint")
        # The saved next batch, in the saved batch size, must be what this run draws next.
        order = self.sampler.epoch_order(self.epoch)
        start = self.samples_in_epoch
        got = fingerprint(order[start: start + state["batch_size"]].tolist())
        if expected is not None and got != expected:
            message = (f"resume self-check failed: the next batch's sample indices differ from the "
                       f"checkpoint's (fingerprint {got} != {expected}); the data or its order changed")
            if strict:
                raise DataPositionError(message)
            logger.warning(message)
