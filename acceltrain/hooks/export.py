"""ExportHook: write a Hugging Face folder when training ends (see :func:`acceltrain.export.save_pretrained`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..accelerator_setup import max_over_ranks
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
    collective). A signal may reach only some ranks: the ranks agree on it (one small all-reduce
    when training ends), so they all export or none does, wherever the hook sits in ``hooks``.

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
        if trainer.step == trainer.max_steps or (trainer.should_stop and not _any_rank_signalled(trainer)):
            save_pretrained(trainer, self._root(trainer), merge_lora=self.merge_lora)


def _any_rank_signalled(trainer: BaseTrainer) -> bool:
    """Whether a signal stopped any rank (the ranks that received none know only after this)."""
    return bool(max_over_ranks(int(trainer.stopped_by_signal), trainer.device))
