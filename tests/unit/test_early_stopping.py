"""EarlyStoppingHook with scripted metrics: the stop step, best weights, min_delta, mode, resume, surge."""

from __future__ import annotations

import io

import pytest
import torch

from acceltrain import BaseHook, CheckpointingHook
from acceltrain.hooks.early_stopping import EarlyStoppingHook
from tests.helpers import ToyTrainer, params


class Scripted(BaseHook):
    """Logs ``{"eval": {key: values[step]}}`` after the steps that have a value."""

    def __init__(self, values: dict[int, float], key: str = "loss"):
        self.values, self.key = values, key

    def on_after_step(self, trainer):
        if trainer.step in self.values:
            trainer.log({"eval": {self.key: self.values[trainer.step]}, "loss": 123.0})


class Snapshots(BaseHook):
    """The weights after every step, and before each step."""

    def __init__(self):
        self.after: dict[int, list[torch.Tensor]] = {}
        self.before: dict[int, list[torch.Tensor]] = {}

    def on_before_step(self, trainer):
        self.before[trainer.step] = params(trainer.model)

    def on_after_step(self, trainer):
        self.after[trainer.step] = params(trainer.model)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _run(values, hook, max_steps=20, key="loss", extra=(), **kwargs):
    snaps = Snapshots()
    trainer = ToyTrainer(max_steps=max_steps, device="cpu", hooks=[Scripted(values, key), snaps, hook, *extra], **kwargs)
    trainer.train()
    return trainer, snaps


def test_stops_at_the_step_patience_implies_and_restores_the_best_weights():
    values = {s: v for s, v in enumerate([5.0, 4.0, 3.0, 3.5, 3.2, 3.0, 3.1, 2.0], start=1)}
    hook = EarlyStoppingHook(patience=3)
    trainer, snaps = _run(values, hook)
    # Best 3.0 at step 3; 3.5, 3.2 and 3.0 (equal is not better) are three bad evaluations.
    assert trainer.step == 6 and trainer.should_stop
    assert trainer.stop_reason.startswith("early stopping: eval/loss did not improve on 3.0 (step 3)")
    assert (hook.best, hook.best_step, hook.bad_count) == (3.0, 3, 3)
    assert _same(params(trainer.model), snaps.after[3])
    assert not _same(snaps.after[6], snaps.after[3])


def test_without_restore_best_the_last_weights_stay_and_no_copy_is_kept():
    values = {s: v for s, v in enumerate([5.0, 6.0, 7.0], start=1)}
    hook = EarlyStoppingHook(patience=2, restore_best=False)
    trainer, snaps = _run(values, hook)
    assert trainer.step == 3 and _same(params(trainer.model), snaps.after[3])
    assert hook.state_dict()["best_weights"] == {}


def test_evaluations_only_count_when_the_metric_is_logged():
    values = {2: 1.0, 4: 2.0, 6: 2.0, 9: 0.5}  # other steps log nothing under eval/loss
    trainer, _ = _run(values, EarlyStoppingHook(patience=2))
    assert trainer.step == 6


@pytest.mark.parametrize("min_delta, stop_step", [(0.1, 3), (0.01, 20)])
def test_min_delta(min_delta, stop_step):
    values = {s: 1.0 - 0.05 * s for s in range(1, 21)}  # improves by 0.05 per evaluation
    trainer, _ = _run(values, EarlyStoppingHook(patience=2, min_delta=min_delta))
    assert trainer.step == stop_step
    assert trainer.should_stop == (stop_step < 20)


def test_mode_max_and_a_custom_metric():
    values = {s: v for s, v in enumerate([0.5, 0.7, 0.9, 0.85, float("nan"), 0.9, 0.95], start=1)}
    hook = EarlyStoppingHook(patience=3, metric="eval/accuracy", mode="max")
    trainer, snaps = _run(values, hook, key="accuracy")
    assert trainer.step == 6 and hook.best_step == 3  # 0.85, NaN and an equal 0.9 are not better
    assert _same(params(trainer.model), snaps.after[3])


def test_trainable_only_best_weights_restore_only_those():
    class Frozen(ToyTrainer):
        def build_model(self):
            model = super().build_model()
            model[0].requires_grad_(False)
            return model

    values = {1: 1.0, 2: 2.0, 3: 2.0}
    hook = EarlyStoppingHook(patience=2, best_weights="trainable")
    snaps = Snapshots()
    trainer = Frozen(max_steps=10, device="cpu", hooks=[Scripted(values), snaps, hook])
    trainer.train()
    assert sorted(hook.state_dict()["best_weights"]) == ["2.bias", "2.weight"]
    assert trainer.step == 3 and _same(params(trainer.model), snaps.after[1])


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the checkpoint loader allows


def test_state_round_trip_and_resume_stop_at_the_same_step(tmp_path):
    values = {s: v for s, v in enumerate([3.0, 2.5, 2.0, 1.0, 1.5, 1.2, 1.1, 1.05, 0.1], start=1)}
    ref, ref_snaps = _run(values, EarlyStoppingHook(patience=4))
    assert ref.step == 8

    hook = EarlyStoppingHook(patience=4)
    _run(values, hook, max_steps=6, extra=[CheckpointingHook(interval=1, exit_signals=[])], workspace=tmp_path)
    state = _save_load(hook.state_dict())
    assert (state["best"], state["best_step"], state["bad_count"]) == (1.0, 4, 2)
    assert all(isinstance(v, torch.Tensor) for v in state["best_weights"].values())

    resumed_hook = EarlyStoppingHook(patience=4)
    trainer = ToyTrainer(max_steps=20, device="cpu", workspace=tmp_path, hooks=[
        Scripted(values), CheckpointingHook(interval=100, exit_signals=[]), resumed_hook])
    trainer.train()
    assert trainer.step == 8 and resumed_hook.best_step == 4
    assert _same(params(trainer.model), params(ref.model))
    assert _same(params(trainer.model), ref_snaps.after[4])


def test_a_resumed_run_that_already_stopped_stays_stopped():
    hook = EarlyStoppingHook(patience=1)
    trainer, _ = _run({1: 1.0, 2: 2.0}, hook)
    assert trainer.step == 2
    again = EarlyStoppingHook(patience=1)
    t2 = ToyTrainer(max_steps=20, device="cpu", hooks=[again])
    t2.load_state_dict(trainer.state_dict())
    t2.train()
    assert t2.step == 2 and t2.stop_reason == "early stopping: already stopped at step 2"


def test_final_surge_restores_best_raises_lr_then_stops():
    values = {s: v for s, v in enumerate([2.0, 1.0, 1.5, 1.4, 1.3], start=1)}
    hook = EarlyStoppingHook(patience=2, final_surge={"lr_factor": 3.0, "patience": 1})
    trainer, snaps = _run(values, hook)
    # Patience runs out at step 4: surge (weights of step 2, LR x3); step 5 is not better: stop.
    assert trainer.step == 5 and hook.surged
    assert _same(snaps.before[4], snaps.after[2])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.3)
    assert hook.state_dict()["surged"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": 0}, "patience must be an int >= 1"),
        ({"patience": 2, "min_delta": -1}, "min_delta must be >= 0"),
        ({"patience": 2, "mode": "lowest"}, "mode must be 'min' or 'max'"),
        ({"patience": 2, "best_weights": "some"}, "best_weights must be"),
        ({"patience": 2, "final_surge": {"lr_factor": 0.5}}, "final_surge must be"),
        ({"patience": 2, "final_surge": {"lr_factor": 2, "steps": 3}}, "final_surge must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStoppingHook(**kwargs)
