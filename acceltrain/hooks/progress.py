"""ProgressHook: a progress bar on a terminal, one line per interval elsewhere."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TextIO

from ..utils import peak_memory_gib
from .base import BaseHook
from .logging import FigureSums

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

_SHOWN_FIRST = ("loss", "grad_norm")


def _fmt(key: str, value: float) -> str:
    if key.startswith("lr"):
        return f"{key} {value:.2e}"
    if key.endswith("_per_s"):
        return f"{key.replace('_per_s', '/s')} {value:,.0f}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
        return f"{key} {value:.3e}"
    return f"{key} {value:.4f}"


class ProgressHook(BaseHook):
    """Show step, step time, data time, ETA, loss, grad norm, LR and memory every ``interval`` steps.

    On a terminal it draws a tqdm bar (updated every step, text every interval); otherwise
    (CI logs, SLURM output) it prints one line per interval::

        Step   100/10000: step 0.2500s data 0.0100s eta 0:41:15 loss 0.5234 grad_norm 2.3456 lr 1.00e-03 mem 1.21GiB

    Only the main process prints. Figures are averaged over the interval on this rank, or over
    all ranks with ``sync=True`` (then every rank must run this hook).

    Args:
        interval: Steps between updates of the text.
        with_records: Also show the records ``forward`` returned.
        sync: Average across ranks (one all-reduce per interval).
        eta_warmup: Steps to skip before measuring the pace for the ETA (compilation, caches).
        bar: Force the tqdm bar on (True) or off (False); ``None`` decides by ``isatty``.
        stream: Where lines go (default ``sys.stdout``).

    Example:
        >>> ProgressHook(interval=10, with_records=True)
    """

    def __init__(
        self,
        interval: int = 10,
        with_records: bool = False,
        sync: bool = False,
        eta_warmup: int = 10,
        bar: bool | None = None,
        stream: TextIO | None = None,
    ):
        if interval < 1:
            raise ValueError(f"ProgressHook interval must be >= 1, got {interval}")
        self.interval = interval
        self.with_records = with_records
        self.sync = sync
        self.eta_warmup = eta_warmup
        self.bar = bar
        self.stream = stream
        self._figures = FigureSums()
        self._pbar = None
        self._warm_time: float | None = None
        self._warm_step = 0

    def on_before_train(self, trainer: BaseTrainer) -> None:
        stream = self.stream or sys.stdout
        self._out = stream
        show_bar = self.bar if self.bar is not None else stream.isatty()
        if show_bar and trainer.is_main_process:
            from tqdm.auto import tqdm

            self._pbar = tqdm(
                total=trainer.max_steps, initial=trainer.step, file=stream, dynamic_ncols=True, unit="step"
            )
        self._warm_time, self._warm_step = None, trainer.step

    def reads_step(self, trainer: BaseTrainer, step: int) -> bool:
        return step % self.interval == 0 or step >= trainer.max_steps

    def on_after_step(self, trainer: BaseTrainer) -> None:
        info = trainer.step_info
        figures = trainer.step_figures()
        if not self.with_records and info.get("records"):
            figures = {k: v for k, v in figures.items() if not k.startswith("records/")}
        self._figures.add(figures)
        if self._pbar is not None:
            self._pbar.update(1)
        if trainer.step - self._warm_step == self.eta_warmup:
            self._warm_time, self._warm_step = time.perf_counter(), trainer.step
        if trainer.step % self.interval == 0 or trainer.step == trainer.max_steps or trainer.should_stop:
            self._report(trainer)

    def _report(self, trainer: BaseTrainer) -> None:
        means = self._figures.means(trainer.device, sync=self.sync and trainer.accelerator.num_processes > 1)
        keys = sorted(means)
        if not trainer.is_main_process:
            return
        parts = [f"step {means.pop('step_time', 0.0):.4f}s", f"data {means.pop('data_time', 0.0):.4f}s"]
        eta = self._eta(trainer)
        if eta is not None:
            parts.append(f"eta {eta}")
        ordered = [k for k in _SHOWN_FIRST if k in means] + [k for k in keys if k in means and k not in _SHOWN_FIRST]
        # Only the first param group's LR: groups usually differ in weight decay, not LR.
        parts += [_fmt(k, means[k]) for k in ordered if k != "max_memory" and not k.startswith("lr_")]
        memory = means.get("max_memory", peak_memory_gib(trainer.device))
        parts.append(f"mem {memory:.2f}GiB")
        if self._pbar is not None:
            self._pbar.set_postfix_str(" ".join(parts[1:]), refresh=False)
            self._pbar.refresh()
        else:
            width = len(str(trainer.max_steps))
            print(f"Step {trainer.step:>{width}}/{trainer.max_steps}: " + " ".join(parts), file=self._out, flush=True)

    def state_dict(self) -> dict[str, Any]:
        # The interval's partial sums, so a resumed run prints the same averages.
        return self._figures.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._figures.load_state_dict(state)

    def _eta(self, trainer: BaseTrainer) -> str | None:
        if self._warm_time is None or trainer.step <= self._warm_step:
            return None
        pace = (time.perf_counter() - self._warm_time) / (trainer.step - self._warm_step)
        return str(timedelta(seconds=round(pace * (trainer.max_steps - trainer.step))))

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
