"""ThroughputHook: tokens per second and model FLOPs utilisation into ``step_info``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


class ThroughputHook(BaseHook):
    """Put ``tokens_per_s`` (all ranks together) and ``mfu`` in ``trainer.step_info`` every step.

    Both come from the trainer's measured step time and host-side numbers only, so they cost
    no device sync. On a GPU a step that does not sync is timed as the host sees it; averaged
    over a logging interval that equals the device's pace (the host cannot run further ahead
    than the launch queue allows), but single steps may read high or low. MFU is ``tokens_per_s * flops_per_token / (peak_flops * world_size)``;
    with ``peak_flops=None`` (an unknown device) only tokens/s is reported.

    Args:
        tokens_per_step: Tokens one optimizer step consumes on all ranks together.
        flops_per_token: Training FLOPs per token (``acceltrain.models.flops_per_token``).
        peak_flops: Peak FLOP/s of one device (``acceltrain.models.device_peak_flops``).

    Example:
        >>> ThroughputHook(tokens_per_step=8 * 1024 * 4, flops_per_token=7.6e8, peak_flops=312e12)
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float | None = None, peak_flops: float | None = None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops

    def on_after_step(self, trainer: BaseTrainer) -> None:
        info = trainer.step_info
        rate = self.tokens_per_step / max(info["step_time"], 1e-12)
        info["tokens_per_s"] = rate
        if self.flops_per_token and self.peak_flops:
            info["mfu"] = rate * self.flops_per_token / (self.peak_flops * trainer.accelerator.num_processes)
