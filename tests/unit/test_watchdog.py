"""acceltrain.watchdog: parent-death detection (kernel signal and polling), the forced exit, and
the step loop's collective timeout."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from acceltrain.watchdog import collective_timeout, process_group_timeout
from tests.conftest import ROOT, free_port
from tests.helpers import ToyTrainer

# A "launcher" that starts the worker, waits for its pid file, then dies without a word.
LAUNCHER = """
import os, subprocess, sys, time
from pathlib import Path
pidfile = Path(sys.argv[1])
subprocess.Popen([sys.executable, "-c", sys.argv[2], str(pidfile)], stderr=open(sys.argv[3], "w"), start_new_session=True)
while not pidfile.exists():
    time.sleep(0.05)
os._exit(0)
"""


def orphan(tmp_path: Path, worker: str) -> tuple[int, Path]:
    """Run ``worker`` under a launcher that then dies; the worker's pid and its stderr file."""
    pidfile, err = tmp_path / "worker.pid", tmp_path / "worker.err"
    body = textwrap.dedent(worker)
    code = (f"import os, sys, time\nfrom pathlib import Path\nsys.path.insert(0, {str(ROOT)!r})\n{body}"
            "\nPath(sys.argv[1]).write_text(str(os.getpid()))\ntime.sleep(600)\n")
    subprocess.run([sys.executable, "-c", LAUNCHER, str(pidfile), code, str(err)], check=True, timeout=60)
    return int(pidfile.read_text()), err


def wait_gone(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        if time.monotonic() - t0 > timeout:
            os.kill(pid, 9)
            raise AssertionError(f"pid {pid} still alive {timeout} s after its launcher died")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_polling_alone_notices_the_launcher_died_and_stops_the_worker(tmp_path):
    pid, err = orphan(tmp_path, """
        from acceltrain.watchdog import LauncherWatchdog
        LauncherWatchdog(poll_interval=0.1, grace=30, use_prctl=False).start()
    """)
    wait_gone(pid, 30)
    text = err.read_text()
    assert "acceltrain watchdog: the launcher (pid " in text and f"of pid {pid} is gone; sending SIGTERM" in text, text
    assert "exiting with status" not in text  # SIGTERM was enough


def test_a_worker_that_cannot_handle_sigterm_is_forced_out_after_the_grace(tmp_path):
    # SIGTERM ignored stands for a main thread stuck in a collective, where no handler runs.
    pid, err = orphan(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from acceltrain.watchdog import LauncherWatchdog
        LauncherWatchdog(poll_interval=0.1, grace=1, use_prctl=False).start()
    """)
    wait_gone(pid, 30)
    text = err.read_text()
    assert f"acceltrain watchdog: pid {pid} still running 1 s after its launcher died; exiting with status 143" in text


def test_the_kernel_signal_alone_ends_the_worker(tmp_path):
    # Polling every 1000 s: only prctl(PR_SET_PDEATHSIG) can end it in time.
    pid, err = orphan(tmp_path, """
        from acceltrain.watchdog import LauncherWatchdog
        w = LauncherWatchdog(poll_interval=1000, grace=1000).start()
        assert w.prctl_armed, "prctl refused"
    """)
    wait_gone(pid, 30)
    assert "prctl refused" not in err.read_text()


def test_bad_settings_are_refused():
    from acceltrain.watchdog import LauncherWatchdog

    with pytest.raises(ValueError, match="poll_interval must be > 0 and grace >= 0, got 0 and 1"):
        LauncherWatchdog(poll_interval=0, grace=1)
    for bad in (0, -1, "60", True, float("inf")):
        with pytest.raises(ValueError, match=f"collective_timeout must be a number of seconds > 0 or None, got {bad!r}"):
            ToyTrainer(max_steps=1, device="cpu", collective_timeout=bad)


@pytest.fixture
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=600))
    yield
    torch.distributed.destroy_process_group()


def test_collective_timeout_is_set_for_the_block_then_restored(process_group):
    assert process_group_timeout() == datetime.timedelta(seconds=600)
    with collective_timeout(7.5):
        assert process_group_timeout() == datetime.timedelta(seconds=7.5)
        torch.distributed.all_reduce(torch.ones(1))
    assert process_group_timeout() == datetime.timedelta(seconds=600)
    with collective_timeout(None):
        assert process_group_timeout() == datetime.timedelta(seconds=600)


def test_after_an_error_the_short_timeout_stays_for_the_teardown(process_group):
    with pytest.raises(KeyError), collective_timeout(5):
        raise KeyError("a collective failed")
    assert process_group_timeout() == datetime.timedelta(seconds=5)


def test_without_a_process_group_nothing_happens():
    assert process_group_timeout() is None
    with collective_timeout(5):
        pass
