"""CheckpointingHook: save every ``interval`` steps, resume on start, save and exit on signals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..accelerator_setup import max_over_ranks
from ..checkpoint import (
    MANIFEST,
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    point_link,
    save_checkpoint,
    verify_checkpoint,
)
from ..checkpoint_names import BEST, CHECKPOINTS_SUBDIR, checkpoint_step
from ..utils import flatten_dict, in_workspace, to_float
from ..watchdog import launcher_gone
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class CheckpointingHook(BaseHook):
    """Save the training state every ``interval`` steps and resume from it on the next start.

    Args:
        interval: Steps between saves (the last step is always saved).
        keep_previous: Keep this many newest checkpoints (``None`` keeps all).
        keep_interval: Also keep every checkpoint whose step is a multiple of this.
        path: Folder for checkpoints; a relative path is inside the trainer's workspace
            (default ``workspace/checkpoints``).
        load: ``"latest"`` resumes from the newest valid checkpoint, a path loads that one
            (an error if it is not valid), ``None`` starts fresh.
        exit_signals: On these signals the run stops at the next step boundary (all ranks
            agree), saves, and exits with ``exit_code``. Each signal gets its own handler; the
            previous handlers are restored after training.
        exit_code: ``"128+signal"`` (the shell convention) or a fixed int.
        exit_wait: Seconds to sleep before exiting after a signal-triggered save.
        keep_best: Also keep the ``keep_best`` checkpoints with the best ``metric``
            (``checkpoint_best`` points at the best one).
        metric: A key of the records passed to ``trainer.log`` (e.g. ``"eval/loss"``); the last
            value seen before a save is stored in that checkpoint's manifest.
        mode: ``"min"`` or ``"max"``: which way ``metric`` is better.
        requeue: Under SLURM (``SLURM_JOB_ID`` set), after a save triggered by ``requeue_signal``
            run ``scontrol requeue $SLURM_JOB_ID`` so the job restarts and resumes. Other exit
            signals (TERM, INT: a cancel, a Ctrl-C) save and exit without requeueing. If
            ``scontrol`` fails, a warning says so (exit code and stderr) and ``requeued`` is False.
        requeue_signal: The preemption signal that asks for a requeue: ``SIGUSR1``, what
            ``acceltrain slurm`` renders (``#SBATCH --signal=USR1@N``) and ``acceltrain slurm
            cancel JOB --signal USR1`` sends. It must be one of ``exit_signals`` to have an effect.
        strict: After loading, the next batch's sample indices must match the fingerprint the
            checkpoint recorded; ``False`` warns instead of raising.
        background: Finish saves (fsync, checksums, manifest, rename, retention) on a thread
            while training goes on; training is blocked only for serialisation.

    Example:
        >>> CheckpointingHook(interval=1000, keep_previous=2, keep_interval=5000)
    """

    def __init__(
        self,
        interval: int = 1000,
        keep_previous: int | None = 2,
        keep_interval: int | None = None,
        path: str | Path = CHECKPOINTS_SUBDIR,
        load: str | Path | None = "latest",
        exit_signals: list[int] | tuple[int, ...] | None = _DEFAULT_SIGNALS,
        exit_code: str | int = "128+signal",
        exit_wait: float = 0.0,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        requeue: bool = False,
        requeue_signal: int = signal.SIGUSR1,
        strict: bool = True,
        background: bool = True,
    ):
        if interval < 1:
            raise ValueError(f"CheckpointingHook interval must be >= 1, got {interval}")
        if keep_previous is not None and keep_previous < 1:
            raise ValueError(f"CheckpointingHook keep_previous must be >= 1 or None, got {keep_previous}")
        if keep_best is not None and (keep_best < 1 or not metric):
            raise ValueError("CheckpointingHook keep_best needs an int >= 1 and a metric name")
        if mode not in ("min", "max"):
            raise ValueError(f"CheckpointingHook mode must be 'min' or 'max', got {mode!r}")
        if exit_code != "128+signal" and not isinstance(exit_code, int):
            raise ValueError(f"CheckpointingHook exit_code must be '128+signal' or an int, got {exit_code!r}")
        try:
            requeue_signal = signal.Signals(requeue_signal)
        except ValueError:
            raise ValueError(f"CheckpointingHook requeue_signal must be a signal number, got {requeue_signal!r}") from None
        self.interval = interval
        self.keep_previous = keep_previous
        self.keep_interval = keep_interval
        self.path = Path(path)
        self.load = load
        self.exit_signals = tuple(exit_signals or ())
        self.exit_code = exit_code
        self.exit_wait = exit_wait
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.requeue = requeue
        self.requeue_signal = requeue_signal
        self.requeued: bool | None = None  # after a requeue attempt: did `scontrol requeue` succeed?
        self.strict = strict
        self.background = background
        self._pending = None
        self._metric_value: float | None = None
        self.loaded_from: Path | None = None
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._early_exit: Any = None
        self._last_saved = -1

    def root(self, trainer: BaseTrainer) -> Path:
        return in_workspace(self.path, trainer.workspace)

    # ---------------------------------------------------------------- resume
    def on_before_train(self, trainer: BaseTrainer) -> None:
        if trainer.engine_kind == "deepspeed":
            # A DeepSpeed setup whose state cannot be saved safely is refused now, not at the first save.
            from ..checkpoint_deepspeed import check_supported

            check_supported(trainer)
        self._install_signals(trainer)
        if self.load is None:
            return
        acc = trainer.accelerator
        root = self.root(trainer)
        # One rank checks sizes and CRC32s (reading every file once, not once per rank) and
        # picks; every rank then loads the same folder.
        if self.load == "latest":
            chosen, problem = None, None
            if acc.is_main_process:
                try:
                    chosen = find_latest_checkpoint(root, required="load='latest'")
                except CheckpointError as e:  # every rank must hear it, or the others wait forever
                    problem = f"{e}; repair or remove them, or load=None to start fresh"
            problem = _broadcast_text(trainer, problem)
            if problem is not None:
                raise CheckpointError(problem)
            chosen = _broadcast_path(trainer, chosen)
        else:
            chosen = Path(self.load)
            if not chosen.is_dir():
                raise CheckpointError(f"load={str(self.load)!r}: no such checkpoint folder")
            problem = None
            if acc.is_main_process:
                try:
                    verify_checkpoint(chosen)
                except CheckpointError as e:
                    problem = str(e)
            problem = _broadcast_text(trainer, problem)
            if problem is not None:
                raise CheckpointError(problem)
        if chosen is None:
            return
        load_checkpoint(trainer, chosen, strict=self.strict, verify=False)
        self.loaded_from = chosen
        self._last_saved = trainer.step
        if acc.is_main_process:
            trainer.logger.warning("resumed from %s at step %d", chosen, trainer.step)

    # ---------------------------------------------------------------- saving
    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.interval == 0 or trainer.step == trainer.max_steps:
            self.save(trainer)

    def save(self, trainer: BaseTrainer) -> Path | None:
        """Save now (every rank must call it); a step already saved is not written twice.

        Training waits only for serialisation; fsync, checksums, the manifest, the rename and
        retention finish in the background (``background=False`` waits for all of it). A
        failure there is raised at the next save or at the end of training, never swallowed.
        """
        if trainer.step == self._last_saved:
            return None
        self.wait()
        root = self.root(trainer)
        extra = {"metrics": {self.metric: self._metric_value}} if self.metric else {}
        self._pending = save_checkpoint(trainer, root, extra=extra, background=self.background,
                                        on_complete=lambda _: self._apply_retention(root))
        self._last_saved = trainer.step
        return self._pending.folder

    def invalidate(self) -> None:
        """The state of the step saved last has changed since (an evaluation interrupted after
        the save, see ``EvaluationHook``): the next ``save()`` of this step writes it again."""
        self._last_saved = -1

    def wait(self) -> None:
        """Block until the last save is complete (raising what went wrong in it)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        if self.metric is not None:
            value = flatten_dict(records).get(self.metric)
            if value is not None:
                self._metric_value = to_float(value)

    def _apply_retention(self, root: Path) -> None:
        """Delete what no rule keeps; called only after a save completed."""
        folders = list_checkpoints(root)
        keep = set(folders if self.keep_previous is None else folders[-self.keep_previous:])
        if self.keep_interval:
            keep |= {f for f in folders if checkpoint_step(f) % self.keep_interval == 0}
        if self.keep_best:
            best = self._ranked(folders)
            keep |= set(best[: self.keep_best])
            if best:
                point_link(root, BEST, best[0])
        for folder in folders:
            if folder not in keep:
                shutil.rmtree(folder)

    def _ranked(self, folders: list[Path]) -> list[Path]:
        scored = []
        for folder in folders:
            try:
                value = json.loads((folder / MANIFEST).read_text()).get("metrics", {}).get(self.metric)
            except (OSError, json.JSONDecodeError):
                continue
            if value is not None and math.isfinite(value):
                scored.append((value if self.mode == "min" else -value, checkpoint_step(folder), folder))
        return [f for _, _, f in sorted(scored, key=lambda t: (t[0], -t[1]))]

    # ---------------------------------------------------------------- signals
    def _install_signals(self, trainer: BaseTrainer) -> None:
        for signum in self.exit_signals:
            def handler(received: int, frame: Any, _signum: int = signum) -> None:
                # Only set flags here: the step loop saves at the next step boundary.
                if self._signal is None:
                    self._signal = _signum
                    launcher_gone()  # a SIGTERM from the launcher watchdog says why, once
                trainer.request_stop(f"signal {signal.Signals(_signum).name}", local=True, by_signal=True)

            self._previous_handlers[signum] = signal.signal(signum, handler)
        self._early_exit = getattr(trainer, "_early_exit", None)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous_handlers.items():
            # Not back to the trainer's before-training handler: training has begun.
            previous = self._early_exit.original(signum, previous) if self._early_exit else previous
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def on_teardown(self, trainer: BaseTrainer) -> None:
        self._restore_signals()  # after an exception too: Ctrl-C must work again

    def on_before_step(self, trainer: BaseTrainer) -> None:
        if trainer.step < self._last_saved:
            # A rollback (GuardHook) went back past our last save: the checkpoints after this
            # step hold the abandoned trajectory; retire them so neither resume nor retention
            # prefers them, and let the redone steps be saved again.
            self.wait()
            if trainer.is_main_process:
                for folder in list_checkpoints(self.root(trainer)):
                    if checkpoint_step(folder) > trainer.step:
                        shutil.rmtree(folder)
            self._last_saved = -1

    def on_after_train(self, trainer: BaseTrainer) -> None:
        try:
            if trainer.step != self._last_saved and (self._signal is not None or trainer.should_stop):
                self.save(trainer)
            self.wait()
            trainer.accelerator.wait_for_everyone()  # every rank's last checkpoint is complete
        finally:
            self._restore_signals()
        signum = _agreed_signal(trainer, self._signal)
        if signum is not None:  # also on the ranks that received none: every rank stopped for it
            trainer.stopped_by_signal = True
        under_slurm = self.requeue and os.environ.get("SLURM_JOB_ID")
        if signum is not None and under_slurm and trainer.is_main_process:
            if signum == self.requeue_signal:
                # `scontrol requeue` from inside the job kills it at once: the save above is
                # complete on every rank (save() ends with a barrier) before this runs.
                self.requeued = _scontrol_requeue(trainer, os.environ["SLURM_JOB_ID"])
            else:  # a cancel or Ctrl-C: stop for good
                trainer.logger.warning("%s: saved step %d, not requeueing (only %s requeues the job)",
                                       signal.Signals(signum).name, trainer.step, self.requeue_signal.name)
        if signum is not None:
            if self.exit_wait:
                time.sleep(self.exit_wait)
            # The same code whether or not the requeue worked: the run stopped early either way.
            trainer.exit_code = 128 + signum if self.exit_code == "128+signal" else int(self.exit_code)


def _scontrol_requeue(trainer: BaseTrainer, job: str) -> bool:
    """Run ``scontrol requeue JOB``; on failure warn with its exit code and stderr, return False."""
    trainer.logger.warning("requeueing SLURM job %s after the checkpoint at step %d", job, trainer.step)
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        code, detail = None, str(e)
    else:
        if proc.returncode == 0:
            return True
        code, detail = proc.returncode, " ".join(proc.stderr.split()) or "no output"
    trainer.logger.warning("scontrol requeue %s failed (exit %s: %s): the job is NOT requeued; the checkpoint at "
                           "step %d is saved, resubmit the job to resume from it", job,
                           "none" if code is None else code, detail, trainer.step)
    return False


def _broadcast_text(trainer: BaseTrainer, text: str | None) -> str | None:
    """The main process's ``text`` on every rank."""
    if trainer.accelerator.num_processes == 1:
        return text
    from accelerate.utils import broadcast_object_list

    box = [text]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _broadcast_path(trainer: BaseTrainer, path: Path | None) -> Path | None:
    text = _broadcast_text(trainer, str(path) if path is not None else None)
    return Path(text) if text is not None else None


def _agreed_signal(trainer: BaseTrainer, signum: int | None) -> int | None:
    """The signal any rank received (ranks that got none still exit with it)."""
    if trainer.accelerator.num_processes == 1:
        return signum
    return max_over_ranks(signum or 0, trainer.device) or None
