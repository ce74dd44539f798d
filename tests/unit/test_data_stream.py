"""DataStream: resumable order, iterable data resumed by reading, changed batch size, O(1) skipping."""

from __future__ import annotations

import logging

import pytest
import torch

from acceltrain.data_stream import DataPositionError
from tests.helpers import ToyTrainer, regression_data


class IndexTrainer(ToyTrainer):
    """Records the sample indices it trains on."""

    def __init__(self, *, shuffle=True, iterable=False, **kw):
        super().__init__(**kw)
        self.shuffle, self.iterable, self.seen = shuffle, iterable, []

    def build_data_loader(self):
        ds = regression_data(self.n)
        indexed = torch.utils.data.TensorDataset(*ds.tensors, torch.arange(self.n))
        if self.iterable:
            class Stream(torch.utils.data.IterableDataset):
                def __iter__(self):
                    return iter(indexed)

            return torch.utils.data.DataLoader(Stream(), batch_size=self.batch_size)
        return torch.utils.data.DataLoader(indexed, batch_size=self.batch_size, shuffle=self.shuffle,
                                           generator=torch.Generator().manual_seed(5))

    def forward(self, input):
        x, y, idx = input
        self.seen.extend(idx.tolist())
        return super().forward((x, y))


def _resume_at(k: int, total: int, **kw) -> tuple[list[int], list[int]]:
    full = IndexTrainer(max_steps=total, device="cpu", **kw)
    full.train()
    first = IndexTrainer(max_steps=k, device="cpu", **kw)
    first.train()
    second = IndexTrainer(max_steps=total, device="cpu", **kw)
    second.load_state_dict(first.state_dict())
    second.train()
    return full.seen, first.seen + second.seen


def test_shuffled_order_continues_across_epochs():
    full, resumed = _resume_at(k=11, total=20, n=64, batch_size=4)  # 16 batches per epoch
    assert resumed == full
    assert sorted(full[:64]) == list(range(64)) and full[:64] != list(range(64))  # shuffled, complete
    assert full[64:80] != full[:16]  # a new order in epoch 2


def test_iterable_dataset_resumes_by_reading_with_a_message(caplog):
    with caplog.at_level(logging.WARNING, logger="acceltrain"):
        full, resumed = _resume_at(k=5, total=9, n=32, batch_size=4, iterable=True)
    assert resumed == full
    assert "reading and dropping 5 consumed batches of epoch 0" in caplog.text


def test_changed_batch_size_continues_at_the_same_sample():
    first = IndexTrainer(max_steps=3, batch_size=4, n=64, device="cpu")
    first.train()
    reference = IndexTrainer(max_steps=16, batch_size=4, n=64, device="cpu")
    reference.train()
    second = IndexTrainer(max_steps=5, batch_size=8, n=64, device="cpu")
    second.load_state_dict(first.state_dict())
    second.train()
    assert second.seen == reference.seen[12:28]  # 2 more steps of 8, from sample 12 on


def test_different_dataset_size_is_refused():
    first = IndexTrainer(max_steps=2, n=64, device="cpu")
    first.train()
    other = IndexTrainer(max_steps=4, n=48, device="cpu")
    with pytest.raises(DataPositionError, match="dataset_len was 64, this run has 48"):
        other.load_state_dict(first.state_dict())
        other.train()


def test_skipping_is_independent_of_the_position():
    """Resuming deep into an epoch reads no skipped sample and builds the order once."""
    calls = []

    class Counting(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            calls.append(i)
            return super().__getitem__(i)

    class Big(IndexTrainer):
        def build_data_loader(self):
            ds = Counting(torch.randn(100_000, 8), torch.randn(100_000, 1), torch.arange(100_000))
            return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)

    first = Big(max_steps=1, device="cpu")
    first.train()
    state = first.state_dict()
    state["data"]["samples_in_epoch"] = 90_000
    from acceltrain.data_stream import fingerprint

    order = first.data.position.sampler.epoch_order(0)
    state["data"]["next_fingerprint"] = fingerprint(order[90_000:90_004].tolist())
    calls.clear()
    second = Big(max_steps=2, device="cpu")
    second.load_state_dict(state)
    second.train()
    assert calls == order[90_000:90_004].tolist()  # only the next batch was read


def test_unseeded_process_gets_a_working_agreed_seed():
    """Without seeding, torch's initial seed is a random 64-bit number: it must still work."""
    seed = torch.seed()
    assert seed > 2**40  # (almost surely) a big one

    class Unseeded(IndexTrainer):
        def build_data_loader(self):
            loader = super().build_data_loader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=self.batch_size, shuffle=True)

        def build_model(self):
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    t = Unseeded(max_steps=20, n=64, batch_size=4, device="cpu")  # crosses an epoch boundary
    t.train()
    assert t.data.position.seed == seed % 2**62
    assert sorted(t.seen[:64]) == list(range(64))


def test_resume_after_a_short_last_batch():
    """10 samples, batch 4, drop_last=False: the position must not run past the epoch."""

    class Short(IndexTrainer):
        def build_data_loader(self):
            ds = torch.utils.data.TensorDataset(*regression_data(10).tensors, torch.arange(10))
            return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))

    full = Short(max_steps=6, device="cpu")
    full.train()
    first = Short(max_steps=3, device="cpu")
    first.train()
    second = Short(max_steps=6, device="cpu")
    second.load_state_dict(first.state_dict())
    second.train()
    assert first.seen + second.seen == full.seen
