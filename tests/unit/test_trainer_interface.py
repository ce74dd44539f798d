"""The public trainer interface hooks and tools use (``BaseTrainer``'s accessors), the signal
flag, and the import paths of the hooks that moved to ``acceltrain.hooks``."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from acceltrain import BaseHook, CheckpointingHook
from acceltrain.schedules import scale_lr, unwrap_optimizer, unwrap_scheduler
from tests.helpers import ToyTrainer


class ItemsToy(ToyTrainer):
    def count_loss_items(self, batch):
        return batch[0].shape[0]

    def forward(self, input):
        x, y = input
        return torch.nn.functional.mse_loss(self.model(x), y, reduction="sum"), {}


class Frozen(ToyTrainer):
    def build_model(self):
        model = super().build_model()
        model[0].bias.requires_grad_(False)
        return model


def test_accessors_before_and_after_build():
    t = Frozen(max_steps=2, device="cpu", scheduler=True)
    assert t.unwrapped_optimizer is None and t.unwrapped_scheduler is None and t.data is None
    assert t.trainable_parameters == [] and t.engine_kind == "single" and not t.counts_items
    t.build()
    assert isinstance(t.optimizer, AcceleratedOptimizer) and isinstance(t.lr_scheduler, AcceleratedScheduler)
    assert type(t.unwrapped_optimizer) is torch.optim.SGD and t.unwrapped_optimizer is t.optimizer.optimizer
    assert type(t.unwrapped_scheduler) is torch.optim.lr_scheduler.LambdaLR
    assert t.unwrapped_scheduler is t.lr_scheduler.scheduler
    assert unwrap_optimizer(t.optimizer) is t.unwrapped_optimizer and unwrap_scheduler(t.lr_scheduler) is t.unwrapped_scheduler
    params = list(t.model.parameters())
    assert isinstance(t.trainable_parameters, list) and len(t.trainable_parameters) == len(params) - 1
    assert all(a is b for a, b in zip(t.trainable_parameters, [p for p in params if p is not params[1]], strict=True))
    assert t.data.position.batch_size == 8 and t.data.state_dict() == t.data.state_dict()
    model, optimizer = t.model, t.optimizer
    t.build()  # idempotent: nothing is built twice
    assert t.model is model and t.optimizer is optimizer
    assert ItemsToy(max_steps=1, device="cpu").counts_items


def test_autocast_is_the_runs_precision():
    x = torch.randn(2, 8)
    bf16 = ToyTrainer(max_steps=1, device="cpu", mixed_precision="bf16")
    bf16.build()
    with bf16.autocast():  # (the prepared model casts its outputs back to fp32: ask a layer)
        assert torch.is_autocast_enabled("cpu") and bf16.model[0](x).dtype == torch.bfloat16
    plain = ToyTrainer(max_steps=1, device="cpu")
    plain.build()
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu") and plain.model[0](x).dtype == torch.float32


class PublicOnly(BaseHook):
    """A hook that steers and checks the loop through the public interface only."""

    def __init__(self):
        self.norms, self.lrs, self.drawn, self.extra = [], [], [], []

    def on_before_optimizer_step(self, trainer):
        grads = [p.grad for p in trainer.trainable_parameters]
        self.norms.append(torch.equal(torch.nn.utils.get_total_norm(grads, foreach=True), trainer.step_info["grad_norm"]))
        with torch.no_grad(), trainer.autocast():  # an extra forward, as the trainer runs its own
            self.extra.append(trainer.model(torch.zeros(1, 8)).shape)

    def on_after_step(self, trainer):
        self.lrs.append(trainer.unwrapped_optimizer.param_groups[0]["lr"])
        self.drawn.append(trainer.data.batches_drawn)
        if trainer.step == 2:
            scale_lr(trainer.unwrapped_scheduler, 0.5)  # from step 3 on, every LR is halved


def test_a_custom_hook_using_only_public_accessors():
    hook = PublicOnly()
    t = ToyTrainer(max_steps=4, device="cpu", scheduler=True, lr=0.1, gradient_accumulation_steps=2, hooks=[hook])
    t.train()
    assert hook.norms == [True] * 4 and hook.extra == [torch.Size([1, 1])] * 4
    assert hook.drawn == [2, 4, 6, 8]
    # ToyTrainer's schedule is 0.1 / (1 + steps done); halved after step 2.
    assert hook.lrs == pytest.approx([0.1 / 2, 0.1 / 3, 0.05 / 4, 0.05 / 5], rel=1e-12)
    assert t.step_info["lr"] == [hook.lrs[-1]]


class SignalAt(BaseHook):
    def __init__(self, step: int):
        self.step = step

    def on_after_step(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the handler only sets flags


def test_stopped_by_signal_is_set_by_a_sigterm_stop_and_not_by_max_steps(tmp_path):
    t = ToyTrainer(max_steps=4, device="cpu", workspace=tmp_path,
                   hooks=[SignalAt(2), CheckpointingHook(interval=100)])
    with pytest.raises(SystemExit) as exit_info:
        t.train()
    assert exit_info.value.code == 128 + signal.SIGTERM and t.step == 2
    assert t.stopped_by_signal and t.should_stop and t.stop_reason == "signal SIGTERM"
    assert not t.stop_requested  # one process: a local request is agreed at once (should_stop)

    done = ToyTrainer(max_steps=4, device="cpu", workspace=tmp_path / "b", hooks=[CheckpointingHook(interval=100)])
    done.train()
    assert done.step == 4 and not done.stopped_by_signal and not done.should_stop


def test_request_stop_by_hand_is_not_a_signal_stop():
    class StopAt2(BaseHook):
        def on_after_step(self, trainer):
            if trainer.step == 2:
                trainer.request_stop("enough")

    t = ToyTrainer(max_steps=4, device="cpu", hooks=[StopAt2()])
    t.train()
    assert t.step == 2 and t.should_stop and not t.stopped_by_signal


def test_moved_hooks_keep_their_old_import_paths():
    import acceltrain
    import acceltrain.hooks as hooks
    from acceltrain.evaluation import EvaluationHook
    from acceltrain.export import ExportHook
    from acceltrain.recipe_kit import SampleHook, generate_sample

    assert EvaluationHook is hooks.EvaluationHook is acceltrain.EvaluationHook
    assert ExportHook is hooks.ExportHook is acceltrain.ExportHook
    assert SampleHook is hooks.SampleHook and generate_sample is hooks.sample.generate_sample
    assert EvaluationHook.__module__ == "acceltrain.hooks.evaluation"
    assert ExportHook.__module__ == "acceltrain.hooks.export" and SampleHook.__module__ == "acceltrain.hooks.sample"
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        acceltrain.evaluation.Nothing  # noqa: B018


def test_trainer_log_accepts_the_old_dry_run_keyword():
    seen = []

    class Spy(BaseHook):
        def on_log(self, trainer, records, not_main_process=False):
            seen.append(not_main_process)

    t = ToyTrainer(max_steps=1, device="cpu", hooks=[Spy()])
    t.build()
    t.log({"a": 1.0})  # default: this process is the main one
    t.log({"a": 1.0}, dry_run=True)
    t.log({"a": 1.0}, not_main_process=True)
    assert seen == [False, True, True]
