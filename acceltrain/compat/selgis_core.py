"""SELGIS's ``SelgisCore``: the protection of a hand-written loop, on acceltrain's trainer machinery.

``SelgisCore(model, optimizer, scheduler, config, device)`` builds an acceltrain trainer around
the given model, optimizer and scheduler (prepared through Accelerate, no data of its own) and
each method is one piece of acceltrain's step loop:

- ``get_amp_context()``: the trainer's autocast (``fp16`` / ``bf16`` of the config);
- ``check_loss(loss)``: the non-finite check agreed across ranks, then ``GuardHook``'s spike
  ladder (skip, roll back to the last snapshot and lower the LR, bounded);
- ``backward_step(loss)``: ``accelerator.backward`` of ``loss / gradient_accumulation_steps``,
  under ``no_sync`` on every micro-batch of a window but the last (several processes);
- ``optimizer_step()``: clip the norm (``grad_clip_norm``) and values (``grad_clip_value``),
  the agreed finiteness check, the update, a step-based scheduler, the guard's snapshot;
- ``eval_epoch(metrics, epoch)``: an epoch-based ``SmartScheduler``'s ``step_epoch``, then
  ``EarlyStoppingHook`` with SELGIS's one final surge (best weights back, LR x3);
- ``evaluate(eval_dataloader, ...)`` (acceltrain's addition): the evaluation the ``Trainer``
  runs (``loss``, ``accuracy``), exact across ranks, to feed ``eval_epoch``.

The loop SELGIS documents runs as written::

    core = SelgisCore(model, optimizer, scheduler, config, device)
    for epoch in range(config.max_epochs):
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            with core.get_amp_context():
                loss = criterion(model(x), y)
            if not core.check_loss(loss):
                continue  # skipped or rolled back
            core.backward_step(loss)
            core.optimizer_step()
        status = core.eval_epoch(core.evaluate(eval_loader, criterion), epoch)
        if status == "STOP":
            break
    core.load_best_weights()

The config fields the core reads: ``gradient_accumulation_steps``, ``grad_clip_norm``,
``grad_clip_value``, ``nan_recovery``, ``spike_threshold``, ``min_history_len``,
``state_update_interval``, ``patience``, ``min_delta``, ``fp16`` / ``bf16``, ``device`` and
``label_smoothing`` (``evaluate``'s default loss); a ``SmartScheduler`` reads the schedule fields.
The others shape a whole run (epochs, batch sizes, LR finder, sparsity, logging, saving, seed):
your loop decides them, as the ``Trainer`` does from them.

Where SELGIS and an acceltrain guarantee differ, the guarantee wins:

- a NaN/Inf loss is never back-propagated: ``check_loss`` rolls back (with ``nan_recovery``;
  after 3 rollbacks ``GuardError`` stops the run) or raises ``NonFiniteError`` (without);
- the first spike in a row is skipped without a rollback (``GuardHook``'s ladder), so
  ``check_loss`` returns False for a skip too;
- with ``gradient_accumulation_steps`` k the loss is divided by k here (don't divide it
  yourself); ``optimizer_step`` after n < k micro-batches weighs each 1/n (not under-scaled),
  and under DDP it must follow the k-th ``backward_step`` (earlier ones ran under ``no_sync``);
- the rollback snapshot and the best weights (trainable parameters) are kept on the CPU in
  memory, whatever ``state_storage`` says (that field chooses the ``Trainer``'s checkpoints);
- one process or DDP only: under FSDP or DeepSpeed use the ``Trainer``, which owns the loop.
  Under DDP call ``core.model`` (the wrapped model) in the loop, not your own reference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..evaluation import shard_eval_loader
from ..gradients import PLAIN_GRADS
from ..hooks import GuardHook
from ..hooks.early_stopping import EarlyStoppingHook
from ..trainer import NonFiniteError
from ..utils import to_float
from .selgis_config import SelgisConfig
from .selgis_parts import SmartScheduler, count_parameters

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

__all__ = ["SelgisCore"]

logger = logging.getLogger("acceltrain")
_SURGE = {"lr_factor": 3.0}  # SELGIS's final surge: SmartScheduler.surge_lr's default factor


class SelgisCore:
    """SELGIS's ``SelgisCore(model, optimizer, scheduler, config, device)`` (see the module docstring).

    ``trainer.selgis`` of a SELGIS ``Trainer`` is a ``SelgisCore`` too, a read-only view of the
    protection that runs inside ``Trainer.train()``: its manual-loop methods raise there.

    Args:
        model: The ``nn.Module`` to train (moved to the device).
        optimizer: An optimizer over its parameters (``zero_grad`` it yourself, as in SELGIS).
        scheduler: A ``SmartScheduler``, a torch LR scheduler (stepped by ``optimizer_step``)
            or None.
        config: A ``SelgisConfig`` (default: the defaults).
        device: ``"cpu"``, ``"cuda"``, a ``torch.device``, or None / ``"auto"`` (``config.device``).

    Example:
        >>> core = SelgisCore(model, optimizer, scheduler, SelgisConfig(device="cpu"), "cpu")
        >>> if core.check_loss(loss):
        ...     core.backward_step(loss)
        ...     core.optimizer_step()
    """

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 config: SelgisConfig | None = None, device: torch.device | str | None = None) -> None:
        from .selgis import Trainer, _CoreTrainer

        self._manual = not isinstance(model, Trainer)
        self._early: EarlyStoppingHook | None = None
        self._best_loss: float | None = None
        if not self._manual:  # trainer.selgis
            if any(a is not None for a in (optimizer, scheduler, config, device)):
                raise TypeError("SelgisCore(trainer) takes no other argument: it reports that trainer's protection")
            self.trainer: BaseTrainer = model
            return
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"SelgisCore: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"SelgisCore: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        config = SelgisConfig() if config is None else config
        if not isinstance(config, SelgisConfig):
            raise TypeError(f"SelgisCore: config must be a SelgisConfig, got {type(config).__name__}")
        config.validate()
        inner = scheduler.scheduler if isinstance(scheduler, SmartScheduler) else scheduler
        if inner is not None and not isinstance(inner, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"SelgisCore: scheduler must be a SmartScheduler, a torch LR scheduler or None, "
                            f"got {type(scheduler).__name__}")
        if inner is not None and inner.optimizer is not optimizer:
            raise ValueError("SelgisCore: the scheduler drives another optimizer than the one given")
        if device is None or device == "auto":
            device = None if config.device == "auto" else config.device
        t = _CoreTrainer(model, optimizer, inner, config, device)
        # Refused before build(): FSDP would already have sharded the caller's model, DeepSpeed
        # wrapped it in an engine.
        if t.accelerator.distributed_type not in PLAIN_GRADS:
            raise ValueError(f"SelgisCore: the manual loop runs on one process or under DDP, not "
                             f"{t.accelerator.distributed_type.value}: use Trainer, which owns the loop there")
        t.build()
        self.trainer = t
        self.model, self.optimizer, self.scheduler, self.config = t.model, optimizer, scheduler, config
        self.device = t.device
        # SmartScheduler's epoch mode moves in eval_epoch; anything else follows the updates.
        self._epoch_scheduler = isinstance(scheduler, SmartScheduler) and not scheduler.by_step
        self._guard = next((h for h in t.hooks if isinstance(h, GuardHook)), None)
        if self._guard is not None:
            self._guard.on_before_train(t)  # the first "last good" snapshot
        self._micro = 0  # micro-batches back-propagated since the last update
        self._unsynced = False  # the last backward ran under no_sync
        self._checked = 0  # micro-batches given to check_loss (the guard's batch positions)
        if config.state_storage == "disk":
            logger.info("SelgisCore keeps its rollback snapshot and best weights in memory (state_storage='disk' "
                        "applies to Trainer checkpoints)")

    # ------------------------------------------------------------------ the manual loop
    def _loop(self, what: str) -> BaseTrainer:
        if not self._manual:
            raise RuntimeError(f"trainer.selgis.{what}: the Trainer runs this inside train(); build "
                               "SelgisCore(model, optimizer, scheduler, config, device) for a loop of your own")
        return self.trainer

    def _discard(self) -> None:
        self.trainer._zero_grad()
        self._micro, self._unsynced = 0, False

    def check_loss(self, loss: torch.Tensor) -> bool:
        """True when ``loss`` may be back-propagated; False when it was not finite (the run rolled
        back) or a spike (skipped, or rolled back); the window's gradients are then discarded.

        Raises:
            NonFiniteError: a non-finite loss with ``nan_recovery=False``.
            GuardError: a rollback beyond the bound of 3.
        """
        t = self._loop("check_loss")
        position = self._checked
        self._checked += 1
        t.step_info = {"loss": loss.detach(), "batches": [position]}
        finite, _, _ = t._agree(loss.detach().float(), 1)  # one read; agreed across ranks
        if not finite:
            self._discard()
            if self._guard is None:
                raise NonFiniteError(f"step {t.step + 1}: non-finite loss (micro-batch {position}) with "
                                     "nan_recovery=False: acceltrain never back-propagates it")
            self._guard.on_non_finite(t, "non-finite loss", [position])
            return False
        if self._guard is None:
            return True
        t._skip_reason = None
        self._guard.on_before_optimizer_step(t)
        if t._skip_reason is not None:
            self._discard()
            return False
        return True

    def backward_step(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate one micro-batch's loss, divided by ``gradient_accumulation_steps``."""
        t = self._loop("backward_step")
        k = t.gradient_accumulation_steps
        unsynced = t._use_no_sync and self._micro < k - 1
        with t.accelerator.no_sync(t.model) if unsynced else contextlib.nullcontext():
            t.accelerator.backward(loss if k == 1 else loss * (1.0 / k), retain_graph=retain_graph)
        self._micro += 1
        self._unsynced = unsynced

    def optimizer_step(self) -> bool:
        """Clip, check and apply the accumulated update; True if it was applied.

        False: nothing was back-propagated since the last update, or the gradients were not
        finite (an fp16 overflow lowers the scale; otherwise the guard rolls back).

        Raises:
            RuntimeError: under DDP, before the window's last ``backward_step``.
            NonFiniteError: non-finite gradients with ``nan_recovery=False``.
        """
        t = self._loop("optimizer_step")
        n, k = self._micro, t.gradient_accumulation_steps
        if n == 0:
            return False
        if self._unsynced:
            raise RuntimeError(f"optimizer_step after {n} of {k} backward_step calls: under DDP the window's "
                               "gradients are synchronised by its last backward (no_sync before it); call "
                               "optimizer_step every gradient_accumulation_steps backward_steps")
        if n != k:  # a partial window weighs each micro-batch 1/n, as the trainer's loop does
            torch._foreach_mul_([p.grad for p in t.trainable_parameters if p.grad is not None], k / n)
        grad_norm = t._grad_norm()  # clips to grad_clip_norm (after unscaling fp16)
        finite, _, _ = t._agree(grad_norm, n)
        self._micro = 0
        if not finite:
            t._zero_grad()
            if t.grad_scaler is not None:  # an fp16 overflow: routine, the scaler lowers its scale
                t.grad_scaler.update()
                return False
            if self._guard is None:
                raise NonFiniteError(f"step {t.step + 1}: non-finite gradients with nan_recovery=False")
            self._guard.on_non_finite(t, "non-finite gradients", list(t.step_info.get("batches", [])))
            return False
        if self.config.grad_clip_value is not None:
            t.accelerator.clip_grad_value_(t.trainable_parameters, self.config.grad_clip_value)
        t._optimizer_step()
        if t.unwrapped_scheduler is not None and not self._epoch_scheduler:
            t.unwrapped_scheduler.step()
        t._zero_grad()
        t.step += 1
        if self._guard is not None:
            self._guard.on_after_step(t)  # the "last good" snapshot every state_update_interval
        return True

    def evaluate(self, eval_dataloader: torch.utils.data.DataLoader, criterion: Callable | None = None,
                 forward_fn: Callable | None = None, compute_metrics: Callable | None = None) -> dict[str, float]:
        """The ``Trainer``'s evaluation over ``eval_dataloader``: ``loss`` and, for ``(N, C)``
        logits with integer labels, ``accuracy`` (or ``compute_metrics``'s); exact across ranks.

        The batches are read as the ``Trainer`` reads them: ``criterion(model(*inputs), labels)``,
        ``forward_fn(model, batch)``, or the model's own loss (cross-entropy with
        ``label_smoothing`` for ``(inputs, labels)`` when none is given).
        """
        t = self._loop("evaluate")
        if not isinstance(eval_dataloader, torch.utils.data.DataLoader):
            raise TypeError(f"evaluate: eval_dataloader must be a DataLoader, got {type(eval_dataloader).__name__}")
        acc = t.accelerator
        t.criterion, t.forward_fn, t.compute_metrics = criterion, forward_fn, compute_metrics
        t._eval_loader = eval_dataloader
        t.eval_data_loader = shard_eval_loader(eval_dataloader, acc.num_processes, acc.process_index)
        return t.evaluate()

    def eval_epoch(self, metrics: dict[str, Any], epoch: int, primary_metric: str = "accuracy",
                   higher_is_better: bool = True) -> Literal["IMPROVED", "SURGE", "STOP", "CONTINUE"]:
        """End of ``epoch``: step an epoch-based ``SmartScheduler``, then judge ``metrics[primary_metric]``.

        ``IMPROVED``: better than the best by more than ``min_delta`` (the trainable weights are
        kept); after ``patience`` epochs without, ``SURGE`` once (the best weights come back and
        the LR is tripled for the rest of the run), then ``STOP`` after ``patience`` more;
        ``CONTINUE`` otherwise.
        """
        t = self._loop("eval_epoch")
        if primary_metric not in metrics:
            raise KeyError(f"eval_epoch: primary_metric {primary_metric!r} is not among the metrics {sorted(metrics)}")
        if self._epoch_scheduler:
            self.scheduler.step_epoch(epoch)
        mode = "max" if higher_is_better else "min"
        early = self._early
        if early is None:
            early = self._early = EarlyStoppingHook(self.config.patience, min_delta=self.config.min_delta,
                                                    metric=primary_metric, mode=mode, restore_best=False,
                                                    best_weights="trainable", final_surge=dict(_SURGE))
        elif (early.metric, early.mode) != (primary_metric, mode):
            raise ValueError(f"eval_epoch: primary_metric={primary_metric!r} ({mode}) after {early.metric!r} "
                             f"({early.mode}) in earlier epochs; judge one metric throughout")
        if "loss" in metrics:
            loss = to_float(metrics["loss"])
            if self._best_loss is None or loss < self._best_loss:
                self._best_loss = loss
        value = to_float(metrics[primary_metric])
        improved, surged = early.is_improvement(value), early.surged
        early.on_log(t, {primary_metric: value})
        if improved:
            return "IMPROVED"
        if early.stopped_step is not None:
            return "STOP"
        return "SURGE" if early.surged and not surged else "CONTINUE"

    # ------------------------------------------------------------------ both kinds
    def _stopper(self) -> EarlyStoppingHook | None:
        if self._manual:
            return self._early
        return next((h for h in self.trainer.hooks if type(h) is EarlyStoppingHook), None)

    @property
    def best_metric(self) -> float | None:
        """The best primary metric so far (a Trainer's: ``eval/loss``); None before any."""
        hook = self._stopper()
        return hook.best if hook is not None else None

    @property
    def best_loss(self) -> float | None:
        """The lowest evaluation ``loss`` so far; None before any."""
        return self._best_loss if self._manual else self.best_metric

    @property
    def trainable_params_count(self) -> int:
        return count_parameters(self.trainer.unwrapped_model, trainable_only=True)

    @property
    def total_params_count(self) -> int:
        return count_parameters(self.trainer.unwrapped_model, trainable_only=False)

    def load_best_weights(self) -> bool:
        """Load the best evaluated weights back; False when none were kept."""
        hook = self._stopper()
        if hook is None or not hook._weights:
            return False
        hook._load_weights(self.trainer)
        return True

    def get_amp_context(self) -> Any:
        """The trainer's autocast (``fp16`` / ``bf16``), or a null context."""
        return self.trainer.autocast()
