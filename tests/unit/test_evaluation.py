"""evaluate(): sample-weighted, exact over the evaluation set, padding masked out."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseHook, EvaluationHook, LoggingHook
from tests.helpers import EvalTrainer, params, regression_data


def _reference(model, n):
    x, y = regression_data(n, seed=3).tensors
    with torch.no_grad():
        pred = model(x)
    return nn.functional.mse_loss(pred, y).item(), (pred - y).abs().mean().item()


@pytest.mark.parametrize("eval_bs", [1, 4, 5, 23, 64])
def test_evaluate_equals_the_full_set_metric(eval_bs):
    t = EvalTrainer(max_steps=2, eval_bs=eval_bs, device="cpu")
    t.train()
    metrics = t.evaluate()
    loss, mae = _reference(t.unwrapped_model, 23)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["mae"] == pytest.approx(mae, rel=1e-6)
    assert t.model.training  # restored


def test_padded_shards_mask_duplicates():
    from acceltrain.evaluation import shard_eval_loader

    loader = torch.utils.data.DataLoader(list(range(7)), batch_size=2)
    shards = [list(shard_eval_loader(loader, 3, r)) for r in range(3)]
    real = []
    for shard in shards:
        assert sum(len(mask) for mask, _ in shard) == 3  # every rank runs the same count
        for mask, batch in shard:
            real += batch[mask].tolist()
    assert sorted(real) == list(range(7))


def test_evaluation_hook_logs_eval_metrics(tmp_path):
    hook = EvaluationHook(interval=2)
    t = EvalTrainer(max_steps=5, device="cpu", workspace=tmp_path, hooks=[LoggingHook(interval=100), hook])
    t.train()
    assert [s for s, _ in hook.history] == [2, 4, 5]
    assert hook.last["loss"] == pytest.approx(_reference(t.unwrapped_model, 23)[0], rel=1e-6)
    assert '"eval/loss"' in (tmp_path / "metrics.jsonl").read_text()


class _LossLog(BaseHook):
    def __init__(self):
        self.losses: list[tuple[int, float]] = []

    def on_after_step(self, trainer):
        self.losses.append((trainer.step, trainer.step_info["loss"].item()))


class _SignalledEval(EvalTrainer):
    """Sends itself SIGTERM inside evaluation batch ``at_batch`` of the evaluation at ``at_step``."""

    def __init__(self, *, at_step: int | None = None, at_batch: int = 0, **kw):
        super().__init__(**kw)
        self.at_step, self.at_batch = at_step, at_batch
        self.seen: list[tuple[int, int]] = []  # (step, eval batch) of every evaluation batch run

    def evaluation_step(self, batch):
        self.seen.append((self.step, self.eval_batch_idx))
        if (self.step, self.eval_batch_idx) == (self.at_step, self.at_batch):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the handler only sets flags
        return super().evaluation_step(batch)


def _run(tmp_path, order, **kw):
    from acceltrain import CheckpointingHook

    ckpt = CheckpointingHook(interval=3, background=False, path=tmp_path / "ckpt")
    ev, log = EvaluationHook(interval=3), _LossLog()
    hooks = [ckpt, ev, log] if order == "checkpoint_first" else [ev, ckpt, log]
    t = _SignalledEval(max_steps=6, device="cpu", optimizer="adamw", hooks=hooks, **kw)
    code = None
    try:
        t.train()
    except SystemExit as e:
        code = e.code
    return t, ev, log, code


@pytest.mark.parametrize("order", ["checkpoint_first", "evaluation_first"])
def test_sigterm_during_evaluation_resumes_at_that_batch_exactly(tmp_path, order):
    """Preempted in the middle of an evaluation: a checkpoint holds how far it got; the resumed
    run finishes it from the next batch, and its metrics and the training after it equal the
    uninterrupted run's bitwise."""
    ref, ref_ev, ref_log, code = _run(tmp_path / "ref", order)
    assert code is None and [s for s, _ in ref_ev.history] == [3, 6]

    cut, cut_ev, cut_log, code = _run(tmp_path / "run", order, at_step=3, at_batch=2)
    assert code == 128 + signal.SIGTERM
    assert cut.seen[-1] == (3, 2) and cut_ev.history == [] and cut_ev.pending.batches == 3
    assert [s for s, _ in cut_log.losses] == [1, 2, 3]

    again, again_ev, again_log, code = _run(tmp_path / "run", order)
    assert code is None
    # Continued at batch 3 of 5 (0-based), not restarted: batches 0-2 are not run again.
    assert again.seen[:2] == [(3, 3), (3, 4)]
    assert again_ev.history == ref_ev.history  # == on floats: bitwise
    assert cut_log.losses + again_log.losses == ref_log.losses
    for a, b in zip(params(again.unwrapped_model), params(ref.unwrapped_model), strict=True):
        assert torch.equal(a, b)


def test_a_signal_in_the_last_evaluation_batch_completes_it(tmp_path):
    cut, cut_ev, _, code = _run(tmp_path, "evaluation_first", at_step=3, at_batch=4)
    assert code == 128 + signal.SIGTERM  # stops after the step, as for a signal during training
    assert [s for s, _ in cut_ev.history] == [3] and cut_ev.pending is None
