"""A deterministic, rank-sharded sampler that resumes mid-epoch without replaying the skipped data.

Example:
    >>> sampler = ResumableSampler(len(dataset), num_replicas=world_size, rank=rank, seed=1234)
    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    >>> # on resume, after loading the saved state: the next batch is the one the crashed run
    >>> # would have drawn, and the skipped part of the epoch is never read
    >>> sampler.load_state_dict(saved)
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]

logger = logging.getLogger("acceltrain")


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation, sharded across ranks, resumable at any sample in O(1) of the offset.

    Each epoch's order is ``torch.randperm(dataset_len)`` from a generator seeded with
    ``seed + epoch`` (``arange`` when ``shuffle=False``). Like ``DistributedSampler``, the order is
    truncated (``drop_last=True``) or padded by wrapping around (``drop_last=False``) to a
    multiple of ``num_replicas``, and rank ``r`` takes ``order[r::num_replicas]``. Every rank
    computes the same permutation, so the shards are disjoint and cover the epoch.

    Resuming: ``set_start(k)`` (or ``load_state_dict``) makes the next pass yield this rank's
    epoch order from position ``k`` on. The position is also kept as a *global* one, samples of
    the epoch's order consumed by all ranks together (``k * num_replicas``): ``set_global_start(g)``
    continues the epoch's order from global sample ``g`` on any number of ranks, rank ``r`` taking
    ``order[g + r :: num_replicas]``, so the union of what W' ranks draw next is what the W ranks
    that saved the position would have drawn. The rest of that epoch is truncated (or padded) to
    a multiple of the new ``num_replicas``; with the same ``num_replicas`` it is exactly the order
    ``set_start`` gives. The permutation is computed once and sliced, so resuming
    at sample 10 or 10 million costs the same and touches none of the skipped samples.

    When a pass runs to the end, the sampler moves to the next epoch by itself (offset 0), so a
    plain ``DataLoader``, which has no ``set_epoch``, still gets a new order every epoch.
    ``set_epoch(e)`` with the current epoch keeps the offset (Accelerate's prepared loaders call
    it at the start of every pass); with another epoch it resets the offset to 0.

    Use it as ``DataLoader(dataset, batch_size=..., sampler=ResumableSampler(...))``. Note that
    ``accelerator.prepare(loader)`` shards batches across processes itself: give a prepared
    loader ``num_replicas=1, rank=0`` and count offsets in global samples, or shard here with
    ``num_replicas=world_size`` and do not let Accelerate prepare the loader. ``BaseTrainer``
    does the latter for you: a plain map-style ``DataLoader`` (``shuffle=True`` or not) returned
    by ``build_data_loader`` is rebuilt around this sampler (see ``acceltrain/data_stream.py``),
    so trainer users pass no sampler at all.

    Args:
        dataset_len: Number of samples in the dataset.
        num_replicas: Number of ranks sharing the epoch.
        rank: This rank, in ``[0, num_replicas)``.
        shuffle: Permute each epoch (``False``: dataset order).
        seed: Base seed; epoch ``e`` uses ``seed + e``. Must be equal on every rank.
        drop_last: Drop the tail that does not divide evenly among ranks (``False``: pad it by
            repeating samples from the start of the order).
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(
                f"dataset_len={dataset_len} < num_replicas={num_replicas} with drop_last=True: every rank would get nothing"
            )
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        # Samples per rank per epoch.
        self.num_samples = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self._start = 0  # where the next pass begins in this rank's epoch order
        self._global_start = 0  # samples of the epoch consumed by all ranks before this pass's order
        self._position = 0  # indices handed out in this epoch so far (start included)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's full index order for ``epoch``, as a ``(num_samples,)`` int64 tensor."""
        n = self.dataset_len
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.total_size > n:  # pad by wrapping around, possibly more than once
            order = torch.cat(
                [order, order.repeat(math.ceil((self.total_size - n) / n))[: self.total_size - n]]
            )
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def order_from(self, epoch: int, global_start: int) -> torch.Tensor:
        """This rank's order for the rest of ``epoch`` after its first ``global_start`` samples
        (counted over all ranks): ``order[g + rank :: num_replicas]``, truncated (``drop_last``)
        or padded by wrapping around to a multiple of ``num_replicas``. ``global_start=0`` gives
        :meth:`epoch_order`."""
        if global_start == 0:
            return self.epoch_order(epoch)
        n, w = self.dataset_len, self.num_replicas
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + epoch)
            base = torch.randperm(n, generator=gen)
        else:
            base = torch.arange(n)
        left = n - global_start
        length = max(0, (left // w if self.drop_last else -(-left // w)) * w)
        return base[torch.arange(global_start, global_start + length) % n][self.rank :: w]

    def pass_length(self) -> int:
        """Samples of this rank in the current pass's epoch order (from its global start)."""
        if self._global_start == 0:
            return self.num_samples
        left, w = self.dataset_len - self._global_start, self.num_replicas
        return max(0, (left // w if self.drop_last else -(-left // w)))

    def __iter__(self) -> Iterator[int]:
        start = self._start
        # slice: skipped indices never read
        remaining = self.order_from(self.epoch, self._global_start)[start:].tolist()
        it = iter(remaining)
        # The position is read off the list iterator when asked for (see _position): no Python
        # bookkeeping per index on the data path.
        self._pass = (start + len(remaining), it)
        yield from it
        # A complete pass: the next one is a new epoch.
        self._pass = None
        self.epoch += 1
        self._start = 0
        self._global_start = 0
        self._position = 0

    @property
    def _position(self) -> int:
        """Indices handed out in this epoch so far (start included)."""
        if self._pass is not None:
            end, it = self._pass
            return end - operator.length_hint(it)
        return self._offset

    @_position.setter
    def _position(self, value: int) -> None:
        self._pass = None
        self._offset = value

    def __len__(self) -> int:
        """Samples the next pass yields: ``num_samples`` minus the start offset."""
        return self.pass_length() - self._start

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order; a different epoch than the current one starts at offset 0."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._global_start = 0
        self._position = self._start

    def set_start(self, start: int) -> None:
        """Begin the next pass after the first ``start`` samples of this rank's epoch order.

        Args:
            start: Samples this rank already consumed in the current epoch (batches taken x
                batch size), in ``[0, num_samples]``.
        """
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self._global_start = 0
        self._start = start
        self._position = start

    def set_global_start(self, global_start: int) -> None:
        """Begin the next pass after the first ``global_start`` samples of the epoch's order,
        counted over all ranks (any ``num_replicas``: see the class docstring).

        Args:
            global_start: Samples all ranks together consumed in the current epoch, in
                ``[0, dataset_len]`` (up to the padded length with ``drop_last=False``).
        """
        if global_start < 0:  # past the end (a padded tail) is an empty rest of the epoch
            raise ValueError(f"global_start must be >= 0, got {global_start}")
        if global_start % self.num_replicas == 0 and global_start // self.num_replicas <= self.num_samples:
            self.set_start(global_start // self.num_replicas)  # the same order, through the plain path
            return
        self._global_start = global_start
        self._start = 0
        self._position = 0

    @property
    def global_position(self) -> int:
        """Samples of the current epoch's order handed out by all ranks together."""
        return self._global_start + self._position * self.num_replicas

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position to resume from.

        Args:
            consumed: Samples this rank has actually trained on in the current epoch. Without
                it, the offset is the number of indices this sampler has handed out, which is
                exact for a ``DataLoader`` with ``num_workers=0`` that is not prepared by
                Accelerate; worker prefetching and Accelerate's one-batch look-ahead draw ahead
                of training, so pass ``consumed`` (steps x batch size) in those cases.

        Returns:
            ``epoch``, ``offset`` and the settings that fix the order.
        """
        offset = self._position if consumed is None else consumed
        if not 0 <= offset <= self.pass_length():
            raise ValueError(f"consumed must be in [0, {self.pass_length()}], got {offset}")
        global_offset = self._global_start + offset * self.num_replicas
        if self._global_start:  # a resized pass: the per-rank offset has no same-size meaning
            offset = -1
        return {
            "epoch": self.epoch,
            "offset": offset,
            "global_offset": global_offset,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: same epoch order, next pass starts at ``offset``.

        A state saved by another number of ranks continues the same global order from its
        ``global_offset`` (see :meth:`set_global_start`).

        Raises:
            ValueError: The saved run had a different ``dataset_len``, ``shuffle`` or
                ``drop_last`` (or a different ``num_replicas`` and no global offset), so its
                order cannot be continued exactly.
        """
        resized = "global_offset" in state and state.get("num_replicas", self.num_replicas) != self.num_replicas
        for name in ("dataset_len", "shuffle", "drop_last") if resized else (
                "num_replicas", "dataset_len", "shuffle", "drop_last"):
            saved, current = state.get(name, getattr(self, name)), getattr(self, name)
            if saved != current:
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {name}={saved}, this run has "
                    f"{name}={current}; restart the epoch or run with the same {name}"
                )
        if "seed" in state and state["seed"] != self.seed:
            logger.info(
                "ResumableSampler: using the checkpoint's seed %s instead of %s", state["seed"], self.seed
            )
            self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        if resized or state.get("offset", 0) < 0:
            self.set_global_start(int(state["global_offset"]))
        else:
            self.set_start(int(state["offset"]))
