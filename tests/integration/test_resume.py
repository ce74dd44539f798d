"""Exact resume across processes: SIGTERM at a step boundary or inside a window, kill -9 mid-save.

Run A trains N steps uninterrupted; run B is stopped by a signal at step k and resumed in a new
process to N. Losses after k, the sample order, final parameters and optimizer state must be
bit-identical (atol=0), with shuffling, dropout, 2 DataLoader workers, accumulation and an LR
schedule all on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.helpers import LATEST, ckpt_root, link_step, run_step_dir, step_folder_name, tmp_folder_name

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
N = 10


def run(workspace: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(workspace), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc


def steps(workspace: Path, rank: int = 0) -> dict[int, dict]:
    """The last record of each step (a resumed run may log a step the killed run had not saved)."""
    lines = [json.loads(line) for line in (workspace / f"steps_rank{rank}.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


def assert_identical_end(a: Path, b: Path, k: int, rank: int = 0) -> None:
    sa, sb = steps(a, rank), steps(b, rank)
    assert sorted(sb) == list(range(1, N + 1))
    for s in range(k + 1, N + 1):
        assert sb[s]["loss"] == sa[s]["loss"], f"step {s}"
        assert sb[s]["indices"] == sa[s]["indices"], f"step {s}"
        assert sb[s]["lr"] == sa[s]["lr"]
    fa, fb = (torch.load(w / f"final_rank{rank}.pt", weights_only=True) for w in (a, b))
    assert fa["step"] == fb["step"] == N
    for name, tensor in fa["model"].items():
        assert torch.equal(tensor, fb["model"][name]), name
    for pid, st in fa["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, fb["optimizer"]["state"][pid][key]), (pid, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    a = tmp_path_factory.mktemp("uninterrupted")
    run(a, "--max-steps", str(N))
    return a


def test_sigterm_at_step_boundary_resumes_bit_identically(uninterrupted, tmp_path):
    k = 5
    run(tmp_path, "--max-steps", str(N), "--kill-at", str(k), expect=128 + signal.SIGTERM)
    assert link_step(ckpt_root(tmp_path)) == k
    run(tmp_path, "--max-steps", str(N))
    assert_identical_end(uninterrupted, tmp_path, k)
    # Training moved the weights between k and N (the comparison is not vacuous).
    from safetensors.torch import load_file

    at_k = load_file(run_step_dir(tmp_path, k) / "model.safetensors")
    final = torch.load(tmp_path / "final_rank0.pt", weights_only=True)["model"]
    assert any(not torch.equal(at_k[name], final[name]) for name in final)


def test_second_signal_during_the_save_does_not_corrupt_it(uninterrupted, tmp_path):
    k = 5
    run(tmp_path, "--max-steps", str(N), "--kill-at", str(k), "--interval", "100", "--second-signal",
        expect=128 + signal.SIGTERM)
    from acceltrain.checkpoint import verify_checkpoint

    folder = (ckpt_root(tmp_path) / LATEST).resolve()
    assert folder.name == step_folder_name(k) and verify_checkpoint(folder)["step"] == k
    run(tmp_path, "--max-steps", str(N))
    assert_identical_end(uninterrupted, tmp_path, k)


def test_signal_inside_an_accumulation_window_finishes_the_window_then_saves(tmp_path, tmp_path_factory):
    a = tmp_path_factory.mktemp("uninterrupted_accum3")
    run(a, "--max-steps", str(N), "--accum", "3")
    k = 6
    run(tmp_path, "--max-steps", str(N), "--accum", "3", "--kill-at", str(k), "--mid-window",
        expect=128 + signal.SIGTERM)
    assert link_step(ckpt_root(tmp_path)) == k
    run(tmp_path, "--max-steps", str(N), "--accum", "3")
    assert_identical_end(a, tmp_path, k)


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(uninterrupted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "--max-steps", str(N), "--slow-save-at", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = ckpt_root(tmp_path) / "SAVING"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the run never reached the slow save"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    root = ckpt_root(tmp_path)
    assert (root / tmp_folder_name(8)).is_dir()  # torn
    assert link_step(root) == 4
    marker.unlink()
    out = run(tmp_path, "--max-steps", str(N))
    assert "removing" in out.stderr and tmp_folder_name(8) in out.stderr
    assert not (root / tmp_folder_name(8)).exists()
    assert_identical_end(uninterrupted, tmp_path, 4)


def test_changed_data_is_caught_by_the_resume_self_check(tmp_path):
    run(tmp_path, "--max-steps", "4", "--interval", "2")
    # Same folder, the order changed (no shuffling): the next batch is not the recorded one.
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--max-steps", "6", "--no-shuffle"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: resume self-check failed")


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory):
    a = tmp_path_factory.mktemp("ddp_uninterrupted")
    torchrun(SCRIPT, str(a), "--max-steps", str(N))
    return a


@pytest.mark.multiproc
@pytest.mark.parametrize("kill_at", [3, 5])  # saved at 4 (mid-epoch) and at 6 (an epoch's end)
def test_two_ranks_signal_on_one_rank_resume_bit_identically(ddp_uninterrupted, tmp_path, kill_at):
    a, b = ddp_uninterrupted, tmp_path
    proc = torchrun(SCRIPT, str(b), "--max-steps", str(N), "--kill-at", str(kill_at), "--kill-rank", "1", check=False)
    assert proc.returncode != 0
    # The signal reached rank 1 after step kill_at; the ranks agree on it in the next step's
    # collective, finish that step together and both save it.
    saved = kill_at + 1
    assert link_step(ckpt_root(b)) == saved
    assert re.search(rf"exitcode\s*:\s*{128 + signal.SIGTERM}", proc.stderr), proc.stderr[-3000:]
    torchrun(SCRIPT, str(b), "--max-steps", str(N))
    for rank in (0, 1):
        assert_identical_end(a, b, saved, rank)
    # The two ranks saw disjoint samples.
    s0, s1 = steps(a, 0), steps(a, 1)
    assert not set(s0[1]["indices"]) & set(s1[1]["indices"])
