"""Two CPU ranks under torchrun: a dead launcher or a hung peer does not leave ranks behind.

Tried as a new user would: after SIGKILL of `torchrun` itself its two workers, re-parented to
PID 1, were still alive 14 minutes later, asleep in a collective. Now each rank's launcher
watchdog stops it (SIGTERM: save at the step boundary, exit) and the loop's collective timeout
ends a rank whose peer stopped answering.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port
from tests.helpers import STEP_GLOB, ckpt_root

SCRIPT = Path(__file__).parent / "scripts" / "watchdog_run.py"
pytestmark = pytest.mark.multiproc


def start(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = out / "torchrun.log"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(SCRIPT), str(out), *args]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, log


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path) -> float:
    """Poll ``check`` until it holds; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return time.monotonic() - t0


def steps(out: Path) -> list[int]:
    return [int(p.read_text().split()[0]) if p.exists() and p.read_text() else 0
            for p in (out / "rank0.step", out / "rank1.step")]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_torchrun_leaves_no_worker_alive(tmp_path: Path):
    proc, log = start(tmp_path, "--checkpoints")
    workers: list[int] = []
    try:
        wait_for("both ranks to pass step 3", lambda: min(steps(tmp_path)) >= 3, 120, log)
        workers = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
        assert all(psutil.Process(w).ppid() == proc.pid for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The bound the README states for a rank whose launcher died.
        took = wait_for("both workers to exit", lambda: not any(alive(w) for w in workers), 120, log)
    finally:
        for w in workers:  # never leave them behind, whatever failed
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert took < 120
    # SIGTERM from the watchdog reached the checkpoint hook: both ranks agreed and saved one step.
    saved = sorted(ckpt_root(tmp_path / "run").glob(STEP_GLOB))
    assert len(saved) == 1, (saved, log.read_text()[-3000:])
    assert int(saved[0].name.rsplit("_", 1)[1]) >= 3
    # Each worker said why it stopped, once: the kernel's SIGTERM reached the checkpoint hook's
    # handler, which asks the watchdog; its polling thread, a moment later, does not repeat it.
    text = log.read_text()
    for w in workers:
        assert text.count(f"acceltrain watchdog: the launcher (pid {proc.pid}) of pid {w} is gone") == 1, text[-3000:]


def test_a_hung_peer_ends_the_run_after_the_collective_timeout(tmp_path: Path):
    # Rank 1 sleeps at step 5 with its sockets open; rank 0 waits in the next step's all-reduce.
    proc, log = start(tmp_path, "--hang_rank", "1", "--hang_at", "5", "--collective_timeout", "3")
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    error = json.loads((tmp_path / "rank0.json").read_text())
    assert "timed out" in error["error"].lower() or "timeout" in error["error"].lower(), error
    hung_at = float((tmp_path / "rank1.step").read_text().split()[1])
    # 3 s of collective timeout, plus a loaded machine's scheduling: far from gloo's 30 minutes.
    assert error["time"] - hung_at < 30, error["time"] - hung_at
    assert not any(alive(int((tmp_path / f"rank{r}.pid").read_text())) for r in (0, 1))
