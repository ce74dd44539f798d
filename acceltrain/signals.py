"""Exit signals before training starts: a clean exit with ``128+signum``, not a kill mid-write.

Once training has begun, :class:`~acceltrain.hooks.CheckpointingHook` owns the exit signals
(flag, agree at the step boundary, save, exit). Before that (tokenizer training, data packing,
building the model, ``prepare``) there is nothing to save, and the defaults are poor: SIGTERM
and SIGUSR1 kill the process wherever it is, SIGINT ends in a ``KeyboardInterrupt`` traceback.
:class:`EarlyExit` installs a handler that raises :class:`InterruptedBeforeTraining` (a
``SystemExit``) instead, so ``finally`` blocks run (atomic writes drop their temporary files,
nothing half-written is left under a final name) and the process exits ``128+signum`` at once.

Only signals still at their default disposition are taken (a handler the user installed, or
``SIG_IGN`` under ``nohup``, is left alone), only from the main thread (where Python delivers
signals), and :meth:`EarlyExit.release` puts the originals back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["EARLY_EXIT_SIGNALS", "EarlyExit", "InterruptedBeforeTraining"]

EARLY_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class InterruptedBeforeTraining(SystemExit):
    """A signal arrived before training started; the exit status is ``128+signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


# The process that installed the handler. Forked children (tokenization workers, DataLoader
# workers) inherit it; when their parent ends them with SIGTERM they must die as by default,
# silently, not announce an early exit of the run.
_owner_pid: int | None = None


def _raise(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _owner_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    # One line, then the exception unwinds the build (finally blocks run) to a plain exit.
    sys.stderr.write(f"{name} before training started: exiting with {128 + signum}; nothing was trained or saved\n")
    sys.stderr.flush()
    raise InterruptedBeforeTraining(signum)


class EarlyExit:
    """Install the before-training handler for ``signals``; ``release()`` restores the originals.

    Example:
        >>> early = EarlyExit()
        >>> early.install()      # tokenizer training, packing, building: a signal exits cleanly
        >>> early.release()      # training begins: CheckpointingHook takes the signals over
    """

    def __init__(self, *, signals: tuple[int, ...] = EARLY_EXIT_SIGNALS) -> None:
        self.signals = signals
        self._originals: dict[int, Any] = {}

    def install(self) -> None:
        """Take every signal of ``signals`` that is still at its default (idempotent)."""
        global _owner_pid
        if threading.current_thread() is not threading.main_thread():
            return
        _owner_pid = os.getpid()
        for signum in self.signals:
            if signum in self._originals:
                continue
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self._originals[signum] = current
                signal.signal(signum, _raise)

    def is_handler(self, handler: Any) -> bool:
        return handler is _raise

    def original(self, signum: int, handler: Any) -> Any:
        """``handler``, or the original it replaced when it is this module's early handler."""
        return self._originals.get(signum, signal.SIG_DFL) if handler is _raise else handler

    def release(self) -> None:
        """Put the original handler back wherever the early one is still installed."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, original in self._originals.items():
            if signal.getsignal(signum) is _raise:
                signal.signal(signum, original)
