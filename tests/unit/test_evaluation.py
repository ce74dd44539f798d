"""evaluate(): sample-weighted, exact over the evaluation set, padding masked out."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from acceltrain import EvaluationHook, LoggingHook
from tests.helpers import EvalTrainer, regression_data


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
