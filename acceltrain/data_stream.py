"""The trainer's walk over its data: epochs, device placement, and a position that resumes exactly.

A user's map-style ``DataLoader`` (sequential or shuffled) is rebuilt around a
:class:`~acceltrain.data.sampler.ResumableSampler`: same dataset, batch size, collate_fn and
workers, but the order is a seeded permutation per epoch, sharded by rank. Its state is counted
in samples, so resuming at step 10,000 costs what resuming at step 10 does: the epoch's order
is computed once and sliced, and no skipped sample is read. The loader gets its own generator,
re-seeded every epoch, so creating an iterator (which draws the workers' base seed) never
touches the global RNG that dropout uses. Randomness *inside* DataLoader workers (random
augmentations in ``__getitem__``) is not restored mid-epoch: seed it from the sample index for
exact resume.

Anything else (iterable datasets, custom samplers, plain iterables) is resumed by reading and
dropping the consumed batches, with a progress message.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
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
        self.global_start = 0  # samples of the epoch all ranks consumed before this pass (a resize)
        self.samples_in_epoch = 0  # this rank's, consumed by the trainer (not prefetched by workers)
        self._check: str | None = None

    def start_epoch(self, epoch: int, start: int = 0, *, global_start: int = 0) -> None:
        """Begin ``epoch`` after this rank's first ``start`` samples, or (a resized resume) after
        the first ``global_start`` samples of the epoch's order counted over all ranks."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        if global_start:
            self.sampler.set_global_start(global_start)
            # set_global_start takes the per-rank path when the position divides evenly.
            self.global_start = self.sampler._global_start
            self.samples_in_epoch = self.sampler._start
        else:
            self.sampler.set_start(start)
            self.global_start, self.samples_in_epoch = 0, start
        # The workers' base seed comes from this generator: the same for an epoch however it began.
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    def consumed(self, batch_size: int) -> None:
        # A short last batch (drop_last=False) must not push the position past the epoch's end.
        self.samples_in_epoch = min(self.samples_in_epoch + batch_size, self.sampler.pass_length())

    @property
    def global_samples(self) -> int:
        """Samples of the current epoch's order that all ranks together have consumed."""
        return self.global_start + self.samples_in_epoch * self.sampler.num_replicas

    def next_indices(self) -> list[int]:
        order = self.sampler.order_from(self.epoch, self.global_start)
        return order[self.samples_in_epoch: self.samples_in_epoch + self.batch_size].tolist()

    def _global_fingerprint(self, start: int, count: int) -> str:
        """Of the epoch's global order from ``start``: what the next ``count`` samples of all ranks are."""
        one = ResumableSampler(self.sampler.dataset_len, shuffle=self.sampler.shuffle, seed=self.seed,
                               drop_last=self.sampler.drop_last)
        return fingerprint(one.order_from(self.epoch, start)[:count].tolist() if start else
                           one.epoch_order(self.epoch)[:count].tolist())

    def state_dict(self) -> dict[str, Any]:
        world = self.sampler.num_replicas
        return {
            "epoch": self.epoch,
            # Per rank, for a resume on the same number of processes (-1 after a resize: use the global one).
            "samples_in_epoch": self.samples_in_epoch if not self.global_start else -1,
            # The global position: what a resume on any number of processes continues from.
            "global_samples_in_epoch": self.global_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_replicas": world,
            "dataset_len": self.sampler.dataset_len,
            "shuffle": self.sampler.shuffle,
            "drop_last": self.sampler.drop_last,
            "next_fingerprint": fingerprint(self.next_indices()),
            "next_global_fingerprint": self._global_fingerprint(self.global_samples, self.batch_size * world),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        world = self.sampler.num_replicas
        if state["dataset_len"] != self.sampler.dataset_len:
            raise DataPositionError(
                f"checkpoint data position: dataset_len was {state['dataset_len']}, this run has "
                f"{self.sampler.dataset_len}; resume with the same data")
        resized = state["num_replicas"] != world or state.get("samples_in_epoch", 0) < 0
        if resized and "global_samples_in_epoch" not in state:
            raise DataPositionError(
                f"checkpoint data position: num_replicas was {state['num_replicas']}, this run has {world}, "
                "and the checkpoint predates global data positions; resume with the same number of processes")
        if state["batch_size"] != self.batch_size:
            logger.warning("batch size changed from %d to %d: resuming at sample %d of epoch %d",
                           state["batch_size"], self.batch_size,
                           state.get("global_samples_in_epoch", state["samples_in_epoch"]), state["epoch"])
        self.seed = int(state["seed"])
        self.sampler.seed = self.seed
        if resized:
            self.start_epoch(int(state["epoch"]), global_start=int(state["global_samples_in_epoch"]))
            expected = state.get("next_global_fingerprint")
            got = self._global_fingerprint(int(state["global_samples_in_epoch"]),
                                           state["batch_size"] * state["num_replicas"])
            self._self_check(got, expected, strict)
            return
        self.start_epoch(int(state["epoch"]), int(state["samples_in_epoch"]))
        expected = state.get("next_fingerprint")
        # The saved next batch, in the saved batch size, must be what this run draws next.
        order = self.sampler.epoch_order(self.epoch)
        start = self.samples_in_epoch
        got = fingerprint(order[start: start + state["batch_size"]].tolist())
        self._self_check(got, expected, strict)

    def _self_check(self, got: str, expected: str | None, strict: bool) -> None:
        if expected is not None and got != expected:
            message = (f"resume self-check failed: the next batch's sample indices differ from the "
                       f"checkpoint's (fingerprint {got} != {expected}); the data or its order changed")
            if strict:
                raise DataPositionError(message)
            logger.warning(message)


class _Exhausted:
    """Marker: a one-shot data iterable has no more batches."""


EXHAUSTED = _Exhausted()


class DataStream:
    """Endless batches from the user's data, one epoch after another, that can be resumed.

    Args:
        data: What ``build_data_loader()`` returned.
        accelerator: Prepares (shards, places) loaders the trainer cannot make resumable.
        data_seed: Order seed; default the loader's generator seed, else rank 0's
            ``torch.initial_seed()`` (so ``seed_everything`` decides it, as in plain PyTorch).
    """

    def __init__(self, data: Iterable, accelerator: Accelerator, data_seed: int | None = None):
        self.accelerator = accelerator
        self.position: DataPosition | None = None
        if can_rebuild(data):
            # The trainer owns the order (seeded, sharded, resumable), so Accelerate must not
            # shard it again; batches are moved to the device here instead.
            self.position = DataPosition(data, num_replicas=accelerator.num_processes,
                                         rank=accelerator.process_index, seed=self._agree_seed(data, data_seed))
            self.position.start_epoch(0)
            data = self.position.loader
        elif isinstance(data, DataLoader):
            data = accelerator.prepare(data)
        self.loader = data
        # A DataLoader yields host tensors: on a CPU device there is nothing to move. Accelerate's
        # prepared loaders move their own batches; plain iterables (generators, lists) are moved here.
        self._move = accelerator.device.type != "cpu"
        self._move_plain = self._move and self.position is None and not isinstance(data, DataLoader)
        self.epoch = 0
        self.batches_drawn = 0
        self.batches_in_epoch = 0
        self.exhausted = False
        self._iter: Iterator | None = None
        self._skip = 0

    def _agree_seed(self, loader: DataLoader, data_seed: int | None) -> int:
        if data_seed is not None:
            return int(data_seed)
        if loader.generator is not None:
            return int(loader.generator.initial_seed())
        seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.broadcast(seed, src=0)
        return int(seed.item())

    def next(self) -> Any:
        """The next batch (on the device), or ``EXHAUSTED`` when a one-shot iterable runs dry."""
        if self._iter is None:
            self._iter = iter(self.loader)
            if self._skip:
                self._skip_consumed()
        try:
            batch = next(self._iter)
        except StopIteration:
            if isinstance(self.loader, Iterator):  # a one-shot iterator cannot start another epoch
                self.exhausted = True
                return EXHAUSTED
            self._new_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                raise RuntimeError("build_data_loader() returned an iterable with no batches") from None
        self.batches_drawn += 1
        self.batches_in_epoch += 1
        if self.position is not None:
            self.position.consumed(self.position.batch_size)
            if self._move:
                batch = send_to_device(batch, self.accelerator.device, non_blocking=self.position.loader.pin_memory)
        elif self._move_plain:
            batch = send_to_device(batch, self.accelerator.device)
        return batch

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0
        if self.position is not None:
            self.position.start_epoch(self.epoch)
        elif hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iter = iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        if self.position is not None:
            return self.position.state_dict()
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, Any] | None, *, strict: bool = True) -> None:
        self._iter = None
        if not state:
            return
        self.epoch = int(state["epoch"])
        if self.position is not None and "samples_in_epoch" in state:
            self.position.load_state_dict(state, strict=strict)
            per_rank = self.position.global_samples // self.position.sampler.num_replicas
            self.batches_in_epoch = per_rank // max(1, self.position.batch_size)
            return
        # Iterable data or a custom sampler: the consumed batches must be read again and dropped.
        self.batches_in_epoch = 0
        self._skip = int(state.get("batches_in_epoch", 0))
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)

    def _skip_consumed(self) -> None:
        n, self._skip = self._skip, 0
        if self.accelerator.is_main_process:
            logger.warning("resume: reading and dropping %d consumed batches of epoch %d "
                           "(an iterable or custom-sampled loader cannot seek)", n, self.epoch)
        for i in range(n):
            try:
                next(self._iter)
            except StopIteration:
                raise DataPositionError(f"resume: the data has only {i} of the {n} batches consumed before") from None
        self.batches_in_epoch = n
