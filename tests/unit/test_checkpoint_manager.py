"""CheckpointManager over real acceltrain checkpoint folders: ranking, torn folders, loading, cleaning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from acceltrain.checkpoint import CheckpointError
from acceltrain.checkpoint_manager import CheckpointManager
from acceltrain.one_call import Trainer
from tests.helpers import ckpt_root, parse_step, regression_data, run_step_dir, step_folder_name


def _run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    loader = torch.utils.data.DataLoader(regression_data(32), batch_size=8)
    trainer = Trainer(model, train_dataloader=loader, eval_dataloader=loader, criterion=nn.MSELoss(), device="cpu",
                      config={"max_steps": 4, "eval_interval": 1, "save_interval": 1, "keep_checkpoints": 10,
                              "keep_best": 10, "output_dir": str(tmp_path), "learning_rate": 0.05})
    trainer.train()
    return trainer


def test_rank_load_and_clean(tmp_path):
    trainer = _run(tmp_path)
    evals = {step: m["loss"] for step, m in next(h for h in trainer.hooks if hasattr(h, "history")).history}
    manager = CheckpointManager(ckpt_root(tmp_path), monitor="val_loss", mode="min")
    steps = [parse_step(Path(p).name) for p in manager.list_checkpoints()]
    assert steps == [1, 2, 3, 4]
    by_metric = [parse_step(Path(p).name) for p in manager.list_checkpoints(sort_by="metric")]
    assert by_metric == sorted(evals, key=lambda s: evals[s])
    best = manager.get_best_checkpoint_path()
    assert best.endswith(step_folder_name(by_metric[0]))
    loaded = manager.load_checkpoint(manager.list_checkpoints()[-1])
    assert loaded["step"] == 4 and loaded["metrics"] == {"eval/loss": evals[4]}
    for name, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(loaded["state_dict"][name], value)
    fresh = manager.load_model_from_checkpoint(lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)),
                                               manager.list_checkpoints()[-1])
    assert torch.equal(fresh[0].weight, trainer.unwrapped_model[0].weight)
    removed = manager.cleanup_old_checkpoints(keep_top_k=1)
    assert sorted(manager.list_checkpoints()) == sorted({best, str(run_step_dir(tmp_path.resolve(), 4))})
    assert len(removed) == 4 - len(manager.list_checkpoints())


def test_a_torn_checkpoint_is_skipped_and_refused(tmp_path, caplog):
    _run(tmp_path)
    manager = CheckpointManager(ckpt_root(tmp_path), monitor="eval/loss")
    torn = run_step_dir(tmp_path, 2)
    (torn / "model.safetensors").write_bytes(b"garbage")
    assert str(torn.resolve()) not in manager.list_checkpoints() and len(manager.list_checkpoints()) == 3
    assert "model.safetensors" in caplog.text
    with pytest.raises(CheckpointError, match=f"{step_folder_name(2)}/model.safetensors: 7 bytes"):
        manager.load_checkpoint(torn)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        CheckpointManager(tmp_path, mode="best")
    assert CheckpointManager(tmp_path / "nothing").get_best_checkpoint_path() is None
