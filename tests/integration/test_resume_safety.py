"""Resume safety, tried as a new user would: a resume that was asked for and cannot be honoured is
an error (exit 2, the run folder untouched), and a signal before or during the first step ends
cleanly in bounded time (a clean exit before training, a checkpoint once it has begun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import LATEST, ckpt_root, run_step_dir, step_dir, step_folder_name
from tests.integration.test_classify import TINY, keyword_rows, load_recipe, run_inprocess, write

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
EARLY = Path(__file__).parent / "scripts" / "early_signal.py"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (to prove nothing changed)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_with_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path, capsys):
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    data = write(tmp_path / "train.jsonl", keyword_rows(64, seed=0))
    out = tmp_path / "run"
    args = ["--dataset", str(data), *TINY, "--max_steps", "2", "--eval_interval", "2", "--save_interval", "2",
            "--output_dir", str(out)]
    run_inprocess(module, args)
    only = run_step_dir(out, 2)
    _truncate(only / "model.safetensors")
    before = _snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_inprocess(module, [*args, "--max_steps", "4", "--resume", "true"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --resume true: no checkpoint in "), err[-1]
    assert f"{only / 'model.safetensors'}:" in err[-1] and "(truncated?)" in err[-1], err[-1]
    assert "--overwrite true" in err[-1]
    # Nothing of the run was touched: the evidence is still there, no log grew.
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                       if k != "config.yaml"}
    # --overwrite is the explicit way to start again.
    run_inprocess(module, [*args, "--overwrite", "true"])
    assert (run_step_dir(out, 2) / "manifest.json").is_file()


def test_load_latest_with_only_corrupt_checkpoints_refuses_in_a_plain_trainer(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--max-steps", "4", "--interval", "2", "--workers", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    root = ckpt_root(tmp_path)
    for step in (2, 4):
        _truncate(step_dir(root, step) / "optimizer.pt")
    proc = subprocess.run([*cmd[:4], "6", *cmd[5:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: load='latest': no checkpoint in {root} can be resumed from: "), last
    for step in (4, 2):  # newest first, each with what is wrong with it
        assert f"{step_dir(root, step) / 'optimizer.pt'}:" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == sorted([LATEST, step_folder_name(2), step_folder_name(4)])


def _signal_when_ready(workspace: Path, at: str, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(EARLY), str(workspace), "--at", at], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (workspace / "READY").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_building_the_data_exits_cleanly_with_nothing_half_written(tmp_path, signum):
    proc, took = _signal_when_ready(tmp_path, "build", signum)
    assert proc.returncode == 128 + signum, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    name = signal.Signals(signum).name
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{name} before training started: exiting with {128 + signum}; nothing was trained or saved")
    assert took < 30  # the 60 s wait was cut short by the signal
    # The half-written cache file left no final name behind, and nothing was checkpointed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["READY"]


def test_signal_during_a_long_first_step_ends_in_a_checkpoint_of_step_1(tmp_path):
    proc, _ = _signal_when_ready(tmp_path, "first-step", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    from acceltrain.checkpoint import verify_checkpoint

    folder = (ckpt_root(tmp_path) / LATEST).resolve()
    assert folder.name == step_folder_name(1) and verify_checkpoint(folder)["step"] == 1


def test_recipe_refuses_a_resize_that_cannot_keep_the_global_batch_or_another_deepspeed_setup_before_writing(tmp_path, capsys):
    """The recipe checks a resume on another world size up front (recipe_kit.check_resume): the
    manifest is rewritten here as if 2 processes had saved it with 40 samples per step, which
    this 1-process run with micro-batches of 16 cannot make."""
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    data = write(tmp_path / "train.jsonl", keyword_rows(64, seed=0))
    out = tmp_path / "run"
    args = ["--dataset", str(data), *TINY, "--max_steps", "2", "--eval_interval", "2", "--save_interval", "2",
            "--output_dir", str(out)]
    run_inprocess(module, args)
    folder = run_step_dir(out, 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["batch"] == {"micro_batch": 16, "accumulation": 1, "global_batch": 16}
    manifest.update(world_size=2, batch={"micro_batch": 20, "accumulation": 1, "global_batch": 40})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_inprocess(module, [*args, "--max_steps", "4", "--resume", "true"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder}: saved with 40 samples per step (20 per process x accumulation 1 x 2 processes); on 1 "
        "process with micro-batch 16 a step is a multiple of 16 samples, so no accumulation keeps 40 (this run would "
        "use 16): resume on a number of processes that keeps it, or pass --allow_global_batch_change true "
        "(allow_global_batch_change=True) to continue with the new global batch")
    assert _snapshot(out) == before  # config.yaml included: refused before anything was written

    # The same world size, but saved (so the manifest says) under DeepSpeed ZeRO-2: refused up front too.
    original = json.loads((folder / "manifest.json").read_text())
    original.update(world_size=1, batch={"micro_batch": 16, "accumulation": 1, "global_batch": 16},
                    deepspeed={"zero_stage": 2, "mixed_precision": None})
    (folder / "manifest.json").write_text(json.dumps(original))
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        run_inprocess(module, [*args, "--max_steps", "4", "--resume", "true"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder}: saved with DeepSpeed ZeRO-2 (mixed precision no), this run is without DeepSpeed; resume "
        "with the same DeepSpeed stage and precision (ZeRO partitions are laid out for one configuration)")
    assert _snapshot(out) == before


def test_signal_during_the_pretrain_recipes_data_preparation_exits_cleanly(tmp_path):
    """SIGTERM while the recipe's constructor writes its tokenizer/packing cache: exit 143 in one
    line, and the cache file that was being written never appears under its final name."""
    from tests.integration.test_pretrain import TINY, make_corpus

    cache, ready = tmp_path / "cache", tmp_path / "READY"
    corpus = make_corpus(tmp_path / "docs.jsonl", docs=60)
    env = {**os.environ, "ACCELTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "scripts" / "pretrain_paused.py"), str(ready),
                             "--", "--output_dir", str(tmp_path / "run"), "--dataset", str(corpus), "--max_steps", "2",
                             *TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ready.exists() or not ready.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGTERM before training started: exiting with 143; nothing was trained or saved"
    assert not Path(ready.read_text()).exists()  # the interrupted cache file has no final name
    assert not ckpt_root(tmp_path / "run").exists()
