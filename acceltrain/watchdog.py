"""Ranks that do not outlive their launcher, and collectives that do not wait forever.

Two failures leave a multi-process run hanging with nobody to end it:

- **The launcher dies** (``torchrun`` or ``accelerate launch`` killed with SIGKILL, a node's
  SLURM task killed). ``torchrun`` starts each worker in a session of its own, so the workers
  are not in the launcher's process group and nothing signals them: they are re-parented to
  PID 1 and sleep in their next collective (seen alive 30 minutes later). :class:`LauncherWatchdog`
  asks the kernel for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux) and, as
  a fallback, polls ``os.getppid()`` from a daemon thread: the kernel signal fires when the
  parent *thread* that forked the worker exits, and it is lost if the parent died before the
  call. SIGTERM lets the trainer save at the next step boundary and exit 143; a rank that is
  still alive ``grace`` seconds later (its main thread stuck in a collective, where no Python
  signal handler runs) is ended with ``os._exit(143)``.
- **A peer dies or hangs** mid-step. Gloo's and NCCL's default collective timeouts are 30 and
  10 minutes. :func:`collective_timeout` lowers the process group's timeout while the step loop
  runs (the trainer's ``collective_timeout``, 60 s by default), so a collective whose peer is
  gone raises after that long and the rank exits with the error. Setup keeps the longer timeout
  the group was created with: there one rank may work alone for minutes (tokenizer training
  and packing in ``main_process_first``) while the others wait in a barrier.

``ACCELTRAIN_WATCHDOG=0`` turns the launcher watchdog off.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import threading
from collections.abc import Iterator

import torch

__all__ = ["LauncherWatchdog", "start_launcher_watchdog", "launcher_gone", "set_parent_death_signal",
           "collective_timeout", "process_group_timeout"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits.

    Returns False where that is not possible (not Linux, or ``prctl`` refused). ctypes rather
    than a package: one call into libc, which every Linux Python already links.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class LauncherWatchdog:
    """End this process when the process that launched it is gone.

    Args:
        poll_interval: Seconds between ``os.getppid()`` checks.
        grace: Seconds between the SIGTERM (a chance to save and exit cleanly) and the forced
            exit of a process that is still running.
        signum: The signal sent first (SIGTERM: the trainer's checkpoint hook saves on it).
        use_prctl: Also ask the kernel for ``signum`` on parent death (Linux); off, only the
            polling thread watches.

    Example:
        >>> LauncherWatchdog(grace=30).start()   # in a worker that torchrun started
    """

    def __init__(self, *, poll_interval: float = 1.0, grace: float = 30.0, signum: int = signal.SIGTERM,
                 use_prctl: bool = True) -> None:
        if poll_interval <= 0 or grace < 0:
            raise ValueError(f"poll_interval must be > 0 and grace >= 0, got {poll_interval} and {grace}")
        self.poll_interval = poll_interval
        self.grace = grace
        self.signum = signal.Signals(signum)
        self.use_prctl = use_prctl
        self.parent_pid: int | None = None
        self.prctl_armed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._noticed = threading.Lock()  # the launcher's death is announced once
        self._announced = False

    def start(self) -> LauncherWatchdog:
        """Record the current parent, arm the kernel signal and start the polling thread."""
        if self._thread is not None:
            return self
        self.parent_pid = os.getppid()
        self.prctl_armed = self.use_prctl and set_parent_death_signal(self.signum)
        # A parent that died before prctl was armed changed getppid() already: the first poll sees it.
        self._thread = threading.Thread(target=self._watch, name="acceltrain-launcher-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the kernel signal stays armed: it cannot be told apart from others')."""
        self._stop.set()

    def launcher_gone(self) -> bool:
        """Whether the launcher is gone; the first call that finds it so says it on stderr.

        The trainer's signal handler asks too: the kernel's SIGTERM (prctl) arrives at once, and a
        rank that saves and exits before the next poll would otherwise never say why it stopped.
        """
        if self.parent_pid is None or os.getppid() == self.parent_pid:
            return False
        with self._noticed:
            if not self._announced:
                self._announced = True
                _say(f"acceltrain watchdog: the launcher (pid {self.parent_pid}) of pid {os.getpid()} is gone; "
                     f"sending {self.signum.name} to stop at the next step, forced exit in {self.grace:g} s")
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            if self.launcher_gone():
                self._launcher_gone()
                return

    def _launcher_gone(self) -> None:
        code = 128 + int(self.signum)
        # Sent even when prctl fired already: a second SIGTERM only sets the same stop flag again.
        os.kill(os.getpid(), self.signum)
        if self._stop.wait(self.grace):
            return
        _say(f"acceltrain watchdog: pid {os.getpid()} still running {self.grace:g} s after its launcher died; "
             f"exiting with status {code}")
        os._exit(code)


def _say(message: str) -> None:
    # stderr itself, unbuffered and from this thread: logging may hold locks the main thread owns.
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass


_WATCHDOG: LauncherWatchdog | None = None


def start_launcher_watchdog(*, grace: float = 30.0) -> LauncherWatchdog | None:
    """Start this process's launcher watchdog once (later calls return the same one).

    ``None`` when ``ACCELTRAIN_WATCHDOG=0``. The trainer calls it only for multi-process runs,
    whose parent is a launcher; a single process's parent is often a shell that may exit while
    the run goes on (``nohup``).
    """
    global _WATCHDOG
    if os.environ.get("ACCELTRAIN_WATCHDOG", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _WATCHDOG is None:
        _WATCHDOG = LauncherWatchdog(grace=grace).start()
    return _WATCHDOG


def launcher_gone() -> bool:
    """Whether this process's launcher watchdog finds its launcher gone (announced once)."""
    return _WATCHDOG is not None and _WATCHDOG.launcher_gone()


def process_group_timeout(group: torch.distributed.ProcessGroup | None = None) -> datetime.timedelta | None:
    """The timeout the (default) process group's backend uses now, or None if it cannot be read."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group or dist.group.WORLD
    for device in getattr(group, "_device_types", []):
        try:
            options = getattr(group._get_backend(device), "options", None)
        except RuntimeError:
            continue
        timeout = getattr(options, "_timeout", None)
        if isinstance(timeout, datetime.timedelta):
            return timeout
    return None


@contextlib.contextmanager
def collective_timeout(seconds: float | None) -> Iterator[None]:
    """Run the block with the default process group's timeout set to ``seconds``.

    The earlier timeout comes back when the block ends normally. After an exception the short
    one stays: the teardown that follows must not wait the long one on a peer that is gone.
    Without a process group, or with ``seconds=None``, nothing changes.
    """
    import torch.distributed as dist

    if seconds is None or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    # A private torch API (there is no public setter after init_process_group); wrapped here
    # only, so an upgrade that moves it breaks one place.
    from torch.distributed.distributed_c10d import _set_pg_timeout

    before = process_group_timeout()
    _set_pg_timeout(datetime.timedelta(seconds=seconds))
    yield
    if before is not None:
        _set_pg_timeout(before)
