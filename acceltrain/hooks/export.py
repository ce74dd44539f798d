"""ExportHook: write a Hugging Face folder when training ends (see :func:`acceltrain.export.save_pretrained`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..export import save_pretrained
from ..utils import in_workspace
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

__all__ = ["ExportHook"]


class ExportHook(BaseHook):
    """Save a Hugging Face folder at the end of training (and every ``interval`` steps if set).

    A relative ``path`` is inside the workspace; periodic exports go to ``path/step_{N}``. The
    final export is written when the run reaches ``max_steps`` or stops early on purpose (early
    stopping), not when a signal stopped it (``trainer.stopped_by_signal``: a preemption or a
    cancel, which a resumed run finishes). Every rank must run it (gathering shards is
    collective); in a multi-process run place it after ``CheckpointingHook``, which tells the
    ranks that received no signal about the others'.

    Example:
        >>> ExportHook(path="final")
    """

    def __init__(self, path: str | Path = "final", interval: int | None = None, merge_lora: bool = False):
        self.path = Path(path)
        self.interval = interval
        self.merge_lora = merge_lora

    def _root(self, trainer: BaseTrainer) -> Path:
        return in_workspace(self.path, trainer.workspace)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if self.interval and trainer.step % self.interval == 0 and trainer.step != trainer.max_steps:
            save_pretrained(trainer, self._root(trainer) / f"step_{trainer.step}", merge_lora=self.merge_lora)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        # Finished, or stopped early on purpose (early stopping); not when preempted or cancelled.
        if trainer.step == trainer.max_steps or (trainer.should_stop and not trainer.stopped_by_signal):
            save_pretrained(trainer, self._root(trainer), merge_lora=self.merge_lora)
