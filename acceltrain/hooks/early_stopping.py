"""EarlyStoppingHook: stop when a logged metric stops improving, and keep the best weights."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..utils import flatten_dict, to_float
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


class EarlyStoppingHook(BaseHook):
    """Stop training after ``patience`` evaluations without an improvement larger than ``min_delta``.

    It watches the records passed to ``trainer.log`` (``EvaluationHook`` logs ``{"eval": {...}}``,
    so the default metric is ``"eval/loss"``); records without ``metric`` are ignored, and a
    non-finite value counts as no improvement. Every rank sees the same reduced evaluation
    metrics, so every rank reaches the same decision and calls ``trainer.request_stop`` at the
    same step (``not_main_process`` only means "do not write", so it is not consulted).

    Best weights: on every improvement a CPU copy of the unwrapped model's ``state_dict()`` (or
    of its trainable parameters only) is kept; with ``restore_best`` it is loaded back after
    training (``on_after_train``, also after an early stop). Put this hook after a
    ``CheckpointingHook`` so that the final checkpoint holds the last state, not the restored
    one. The state (best value and step, bad count, best weights) is saved in checkpoints.

    Final surge (SELGIS): ``final_surge={"lr_factor": 3.0, "patience": 2}`` gives the run one
    more chance the first time patience runs out: the best weights are loaded back (if kept),
    the LR is multiplied by ``lr_factor`` for the rest of the run
    (:func:`acceltrain.schedules.surge_lr`: persistent and saved with the scheduler), the bad
    count restarts, and training stops when ``patience`` (default: the main one) further
    evaluations bring no improvement.

    Args:
        patience: Evaluations without improvement before stopping (>= 1).
        min_delta: An improvement must beat the best by more than this.
        metric: Flattened key of the logged records.
        mode: ``"min"`` or ``"max"``.
        restore_best: Load the best weights back at the end of training.
        best_weights: ``"all"`` (the full ``state_dict``, buffers included) or ``"trainable"``
            (parameters with ``requires_grad``: small for LoRA).
        final_surge: ``None`` or ``{"lr_factor": float > 1, "patience": int (optional)}``.

    Example:
        >>> hooks = [EvaluationHook(interval=100), EarlyStoppingHook(patience=3, min_delta=1e-3)]
    """

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "eval/loss", mode: str = "min",
                 restore_best: bool = True, best_weights: str = "all",
                 final_surge: dict[str, Any] | None = None) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStoppingHook patience must be an int >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStoppingHook min_delta must be >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStoppingHook mode must be 'min' or 'max', got {mode!r}")
        if best_weights not in ("all", "trainable"):
            raise ValueError(f"EarlyStoppingHook best_weights must be 'all' or 'trainable', got {best_weights!r}")
        if final_surge is not None:
            unknown = set(final_surge) - {"lr_factor", "patience"}
            if unknown or not final_surge.get("lr_factor", 0) > 1:
                raise ValueError("EarlyStoppingHook final_surge must be {'lr_factor': > 1, 'patience': int >= 1 "
                                 f"(optional)}}, got {final_surge!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.metric = metric
        self.mode = mode
        self.restore_best = restore_best
        self.best_weights = best_weights
        self.final_surge = dict(final_surge) if final_surge is not None else None
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_count = 0
        self.surged = False
        self.stopped_step: int | None = None
        self._weights: dict[str, torch.Tensor] = {}

    @property
    def limit(self) -> int:
        """Evaluations without improvement that stop the run now (after a surge: the surge's patience)."""
        if self.surged and self.final_surge is not None:
            return int(self.final_surge.get("patience", self.patience))
        return self.patience

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        value = flatten_dict(records).get(self.metric)
        if value is None:
            return
        value = to_float(value)
        if self.is_improvement(value):
            self.best, self.best_step, self.bad_count = value, trainer.step, 0
            if self.restore_best or self.final_surge is not None:
                self._weights = self._copy_weights(trainer)
            return
        self.bad_count += 1
        if self.bad_count < self.limit:
            return
        if self.final_surge is not None and not self.surged:
            self._surge(trainer)
            return
        self.stopped_step = trainer.step
        trainer.request_stop(
            f"early stopping: {self.metric} did not improve on {self.best} (step {self.best_step}) "
            f"for {self.bad_count} evaluations"
        )

    def _surge(self, trainer: BaseTrainer) -> None:
        from ..schedules import surge_lr

        self.surged, self.bad_count = True, 0
        if self._weights:
            self._load_weights(trainer)
        lr = surge_lr(trainer, float(self.final_surge["lr_factor"]))
        if trainer.is_main_process:
            trainer.logger.warning("final surge at step %d: best %s weights from step %s, LR x%s -> %.3g",
                                   trainer.step, self.metric, self.best_step, self.final_surge["lr_factor"], lr)

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        # A run that had already stopped early stays stopped when it is resumed.
        if self.stopped_step is not None:
            trainer.request_stop(f"early stopping: already stopped at step {self.stopped_step}")

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self.restore_best and self._weights:
            self._load_weights(trainer)
            if trainer.is_main_process:
                trainer.logger.info("restored the best weights (%s %s at step %s)", self.metric, self.best,
                                    self.best_step)

    @torch.no_grad()
    def _copy_weights(self, trainer: BaseTrainer) -> dict[str, torch.Tensor]:
        model = trainer.unwrapped_model
        if self.best_weights == "trainable":
            items = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
        else:
            items = list(model.state_dict().items())
        return {k: v.detach().to("cpu", copy=True) for k, v in items}

    def _load_weights(self, trainer: BaseTrainer) -> None:
        # load_state_dict copies into the existing tensors, so the optimizer still holds them.
        result = trainer.unwrapped_model.load_state_dict(self._weights, strict=self.best_weights == "all")
        if result.unexpected_keys:
            raise RuntimeError(f"EarlyStoppingHook: the best weights do not fit the model: {result.unexpected_keys}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_count": self.bad_count,
            "surged": self.surged,
            "stopped_step": self.stopped_step,
            "best_weights": dict(self._weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.bad_count = int(state.get("bad_count", 0))
        self.surged = bool(state.get("surged", False))
        self.stopped_step = None if state.get("stopped_step") is None else int(state["stopped_step"])
        self._weights = dict(state.get("best_weights") or {})
