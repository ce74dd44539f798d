"""Transformer Builder's PyTorch Lightning lines, for those who keep Lightning's loop.

``from acceltrain.compat.tb_lightning import UniversalModelAdapter, AdaptiveTokenizerDataModule``
gives the seed's adapter as a ``LightningModule`` and its data module as a
``LightningDataModule``, so the documented lines run as written::

    adapter = UniversalModelAdapter(model=your_model, learning_rate=1e-4, vocab_size=50257, warmup_steps=500)
    trainer = pl.Trainer(max_epochs=3)
    trainer.fit(adapter, datamodule)

They are the classes of :mod:`acceltrain.compat.transformer_builder` (same forward, loss,
generation, packed windows) with Lightning's base added; the optimizer and schedule are
acceltrain's (AdamW without decay on 1-D parameters, :func:`acceltrain.schedules.build_schedule`
warmup then cosine over Lightning's ``estimated_stepping_batches``, stepped every update).
Lightning then owns the loop, precision and checkpoints (``.ckpt`` files, which acceltrain's
``CheckpointManager`` does not read: they are pickles). Without Lightning, train the same
adapter with ``train_model`` / ``TrainingCoordinator``: acceltrain's loop, exact resume.

Needs ``pip install 'acceltrain[lightning]'`` (``pytorch_lightning`` 2.x: about 20 s to install,
pure Python; it is imported only when this module is).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    import pytorch_lightning as pl
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("acceltrain.compat.tb_lightning needs PyTorch Lightning: "
                      "pip install 'acceltrain[lightning]' (or train with transformer_builder.train_model)") from e

from ..schedules import build_schedule
from . import tb_parts

__all__ = ["UniversalModelAdapter", "AdaptiveTokenizerDataModule"]

logger = logging.getLogger("acceltrain")


class UniversalModelAdapter(tb_parts.UniversalModelAdapter, pl.LightningModule):
    """The seed's adapter as a ``LightningModule``: ``training_step`` logs ``train_loss``,
    ``validation_step`` logs ``val_loss`` (what ``ModelCheckpoint(monitor="val_loss")`` watches)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)["loss"]
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)["loss"]
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """AdamW and the warmup + cosine schedule over the run's updates, stepped per update."""
        if self._trainer is not None:  # attached: the run's real length (epochs x batches / accumulation)
            self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps
        if warmup >= self.total_steps > 1:
            warmup = self.total_steps - 1
            logger.info("warmup_steps %d >= the run's %d updates: warming up over %d", self.warmup_steps,
                        self.total_steps, warmup)
        opt = self._adamw()
        sched = build_schedule(opt, "cosine", self.total_steps, warmup_steps=warmup)
        return [opt], [{"scheduler": sched, "interval": "step"}]


class AdaptiveTokenizerDataModule(tb_parts.AdaptiveTokenizerDataModule, pl.LightningDataModule):
    """The seed's data module (packed windows, held-out end) as a ``LightningDataModule``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pl.LightningDataModule.__init__(self)
        tb_parts.AdaptiveTokenizerDataModule.__init__(self, *args, **kwargs)
