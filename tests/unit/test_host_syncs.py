"""Zero host reads on a quiet step: the finite flag stays on the device (found_inf), and what a
quiet step skipped is read, reported and bounded later. Counted on the CPU through the code path
a GPU runs: every way a tensor's value reaches the host is patched to count."""

from __future__ import annotations

import collections
import io
import traceback

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseHook, CudaMaxMemoryHook, LoggingHook, NonFiniteError, ProgressHook, ThroughputHook
from tests.helpers import ToyTrainer, params

# Every way a tensor's value reaches Python (on CUDA each is a device-to-host sync).
_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class ReadCounter:
    """Counts host reads per step; ``step`` is set by the Marker hook at each step's start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.step = 0
        self.reads: dict[int, list[str]] = collections.defaultdict(list)
        # Not Tensor.to: on the CPU every tensor is already on the host, so no .to() here can be
        # a device-to-host copy; on a GPU the check's set_sync_debug_mode catches those.
        for name in _READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _record(self, name: str) -> None:
        caller = traceback.extract_stack(limit=3)[0]
        self.reads[self.step].append(f"{name} at {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}")

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self._record(name)
            return original(tensor, *args, **kwargs)

        return wrapper


class Marker(BaseHook):
    def __init__(self, counter: ReadCounter):
        self.counter = counter

    def on_before_step(self, trainer):
        self.counter.step = trainer.step + 1


class FusedToy(ToyTrainer):
    """ToyTrainer with fused AdamW (found_inf on the device) and tensor records (no .item())."""

    def __init__(self, *, nan_at: set[int] = frozenset(), **kwargs):
        super().__init__(**kwargs)
        self.nan_at, self.seen = set(nan_at), 0

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, fused=True)

    def forward(self, input):
        x, y = input
        pred = self.model(x)
        loss = nn.functional.mse_loss(pred, y)
        if self.seen in self.nan_at:
            loss = loss * float("nan")
        self.seen += 1
        return loss, {"mae": (pred - y).abs().mean().detach()}


def _hooks(counter: ReadCounter) -> list[BaseHook]:
    return [Marker(counter), ThroughputHook(tokens_per_step=64, flops_per_token=100.0, peak_flops=1e9),
            CudaMaxMemoryHook(), ProgressHook(interval=4, bar=False, stream=io.StringIO()), LoggingHook(interval=4)]


def test_a_quiet_step_reads_nothing_and_a_logging_step_reads_three_times(monkeypatch, tmp_path):
    trainer = FusedToy(max_steps=8, gradient_accumulation_steps=2, batch_size=4, grad_clip=1.0, scheduler=True,
                       lr=0.01, device="cpu", workspace=tmp_path)
    counter = ReadCounter(monkeypatch)
    trainer.build_hooks = lambda: _hooks(counter)
    trainer.train()
    monkeypatch.undo()
    assert trainer.step == 8
    reads = {step: counter.reads.get(step, []) for step in range(1, 9)}
    # Step 1 starts the epoch: the loader draws its base seed and the sampler lists its shuffled
    # order, both host tensors by construction (no device involved).
    assert [r.split(" at ")[1].split(":")[0] for r in reads[1]] == ["dataloader.py", "sampler.py"], reads[1]
    for quiet in (2, 3, 5, 6, 7):
        assert reads[quiet] == [], f"step {quiet} read the device: {reads[quiet]}"
    for logging_step in (4, 8):
        # the trainer's flags (one stack, one read), LoggingHook's and ProgressHook's interval means
        where = sorted(r.split(" at ")[1].split(":")[0] for r in reads[logging_step])
        assert where == ["logging.py", "logging.py", "non_finite.py"], reads[logging_step]
        assert all(r.startswith("tolist") for r in reads[logging_step])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and list((tmp_path / "tensorboard").iterdir())


def test_without_fused_optimizer_or_with_defer_off_every_step_reads_once(monkeypatch):
    class Plain(FusedToy):  # SGD without fused=True: it cannot take a device flag
        def build_optimizer(self):
            return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    for trainer in (Plain(max_steps=4, device="cpu"), FusedToy(max_steps=4, device="cpu", defer_non_finite=False)):
        counter = ReadCounter(monkeypatch)
        trainer.build_hooks = lambda counter=counter: [Marker(counter)]
        trainer.train()
        monkeypatch.undo()
        assert [len(counter.reads[s]) for s in (2, 3, 4)] == [1, 1, 1]
        assert all(r.startswith("item at non_finite.py") for s in (2, 3, 4) for r in counter.reads[s])


class Keep(BaseHook):
    def __init__(self):
        self.infos: list[dict] = []

    def on_after_step(self, trainer):
        self.infos.append(dict(trainer.step_info))


def test_a_quiet_non_finite_step_is_skipped_on_the_device_exactly(caplog):
    """NaN in step 2 (quiet): weights, AdamW moments and its step count stay as they were, the
    next step's fresh batches are the retry. So 5 deferred steps equal 4 eager steps bit for bit
    (constant LR), and the skip is reported at the next logging step."""
    keep = Keep()
    deferred = FusedToy(nan_at={2, 3}, max_steps=5, gradient_accumulation_steps=2, batch_size=4, grad_clip=1.0,
                        max_non_finite_grad_retries=1, device="cpu", hooks=[keep, LoggingHook(interval=4)])
    deferred.train()
    eager = FusedToy(nan_at={2, 3}, max_steps=4, gradient_accumulation_steps=2, batch_size=4, grad_clip=1.0,
                     max_non_finite_grad_retries=1, device="cpu", defer_non_finite=False)
    eager.train()
    for a, b in zip(params(deferred.model), params(eager.model), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    sa, sb = deferred.unwrapped_optimizer.state_dict()["state"], eager.unwrapped_optimizer.state_dict()["state"]
    for key in sa:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key][name], sb[key][name], atol=0, rtol=0)
    assert float(sa[0]["step"]) == 4.0  # the skipped step did not count for AdamW
    flags = [float(i["found_inf"]) if "found_inf" in i else None for i in keep.infos]
    assert flags == [0.0, 1.0, 0.0, None, None]  # steps 4 and 5 (the last) log: decided on the host
    assert keep.infos[3]["skipped_steps"] == [2] and keep.infos[3]["skipped_batches"] == [2, 3]
    assert "steps [2]: non-finite gradients, the update was skipped on the device (batches [2, 3])" in caplog.text


def test_on_a_logging_step_a_non_finite_step_is_redone_in_place():
    keep = Keep()
    t = FusedToy(nan_at={6, 7}, max_steps=4, gradient_accumulation_steps=2, batch_size=4, scheduler=True,
                 max_non_finite_grad_retries=1, device="cpu", hooks=[keep, LoggingHook(interval=4)])
    t.train()
    assert t.step == 4
    assert [i["non_finite_retries"] for i in keep.infos] == [0, 0, 0, 1]
    assert keep.infos[3]["skipped_batches"] == [6, 7] and keep.infos[3]["batches"] == [8, 9]
    assert "found_inf" not in keep.infos[3]


def test_consecutive_quiet_skips_beyond_the_retries_raise_naming_the_steps():
    t = FusedToy(nan_at=set(range(2, 100)), max_steps=10, gradient_accumulation_steps=2, batch_size=4,
                 max_non_finite_grad_retries=1, device="cpu", hooks=[LoggingHook(interval=5)])
    with pytest.raises(NonFiniteError, match=r"^steps 2-4: non-finite gradients in 3 consecutive steps, each skipped "
                                             r"on the device \(max_non_finite_grad_retries=1\); skipped batches "
                                             r"\[2, 3, 4, 5, 6, 7\]$"):
        t.train()
    # Read at step 5 (a logging step), before its update: the whole run of quiet skips is named.
    assert t.step == 4


def test_without_any_reading_hook_flags_are_read_at_the_end_of_training():
    t = FusedToy(nan_at={4, 5}, max_steps=6, gradient_accumulation_steps=2, batch_size=4, device="cpu")
    with pytest.raises(NonFiniteError, match=r"^steps 3-3: "):
        t.train()
    assert t.step == 6 and t._pending_flags == []


def test_an_fp16_overflow_on_a_quiet_step_backs_off_on_the_device(monkeypatch):
    """The GradScaler path (CPU scaler, fused AdamW): the overflow is skipped by the scaler's own
    found_inf, the scale is lowered on the device, and nothing is read."""

    class Scaled(FusedToy):
        def build_grad_scaler(self):
            return torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)

    keep = Keep()
    t = Scaled(max_steps=3, device="cpu", hooks=[keep])
    t.build()
    before = [p.detach().clone() for p in t.model.parameters()]
    counter = ReadCounter(monkeypatch)
    t.hooks = [Marker(counter), keep]
    t.index_hooks()
    t.train()
    monkeypatch.undo()
    # Step 2 reads nothing; after step 3 the end of training reads the three flags (one read).
    assert counter.reads.get(2, []) == [] and [r.split(":")[0] for r in counter.reads[3]] == ["tolist at non_finite.py"]
    assert [float(i["found_inf"]) for i in keep.infos] == [1.0, 0.0, 0.0]
    assert t.grad_scaler.get_scale() == pytest.approx(2.0**27)
    assert t.step == 3 and float(t.unwrapped_optimizer.state_dict()["state"][0]["step"]) == 2.0
    assert not all(torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))


def test_which_steps_are_quiet_follows_the_hooks():
    from acceltrain import EmaHook, GuardHook

    t = FusedToy(max_steps=10, device="cpu")
    t.build()
    cases = [([LoggingHook(interval=4), ProgressHook(interval=3, bar=False)], [1, 2, 5, 7]),
             ([EmaHook(), CudaMaxMemoryHook(), ThroughputHook(tokens_per_step=1)], list(range(1, 11))),
             ([GuardHook(), LoggingHook(interval=4)], [])]  # the guard reads the loss every step
    for hooks, quiet in cases:
        t.hooks = hooks
        t.index_hooks()
        seen = []
        for done in range(10):
            t.step = done
            if t._quiet():
                seen.append(done + 1)
        assert seen == quiet, [type(h).__name__ for h in hooks]
    t.hooks, t.step = [], 0
    t.index_hooks()
    t._pending_flags = [(s, [], torch.zeros(())) for s in range(100)]
    assert not t._quiet()  # at most 100 steps go unread
