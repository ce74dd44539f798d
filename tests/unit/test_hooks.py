"""Built-in hooks: logging to TensorBoard and JSON lines, progress lines, EMA, images, checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch

from acceltrain import (
    CheckpointingHook,
    CudaMaxMemoryHook,
    EmaHook,
    ImageFileLoggerHook,
    LoggingHook,
    ProgressHook,
)
from tests.helpers import LATEST, ToyTrainer, ckpt_root, link_step, params, step_folder_name


def test_logging_hook_writes_jsonl_and_tensorboard_events(tmp_path):
    t = ToyTrainer(max_steps=5, workspace=tmp_path, device="cpu", hooks=[CudaMaxMemoryHook(), LoggingHook(interval=2)])
    t.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]
    assert {"loss", "grad_norm", "lr", "records/mae", "step_time", "data_time", "max_memory"} <= set(lines[0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [2, 4, 5]
    assert loss[0].value == pytest.approx(lines[0]["loss"], rel=1e-6)


def test_logging_hook_averages_over_the_interval(tmp_path):
    seen = []

    class Capture(LoggingHook):
        def on_log(self, trainer, records, dry_run=False):
            seen.append(records)

    losses = []

    class Keep(LoggingHook):
        def on_after_step(self, trainer):
            losses.append(trainer.step_info["loss"].item())

    t = ToyTrainer(max_steps=4, device="cpu", hooks=[Keep(interval=100), Capture(interval=4)])
    t.train()
    assert seen[0]["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_figure_sums_fold_in_batches_exactly_and_survive_a_state_round_trip():
    from acceltrain.hooks.logging import FigureSums

    values = [torch.tensor(i / 3, dtype=torch.float32) for i in range(10)]
    a, b = FigureSums(fold=4), FigureSums(fold=4)
    for i, v in enumerate(values[:6]):
        a.add({"loss": v, "step_time": 0.5 * i})
    b.load_state_dict(a.state_dict())  # mid-batch: two values still pending in a
    for i, v in enumerate(values[6:], start=6):
        for s in (a, b):
            s.add({"loss": v, "step_time": 0.5 * i})
    for s in (a, b):
        sums, counts = s.totals()
        assert counts == {"loss": 10, "step_time": 10}
        # float32 values summed in float64 are exact here, whatever the batching.
        assert float(sums["loss"]) == sum(float(v) for v in values)
        assert sums["step_time"] == 22.5


def test_step_figures_are_shared_by_hooks_until_step_info_changes():
    t, other = ToyTrainer(max_steps=1, device="cpu"), ToyTrainer(max_steps=1, device="cpu")
    t.step_info = {"loss": torch.tensor(1.0), "lr": [0.1]}
    other.step_info = {"loss": torch.tensor(2.0), "lr": [0.2]}
    first = t.step_figures()
    assert t.step_figures() is first and first["lr"] == 0.1
    # Per trainer: another trainer's step (a second trainer in the process) does not evict it.
    assert other.step_figures()["lr"] == 0.2 and t.step_figures() is first
    t.step_info["tokens"] = 7  # a hook adds a figure: it is seen
    assert t.step_figures()["tokens"] == 7
    t.step_info = dict(t.step_info)  # a new step's dict: computed afresh
    assert t.step_figures() is not first


def test_progress_hook_prints_one_line_per_interval():
    out = io.StringIO()
    ToyTrainer(max_steps=25, device="cpu", hooks=[ProgressHook(interval=10, stream=out, eta_warmup=2)]).train()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Step 10/25", "Step 20/25", "Step 25/25"]
    assert "eta 0:00:00" in lines[-1] and "loss" in lines[0] and "lr 1.00e-01" in lines[0] and "GiB" in lines[0]


def test_ema_hook_tracks_average_and_is_checkpointed(tmp_path):
    ema = EmaHook(decay=0.5)
    t = ToyTrainer(max_steps=1, device="cpu", hooks=[ema])
    t.build()
    start = params(t.model)
    t.train()
    for e, s, p in zip(ema.ema_model.parameters(), start, t.model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.5 * s + 0.5 * p.detach())
    state = t.state_dict()
    assert "EmaHook" in state["hooks"]
    other = EmaHook(decay=0.5)
    t2 = ToyTrainer(max_steps=1, device="cpu", hooks=[other])
    t2.load_state_dict(state)
    t2.build()
    other.on_before_train(t2)
    for a, b in zip(ema.ema_model.parameters(), other.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_image_file_logger_writes_pngs(tmp_path):
    pytest.importorskip("PIL")
    hook = ImageFileLoggerHook(interval=1, path="images", max_images=2)
    t = ToyTrainer(max_steps=1, workspace=tmp_path, device="cpu", hooks=[hook])
    t.train()
    t.log_images({"sample": [torch.rand(3, 8, 8), torch.rand(8, 8, 1), torch.rand(3, 8, 8)]})
    files = sorted(p.name for p in (tmp_path / "images" / "step_1").iterdir())
    assert files == ["sample_0.png", "sample_1.png"]


def test_checkpointing_hook_saves_at_interval_and_resumes(tmp_path):
    full = ToyTrainer(max_steps=6, optimizer="adamw", device="cpu")
    full.train()
    hook = CheckpointingHook(interval=2, keep_previous=10, exit_signals=[])
    ToyTrainer(max_steps=4, optimizer="adamw", device="cpu", workspace=tmp_path, hooks=[hook]).train()
    names = sorted(p.name for p in ckpt_root(tmp_path).iterdir())
    assert names == sorted([LATEST, step_folder_name(2), step_folder_name(4)])
    assert link_step(ckpt_root(tmp_path)) == 4
    hook2 = CheckpointingHook(interval=2, keep_previous=10, exit_signals=[])
    resumed = ToyTrainer(max_steps=6, optimizer="adamw", device="cpu", workspace=tmp_path, hooks=[hook2])
    resumed.train()
    assert hook2.loaded_from.name == step_folder_name(4) and resumed.step == 6
    # Without the data position (checkpoint issue) the batches differ, but the step and state continue.
    assert resumed.optimizer.state_dict()["state"][0]["step"].item() == 6
