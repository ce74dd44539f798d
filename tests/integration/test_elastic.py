"""Elastic resume: a checkpoint of W processes continues on W' with the same global sample order.

DDP (gloo, torchrun) 2 -> 1 and 1 -> 2: the samples of every step after the resume are, set for
set, the uninterrupted run's; losses and final weights equal it to 1e-5 (the reduction order
differs, so not bitwise). Dropout is off here: a resized run's new ranks have new dropout
streams (documented), while the data order is the same. FSDP2 2 -> 1 and 1 -> 2: the weights
and AdamW state as loaded equal the saved shards reassembled, exactly. A global batch no
accumulation can keep is refused (exit 2, both batch sizes named, nothing touched) unless
allowed. DeepSpeed ZeRO-2/3 2 -> 1 and 1 -> 2 (re-partitioned): tests/integration/test_deepspeed_cpu.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.helpers import ckpt_root, link_step, run_step_dir, saved_steps, step_dir

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
N = 10
NO_DROPOUT = ("--dropout", "0")
LOG = ("--log-interval", "3")  # a LoggingHook whose interval 4-6 spans the resume after step 4
pytestmark = pytest.mark.multiproc


def single(workspace: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(workspace), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc


def steps(workspace: Path, world: int) -> dict[int, dict]:
    """Per step: the samples of all ranks (a set) and the mean of the ranks' losses (the global mean)."""
    out: dict[int, dict] = {}
    for rank in range(world):
        for line in (workspace / f"steps_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[rank] = rec  # the last record of a step wins
    return {s: {"indices": sorted(i for r in recs.values() for i in r["indices"]),
                "loss": sum(r["loss"] for r in recs.values()) / len(recs), "lr": recs[0]["lr"], "ranks": len(recs)}
            for s, recs in out.items()}


def assert_same_stream(a: dict[int, dict], b: dict[int, dict], after: int) -> None:
    assert sorted(b) == list(range(1, N + 1))
    for s in range(after + 1, N + 1):
        assert b[s]["indices"] == a[s]["indices"], f"step {s}"
        assert abs(b[s]["loss"] - a[s]["loss"]) <= 1e-5, (s, b[s]["loss"], a[s]["loss"])
        assert b[s]["lr"] == a[s]["lr"], s


def assert_close_final(a: Path, b: Path) -> None:
    fa, fb = (torch.load(w / "final_full.pt", weights_only=True) for w in (a, b))
    assert fa["step"] == fb["step"] == N
    for name, tensor in fa["model"].items():
        torch.testing.assert_close(fb["model"][name], tensor, atol=1e-5, rtol=0)
    for fqn, st in fa["optimizer"]["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(fb["optimizer"]["state"][fqn][key], value, atol=1e-5, rtol=0)


def logged_losses(ws: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in map(json.loads, (ws / "metrics.jsonl").read_text().splitlines())}


def assert_same_logged_losses(a: Path, b: Path) -> None:
    """The LoggingHook's interval averages, the one that spans the resize included: the saved
    ranks' partial sums went to one rank, neither lost nor counted twice (BaseHook.resize_state)."""
    la, lb = logged_losses(a), logged_losses(b)
    assert sorted(la) == sorted(lb) == [3, 6, 9, 10]  # and N: the last interval is logged when training ends
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])


def kill_and_resume_line(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stderr.splitlines() if "-process checkpoint at step" in line)


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory) -> Path:
    a = tmp_path_factory.mktemp("ddp2_uninterrupted")
    torchrun(SCRIPT, str(a), "--max-steps", str(N), *NO_DROPOUT, *LOG)
    return a


@pytest.fixture(scope="module")
def ddp2_at_4(tmp_path_factory) -> Path:
    """A 2-rank run signalled after step 3 (rank 1): both ranks save step 4."""
    b = tmp_path_factory.mktemp("ddp2_at_4")
    proc = torchrun(SCRIPT, str(b), "--max-steps", str(N), *NO_DROPOUT, *LOG, "--kill-at", "3", "--kill-rank", "1",
                    check=False)
    assert proc.returncode != 0
    assert link_step(ckpt_root(b)) == 4
    return b


def test_two_ranks_resumed_on_one_continue_the_global_order(ddp2, ddp2_at_4, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(ddp2_at_4, b, symlinks=True)
    manifest = json.loads((run_step_dir(b, 4) / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["batch"] == {"micro_batch": 4, "accumulation": 2, "global_batch": 16}
    assert manifest["sampler"] == {"layout": "global", "num_replicas": 2, "dataset_len": 96, "shuffle": True,
                                   "drop_last": True, "seed": manifest["sampler"]["seed"]}
    proc = single(b, "--max-steps", str(N), *NO_DROPOUT, *LOG)
    assert kill_and_resume_line(proc).endswith(
        "resumed on 1 process from a 2-process checkpoint at step 4: accumulation 2 -> 4, same 16 samples per step")
    # Steps 5.. ran on one rank (4 micro-batches each), and drew what the two ranks would have.
    b_steps = steps(b, 1)
    assert all(len(b_steps[s]["indices"]) == 16 for s in range(5, N + 1))
    assert_same_stream(steps(ddp2, 2), b_steps, after=4)
    assert_close_final(ddp2, b)


def test_an_interval_average_that_spans_a_resize_is_the_uninterrupted_ones(ddp2, tmp_path):
    """The uninterrupted 2-rank run's periodic step-4 checkpoint holds each rank's partial sums of
    the logging interval 4-6; resumed on one process (everything after step 4 removed, as after
    a kill -9), the averages logged at 6, 9 and 10 are the 2-rank run's."""
    b = tmp_path / "b"
    shutil.copytree(ddp2, b, symlinks=True)
    from acceltrain.checkpoint import LATEST, point_link

    root = ckpt_root(b)
    for step in saved_steps(root):
        if step > 4:
            shutil.rmtree(step_dir(root, step))
    point_link(root, LATEST, step_dir(root, 4))
    lines = (b / "metrics.jsonl").read_text().splitlines()
    (b / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= 4))
    single(b, "--max-steps", str(N), *NO_DROPOUT, *LOG)
    assert_same_logged_losses(ddp2, b)


def test_one_rank_resumed_on_two_continue_the_global_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    single(a, "--max-steps", str(N), *NO_DROPOUT, *LOG, "--accum", "4")
    single(b, "--max-steps", str(N), *NO_DROPOUT, *LOG, "--accum", "4", "--kill-at", "4", expect=143)
    proc = torchrun(SCRIPT, str(b), "--max-steps", str(N), *NO_DROPOUT, *LOG, "--accum", "4")
    assert kill_and_resume_line(proc).endswith(
        "resumed on 2 processes from a 1-process checkpoint at step 4: accumulation 4 -> 2, same 16 samples per step")
    b_steps = steps(b, 2)
    assert all(b_steps[s]["ranks"] == 2 for s in range(5, N + 1))
    assert_same_stream(steps(a, 1), b_steps, after=4)
    assert_close_final(a, b)
    assert_same_logged_losses(a, b)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def test_a_global_batch_no_accumulation_keeps_is_refused_unless_allowed(ddp2, ddp2_at_4, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(ddp2_at_4, b, symlinks=True)
    before = _snapshot(b)
    proc = single(b, "--max-steps", str(N), *NO_DROPOUT, "--batch-size", "3", expect=2)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run_step_dir(b, 4)}: saved with 16 samples per step (4 per process x "
        "accumulation 2 x 2 processes); on 1 process with micro-batch 3 a step is a multiple of 3 samples, so no "
        "accumulation keeps 16 (this run would use 6): resume on a number of processes that keeps it, or pass "
        "--allow_global_batch_change true (allow_global_batch_change=True) to continue with the new global batch")
    assert _snapshot(b) == before  # the run folder is untouched
    proc = single(b, "--max-steps", str(N), *NO_DROPOUT, "--batch-size", "3", "--allow-global-batch-change")
    assert kill_and_resume_line(proc).endswith(
        "resumed on 1 process from a 2-process checkpoint at step 4: 16 -> 6 samples per step "
        "(allow_global_batch_change), accumulation 2")
    b_steps = steps(b, 1)
    # The global order goes on from sample 64 of the epoch (the 32 samples the 2-rank run drew at
    # steps 5 and 6), 6 samples per step now: steps 5-9 take 30 of them, none seen before.
    rest_of_epoch = set(steps(ddp2, 2)[5]["indices"] + steps(ddp2, 2)[6]["indices"])
    drawn = [i for s in range(5, 10) for i in b_steps[s]["indices"]]
    assert [len(b_steps[s]["indices"]) for s in range(5, 10)] == [6] * 5
    assert len(set(drawn)) == 30 and set(drawn) <= rest_of_epoch
