"""EmaHook: an exponential moving average of the model's weights, saved in checkpoints."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


class EmaHook(BaseHook):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` every ``update_interval`` steps.

    The average lives in ``hook.ema_model``, a frozen copy of the unwrapped model on ``device``
    (default: the trainer's). Floating-point buffers are averaged too; others are copied. Its
    state goes into checkpoints, so a resumed run continues the same average.

    Args:
        decay: Weight of the old average.
        update_interval: Steps between updates.
        device: Where the copy lives (``"cpu"`` saves accelerator memory).

    Example:
        >>> ema = EmaHook(decay=0.999)
        >>> # after training: ema.ema_model(x)
    """

    def __init__(self, decay: float = 0.9999, update_interval: int = 1, device: str | torch.device | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EmaHook decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.update_interval = update_interval
        self.device = device
        self.ema_model: torch.nn.Module | None = None
        self._pending: dict[str, Any] | None = None

    def _ensure(self, trainer: BaseTrainer) -> None:
        if self.ema_model is None:
            model = trainer.unwrapped_model
            self.ema_model = copy.deepcopy(model).to(self.device or trainer.device).eval()
            self.ema_model.requires_grad_(False)
            if self._pending is not None:
                self.ema_model.load_state_dict(self._pending)
                self._pending = None

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._ensure(trainer)

    @torch.no_grad()
    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.update_interval:
            return
        ema = self.ema_model.state_dict()
        live = trainer.unwrapped_model.state_dict()
        floats_e, floats_l = [], []
        for name, tensor in ema.items():
            source = live[name]
            if tensor.is_floating_point():
                floats_e.append(tensor)
                floats_l.append(source.to(tensor.device, tensor.dtype))
            else:
                tensor.copy_(source)
        torch._foreach_lerp_(floats_e, floats_l, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        if self.ema_model is None:
            return {"ema": self._pending or {}}
        return {"ema": {k: v.detach().cpu() for k, v in self.ema_model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("ema") or None
        if self.ema_model is None:
            self._pending = weights
        elif weights:
            self.ema_model.load_state_dict(weights)
