"""recipe_kit.guard_output_dir: one folder, one run (checkpoints are covered end to end in
tests/integration/test_pretrain.py; here the folders that hold only logs or an export)."""

from __future__ import annotations

import pytest

from acceltrain.config import UserError
from acceltrain.recipe_kit import guard_output_dir


def test_a_fresh_or_missing_folder_passes(tmp_path):
    assert guard_output_dir(tmp_path / "new", resume=False, overwrite=False, is_main=True) is False
    (tmp_path / "config.yaml").write_text("lr: 1\n")  # every run rewrites its config: not a run's output
    assert guard_output_dir(tmp_path, resume=False, overwrite=False, is_main=True) is False


def test_logs_and_export_without_checkpoints_are_refused_and_left_alone(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match=r"holds an earlier run's final, metrics.jsonl; pass --resume true"):
        guard_output_dir(tmp_path, resume=False, overwrite=False, is_main=True)
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # --resume with nothing to resume from starts again (there is no checkpoint to load).
    assert guard_output_dir(tmp_path, resume=True, overwrite=False, is_main=True) is False
    assert (tmp_path / "metrics.jsonl").exists()


def test_overwrite_removes_only_the_run_outputs(tmp_path):
    for name in ("final", "tensorboard", "merged"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert guard_output_dir(tmp_path, resume=False, overwrite=True, is_main=False) is False
    assert (tmp_path / "final").exists()  # only the main process deletes
    guard_output_dir(tmp_path, resume=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_and_overwrite_together_is_an_error(tmp_path):
    with pytest.raises(UserError, match="contradict"):
        guard_output_dir(tmp_path, resume=True, overwrite=True, is_main=True)
