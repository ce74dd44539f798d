"""GuardHook: spikes skipped, then rolled back exactly with a lower LR; NaN forever ends in an error."""

from __future__ import annotations

import pytest
import torch

from acceltrain import BaseHook, GuardError, GuardHook
from tests.helpers import LATEST, ToyTrainer, ckpt_root, params, step_dir, step_folder_name


class SpikeAt(ToyTrainer):
    """Multiplies the loss of the given micro-batch positions (a data-induced spike)."""

    def __init__(self, spikes, factor=1e4, **kw):
        super().__init__(**kw)
        self.spikes, self.factor, self.seen = set(spikes), factor, 0

    def forward(self, input):
        loss, rec = super().forward(input)
        if self.seen in self.spikes:
            loss = loss * self.factor
        self.seen += 1
        return loss, rec


class Watch(BaseHook):
    """Checks, at the first step after a rollback, that the weights equal the guard's snapshot."""

    def __init__(self, guard):
        self.guard, self.checked, self.losses, self.lrs = guard, [], [], []

    def on_before_step(self, trainer):
        if self.guard.rollbacks and len(self.checked) < self.guard.rollbacks:
            snap = self.guard.snapshot["params"]
            self.checked.append(all(torch.equal(p.detach(), s) for p, s in zip(trainer.trainable_parameters, snap, strict=True)))

    def on_after_step(self, trainer):
        self.losses.append(trainer.step_info["loss"].item())
        self.lrs.append(trainer.step_info["lr"][0])


def test_spike_rolls_back_to_the_snapshot_with_a_lower_lr():
    guard = GuardHook(spike_threshold=10, min_history_len=3, state_update_interval=4, skips_before_rollback=0,
                      max_rollbacks=2, lr_factor=0.5)
    watch = Watch(guard)
    t = SpikeAt({9}, max_steps=12, lr=0.05, device="cpu", hooks=[guard, watch])
    t.train()
    assert guard.rollbacks == 1 and watch.checked == [True]
    rollback = [e for e in guard.events if e["kind"] == "rollback"][0]
    assert rollback["from_step"] == 10 and rollback["to_step"] == 8 and rollback["batches"] == [9]  # the 10th batch drawn
    # The LR halved for good (SGD, constant LR): 0.05 for the first 9 steps, then 0.025.
    assert watch.lrs[:9] == [0.05] * 9 and set(watch.lrs[9:]) == {0.025}
    assert t.step == 12 and watch.losses[-1] < 0.01 * 1e4 * min(watch.losses)


def test_first_spike_is_only_skipped():
    guard = GuardHook(spike_threshold=10, min_history_len=3, skips_before_rollback=1)
    t = SpikeAt({6}, max_steps=10, device="cpu", hooks=[guard])
    t.train()
    assert [e["kind"] for e in guard.events] == ["skip"] and guard.rollbacks == 0 and t.step == 10


def test_nan_every_step_ends_in_a_clear_error_after_max_rollbacks():
    class NaNs(ToyTrainer):
        def forward(self, input):
            loss, rec = super().forward(input)
            return loss * float("nan") if self.step >= 3 else loss, rec

    guard = GuardHook(min_history_len=1, max_rollbacks=2)
    t = NaNs(max_steps=10, max_non_finite_grad_retries=1, device="cpu", hooks=[guard])
    with pytest.raises(GuardError, match=r"step 4: non-finite gradients \(loss None\) after 2 rollback\(s\)"):
        t.train()
    assert guard.rollbacks == 2


def test_guard_state_round_trips_through_checkpoint_state():
    guard = GuardHook(spike_threshold=10, min_history_len=3, state_update_interval=2, skips_before_rollback=0)
    t = SpikeAt({7}, max_steps=9, device="cpu", hooks=[guard])
    t.train()
    state = t.state_dict()["hooks"]["GuardHook"]
    other = GuardHook()
    other.load_state_dict(state)
    assert list(other.history) == list(guard.history) and other.rollbacks == 1 and other.events == guard.events
    assert all(torch.equal(a, b) for a, b in zip(other.snapshot["params"], guard.snapshot["params"], strict=True))
    torch.save(state, "/dev/null")  # tensors and plain values only


def test_guard_survives_where_the_plain_trainer_raises():
    """Without the guard the NaN window exhausts its retries; with it, training goes on."""
    from acceltrain import NonFiniteError

    class NaNOnce(ToyTrainer):
        def forward(self, input):
            loss, rec = super().forward(input)
            self.calls = getattr(self, "calls", 0) + 1
            return (loss * float("nan") if self.calls in (5, 6) else loss), rec

    with pytest.raises(NonFiniteError):
        NaNOnce(max_steps=8, max_non_finite_grad_retries=1, device="cpu").train()
    guard = GuardHook(min_history_len=1, state_update_interval=2)
    t = NaNOnce(max_steps=8, max_non_finite_grad_retries=1, device="cpu", hooks=[guard])
    t.train()
    assert t.step == 8 and guard.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in params(t.model))


def test_a_vetoed_step_closes_the_grad_scalers_bookkeeping():
    """fp16 path on a CPU GradScaler: after a guard skip the next step must be able to unscale."""

    class Scaled(SpikeAt):
        def build_grad_scaler(self):
            return torch.amp.GradScaler("cpu", init_scale=2.0**8)

    guard = GuardHook(spike_threshold=10, min_history_len=3, skips_before_rollback=1)
    t = Scaled({5}, max_steps=8, device="cpu", hooks=[guard])
    t.train()
    assert t.step == 8 and [e["kind"] for e in guard.events] == ["skip"]


def test_rollback_retires_checkpoints_of_the_abandoned_steps(tmp_path):
    from acceltrain import CheckpointingHook

    guard = GuardHook(spike_threshold=10, min_history_len=3, state_update_interval=4, skips_before_rollback=0)
    ckpt = CheckpointingHook(interval=1, keep_previous=1, exit_signals=[])
    t = SpikeAt({9}, max_steps=12, device="cpu", workspace=tmp_path, hooks=[guard, ckpt])
    t.train()
    root = ckpt_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == sorted([LATEST, step_folder_name(12)])
    from safetensors.torch import load_file

    saved = load_file(step_dir(root, 12) / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in t.unwrapped_model.state_dict().items())


def test_a_resize_keeps_the_history_and_retakes_the_snapshot_at_the_resumed_step():
    """On another number of processes the saved snapshot (laid out for the saved one) is dropped and
    taken from the state just loaded; the loss history and counters, the same on every rank, stay."""
    saved = GuardHook()
    t = ToyTrainer(max_steps=3, device="cpu", hooks=[saved])
    t.train()
    states = [saved.state_dict(), saved.state_dict()]  # as two saved ranks wrote them
    guard = GuardHook()
    resumed = ToyTrainer(max_steps=6, device="cpu", hooks=[guard])
    resumed.build()
    for rank in (0, 2):  # a rank the saved run had, and one it did not
        state = guard.resize_state(states, rank, 3)
        assert state["snapshot"] is None and state["history"] == states[0]["history"] and len(state["history"]) == 3
    resumed.load_state_dict(t.state_dict())  # the guard's load, then its on_load_state_dict
    guard.load_state_dict(guard.resize_state(states, 1, 3))
    guard.on_load_state_dict(resumed, {})
    assert guard.snapshot["step"] == resumed.step == 3
    assert all(torch.equal(s, p.detach()) for s, p in zip(guard.snapshot["params"], resumed.trainable_parameters,
                                                          strict=True))
