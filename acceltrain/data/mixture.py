"""Weighted mixtures of sharded corpora as one map-style dataset of ``seq_len`` windows.

Each source's windows are non-overlapping ``seq_len`` runs of tokens inside one shard (a window
never spans two shards; a shard's trailing ``num_tokens % seq_len`` tokens belong to no window).
A source's windows are numbered across its shards in order, and its **last**
``max(1, round(n * val_fraction))`` windows are held out for validation: the training index
below never contains them, so validation never sees a window training can draw.

The training set is an index of ``num_windows`` entries (default: every training window of
every source, once), built once from the seed with numpy and held as two arrays:

- source ``s`` gets ``round(weight_s * num_windows)`` entries (largest remainder, so the counts
  sum exactly), which sets the realised proportions to the weights up to ``1 / num_windows``;
- **the rule for a source that runs out**: a source whose share is more than its windows is
  recycled, each of its windows used ``share // n`` times, plus a seeded random subset for the
  remainder; a source whose share is less uses a seeded random subset of its windows. Nothing
  depends on which source is read first or how fast;
- the entries are interleaved by a seeded permutation.

Because it is a plain map-style dataset of fixed length, the trainer's ``ResumableSampler``
shuffles it per epoch, shards it across ranks and resumes it in O(1) and bit-exactly: resuming
reads only the windows after the checkpoint (see ``reads`` below), whatever the step.

With one source of weight 1, entry ``i`` is training window ``i``: the same dataset, window for
window, as :class:`~acceltrain.data.PackedTokens` over one packed file.

Example:
    >>> train, val = build_mixture([code, prose], weights=[0.7, 0.3], seq_len=512, seed=0)
    >>> train.proportions()      # realised shares of the index, by source
    [0.7, 0.3]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .shards import ShardedCorpus
from .text import DataError

__all__ = ["MixtureDataset", "SourceWindows", "build_mixture"]

logger = logging.getLogger("acceltrain")


class SourceWindows:
    """The window grid of one sharded corpus: window number -> (shard, token offset)."""

    def __init__(self, corpus: ShardedCorpus, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.corpus = corpus
        self.seq_len = seq_len
        per_shard = np.array([s.num_tokens // seq_len for s in corpus.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])  # (num_shards + 1,)
        self.num_windows = int(self.starts[-1])

    def locate(self, window: int) -> tuple[int, int]:
        """``(shard, first token)`` of window ``window``."""
        shard = int(np.searchsorted(self.starts, window, side="right")) - 1
        return shard, (window - int(self.starts[shard])) * self.seq_len


class MixtureDataset(Dataset):
    """Windows drawn from several sources by an index fixed at construction.

    Item ``i`` is ``{"input_ids": x, "labels": x}`` with ``x`` a ``(seq_len,)`` int64 tensor, read
    from the memory-mapped shard (opened lazily per process, left out of the pickle so DataLoader
    workers share the page cache).

    Args:
        sources: The window grids, one per source.
        names: A name per source, for logs.
        source_index: ``(N,)`` source of each entry.
        window_index: ``(N,)`` source-local window of each entry.
    """

    def __init__(self, *, sources: Sequence[SourceWindows], names: Sequence[str], source_index: np.ndarray,
                 window_index: np.ndarray) -> None:
        if len(source_index) != len(window_index):
            raise ValueError("source_index and window_index differ in length")
        self.sources = list(sources)
        self.names = list(names)
        self.source_index = source_index
        self.window_index = window_index
        self.seq_len = self.sources[0].seq_len if self.sources else 0
        self.reads = 0  # windows read by this process: what a resume costs is counted, not timed
        self._maps: dict[tuple[int, int], np.memmap] = {}

    def __len__(self) -> int:
        return len(self.source_index)

    def source_of(self, index: int) -> int:
        """The source number of item ``index``."""
        return int(self.source_index[index])

    def token_range(self, index: int) -> tuple[int, int, int, int]:
        """``(source, shard, start, stop)``: where item ``index`` reads its tokens."""
        s = int(self.source_index[index])
        shard, start = self.sources[s].locate(int(self.window_index[index]))
        return s, shard, start, start + self.seq_len

    def counts(self) -> list[int]:
        """Entries per source."""
        return np.bincount(self.source_index, minlength=len(self.sources)).tolist()

    def proportions(self) -> list[float]:
        """The realised share of each source in the index."""
        n = max(1, len(self))
        return [c / n for c in self.counts()]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, shard, start, stop = self.token_range(index)
        tokens = self._maps.get((s, shard))
        if tokens is None:
            tokens = self._maps[(s, shard)] = self.sources[s].corpus.tokens(shard)
        self.reads += 1
        x = torch.from_numpy(tokens[start:stop].astype(np.int64))  # (T,)
        return {"input_ids": x, "labels": x.clone()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # a memmap in a pickle would copy the file
        return state


def _shares(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder: they sum to it)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - int(shares.sum())]] += 1
    return shares


def _draw(rng: np.random.Generator, available: int, share: int) -> np.ndarray:
    """``share`` source-local window numbers out of ``available``: full passes, then a random subset."""
    passes, rest = divmod(share, available)
    full = np.tile(np.arange(available, dtype=np.int64), passes)
    if rest == 0:
        return full
    subset = np.sort(rng.choice(available, size=rest, replace=False))
    return np.concatenate([full, subset])


def build_mixture(
    corpora: Sequence[ShardedCorpus],
    *,
    seq_len: int,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.01,
    eval_corpus: ShardedCorpus | None = None,
    num_windows: int | None = None,
) -> tuple[MixtureDataset, MixtureDataset]:
    """The training mixture and the held-out set of a list of sharded corpora.

    Args:
        corpora: One sharded corpus per source.
        seq_len: Tokens per window.
        weights: Relative weights, > 0 (default: equal).
        names: Names for logs (default ``source0``, ``source1``...).
        seed: Fixes the index (which windows are recycled or subsampled, and the interleaving).
        val_fraction: Windows held out at the end of every source, in ``(0, 1)``; ignored with
            ``eval_corpus``.
        eval_corpus: A named validation source: every one of its windows is the validation set
            and every window of ``corpora`` is trainable.
        num_windows: Entries in the training index (default: the training windows of all sources).

    Returns:
        ``(train, validation)``; validation holds each held-out window once, source by source.

    Raises:
        DataError: A weight that is not > 0, or a source with too few windows to split.
    """
    if not corpora:
        raise DataError("a mixture needs at least one source")
    weights = [1.0] * len(corpora) if weights is None else list(weights)
    names = [f"source{i}" for i in range(len(corpora))] if names is None else list(names)
    if len(weights) != len(corpora) or len(names) != len(corpora):
        raise ValueError("weights and names need one entry per corpus")
    for name, w in zip(names, weights, strict=True):
        if not w > 0:
            raise DataError(f"--dataset: weight of {name!r} must be > 0, got {w}")
    if eval_corpus is None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    grids = [SourceWindows(c, seq_len) for c in corpora]
    trainable, held = [], []
    for name, grid in zip(names, grids, strict=True):
        n = grid.num_windows
        if eval_corpus is not None:
            if n < 1:
                raise DataError(f"{name}: {grid.corpus.num_tokens} tokens make no window of seq_len={seq_len}")
            trainable.append(n)
            continue
        if n < 2:
            raise DataError(f"{name}: {grid.corpus.num_tokens} tokens make {n} window(s) of seq_len={seq_len}; "
                            "a train/validation split needs at least 2")
        v = min(max(1, round(n * val_fraction)), n - 1)
        trainable.append(n - v)
        held.append(np.arange(n - v, n, dtype=np.int64))
    total = sum(trainable) if num_windows is None else num_windows
    if total < 1:
        raise ValueError(f"num_windows must be >= 1, got {total}")
    rng = np.random.default_rng(seed)
    shares = _shares(weights, total)
    windows = [_draw(rng, n, int(k)) for n, k in zip(trainable, shares, strict=True)]
    src = np.repeat(np.arange(len(grids), dtype=np.int16), shares)
    win = np.concatenate(windows)
    if len(grids) > 1:  # one source keeps window order: entry i is window i (the sampler shuffles)
        perm = rng.permutation(total)
        src, win = src[perm], win[perm]
    train = MixtureDataset(sources=grids, names=names, source_index=src, window_index=win)
    for name, n, k in zip(names, trainable, shares, strict=True):
        logger.info("mixture: %s %.4f of %d windows (%d entries, %.2f passes over its %d training windows)",
                    name, k / total, total, k, k / n, n)
    if eval_corpus is not None:
        grid = SourceWindows(eval_corpus, seq_len)
        if grid.num_windows < 1:
            raise DataError(f"evaluation source: {eval_corpus.num_tokens} tokens make no window of seq_len={seq_len}")
        val = MixtureDataset(sources=[grid], names=["eval"], source_index=np.zeros(grid.num_windows, np.int16),
                             window_index=np.arange(grid.num_windows, dtype=np.int64))
    else:
        val = MixtureDataset(sources=grids, names=names,
                             source_index=np.concatenate([np.full(len(h), i, np.int16) for i, h in enumerate(held)]),
                             window_index=np.concatenate(held))
    return train, val
