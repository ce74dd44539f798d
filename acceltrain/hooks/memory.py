"""CudaMaxMemoryHook: peak memory into ``step_info`` (max allocated on CUDA, peak RSS on CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils import peak_memory_gib
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


class CudaMaxMemoryHook(BaseHook):
    """Put ``max_memory`` (GiB) in ``trainer.step_info`` every ``interval`` steps.

    On CUDA it is ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident
    set size, so the same hook serves both. Reading it does not synchronise the device.

    Example:
        >>> CudaMaxMemoryHook()
    """

    def __init__(self, interval: int = 1):
        self.interval = interval

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.interval == 0:
            trainer.step_info["max_memory"] = peak_memory_gib(trainer.device)
