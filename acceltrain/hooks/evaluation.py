"""EvaluationHook: evaluate every ``interval`` steps, log the metrics, and finish an evaluation
that a stop request interrupted when the run resumes (see :mod:`acceltrain.evaluation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..evaluation import EvalProgress, EvaluationInterrupted, continuing
from ..utils import to_float
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

__all__ = ["EvaluationHook"]


class EvaluationHook(BaseHook):
    """Run ``trainer.evaluate()`` every ``interval`` steps (and after the last step) and log it.

    The metrics are logged under ``eval/`` (so ``CheckpointingHook(metric="eval/loss")`` and
    early stopping can use them), kept in ``hook.history`` and printed on the main process.
    Every rank must run this hook.

    A stop request that arrives during an evaluation (a signal caught by ``CheckpointingHook``)
    ends it after the current batch: the hook keeps how far it got (``hook.pending``, part of
    its state, so the checkpoint written on the way out holds it), and a run resumed from that
    checkpoint finishes the evaluation from the next batch before its first training step.
    Metrics and the training that follows equal the uninterrupted run's exactly.

    Example:
        >>> EvaluationHook(interval=200)
    """

    def __init__(self, interval: int = 1000, at_end: bool = True, prefix: str = "eval", interruptible: bool = True):
        if interval < 1:
            raise ValueError(f"EvaluationHook interval must be >= 1, got {interval}")
        self.interval, self.at_end, self.prefix = interval, at_end, prefix
        self.interruptible = interruptible
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last: dict[str, float] | None = None
        self.pending: EvalProgress | None = None  # an evaluation a stop request interrupted
        self._started = False

    def on_after_step(self, trainer: BaseTrainer) -> None:
        last = trainer.step == trainer.max_steps and self.at_end
        if trainer.step % self.interval == 0 or last:
            self.run(trainer)

    def run(self, trainer: BaseTrainer, progress: EvalProgress | None = None) -> dict[str, float] | None:
        """Evaluate now (or continue ``progress``); returns the metrics, or None if interrupted.

        Through ``trainer.evaluate()``, so a recipe's override (adding perplexity, say) applies."""
        # The trainer's evaluate() takes no arguments (recipes override it): the position to
        # continue from travels beside it, for evaluation.evaluate() to pick up.
        try:
            with continuing(progress, interruptible=self.interruptible):
                metrics = trainer.evaluate()
        except EvaluationInterrupted as stop:
            metrics, state = None, stop.progress
        if metrics is None:
            self.pending = state
            # A checkpoint of this step may be written already (a hook before this one): it
            # must be written again, with this evaluation's position in it.
            for hook in trainer.hooks:
                if callable(getattr(hook, "invalidate", None)):
                    hook.invalidate()
            if trainer.is_main_process:
                print(f"Eval  {trainer.step}/{trainer.max_steps}: interrupted after batch {state.batches} of "
                      f"{len(trainer.eval_data_loader)}; a resumed run continues from there", flush=True)
            return None
        self.pending = None
        self.last = metrics
        self.history.append((trainer.step, metrics))
        trainer.step_info[self.prefix] = metrics
        trainer.log({self.prefix: metrics})
        if trainer.is_main_process:
            shown = " ".join(f"{k} {to_float(v):.4f}" for k, v in metrics.items())
            print(f"Eval  {trainer.step}/{trainer.max_steps}: {shown}", flush=True)
        return metrics

    def _continue(self, trainer: BaseTrainer) -> None:
        if self.pending is not None and self.pending.step == trainer.step:
            self.run(trainer, self.pending)

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._started = True
        self._continue(trainer)  # a checkpoint loaded by a hook before this one

    def on_load_state_dict(self, trainer: BaseTrainer, state: dict[str, Any]) -> None:
        if self._started:  # loaded by a hook after this one (or by hand during training)
            self._continue(trainer)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": [[step, metrics] for step, metrics in self.history]}
        if self.pending is not None:
            state["pending"] = self.pending.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), dict(metrics)) for step, metrics in state.get("history", [])]
        self.last = self.history[-1][1] if self.history else None
        self.pending = EvalProgress.from_state(state["pending"]) if state.get("pending") else None
