"""ExportHook (acceltrain/hooks/export.py) and save_pretrained (acceltrain/export.py) on a real run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from acceltrain import BaseHook, CheckpointingHook, ExportHook
from tests.helpers import ToyTrainer, run_step_dir


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


class Snapshots(BaseHook):
    """The weights after every step (what a periodic export must hold)."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_after_step(self, trainer):
        self.after[trainer.step] = _weights(trainer)


def test_export_at_the_end_and_every_interval_holds_those_steps_weights(tmp_path):
    snaps = Snapshots()
    t = ToyTrainer(max_steps=5, device="cpu", workspace=tmp_path, hooks=[snaps, ExportHook(path="final", interval=2)])
    t.train()
    final = tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["acceltrain.json", "model.safetensors", "step_2", "step_4"]
    assert json.loads((final / "acceltrain.json").read_text()) == {"class": "Sequential"}
    for folder, step in ((final, 5), (final / "step_2", 2), (final / "step_4", 4)):
        saved = load_file(str(folder / "model.safetensors"))
        assert saved.keys() == snaps.after[step].keys()
        assert all(torch.equal(saved[k], snaps.after[step][k]) for k in saved), folder


class At2(BaseHook):
    def __init__(self, how: str):
        self.how = how

    def on_after_step(self, trainer):
        if trainer.step == 2:
            if self.how == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                trainer.request_stop("early stopping")


def test_an_early_stop_exports_and_a_signal_stop_does_not(tmp_path):
    stopped = ToyTrainer(max_steps=5, device="cpu", workspace=tmp_path / "a", hooks=[At2("stop"), ExportHook()])
    stopped.train()
    assert stopped.step == 2 and (tmp_path / "a" / "final" / "model.safetensors").is_file()

    hooks = [At2("signal"), CheckpointingHook(interval=100), ExportHook()]
    signalled = ToyTrainer(max_steps=5, device="cpu", workspace=tmp_path / "b", hooks=hooks)
    with pytest.raises(SystemExit):
        signalled.train()
    assert signalled.stopped_by_signal and signalled.step == 2
    assert not (tmp_path / "b" / "final").exists()  # preempted: the resumed run exports
    assert run_step_dir(tmp_path / "b", 2).is_dir()
