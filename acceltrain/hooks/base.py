"""The hook base class and where each event fires in the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

#: Every event a hook can receive, in the order a step sees them.
EVENTS = (
    "on_before_train",
    "on_before_step",
    "on_before_optimizer_step",
    "on_non_finite",
    "on_after_step",
    "on_log",
    "on_log_images",
    "on_state_dict",
    "on_load_state_dict",
    "on_after_train",
    "on_teardown",
)


class BaseHook:
    """Observe (and, where documented, steer) the training loop.

    Every method is a no-op; override the ones you need. The trainer only calls the methods a
    hook overrides, so an unused event costs nothing. Where each event fires::

        trainer.train():
            build data loader, model, optimizer, scheduler, hooks; Accelerator.prepare(...)
            on_load_state_dict(trainer, state)     # only when a checkpoint is loaded
            on_before_train(trainer)
            while trainer.step < max_steps and not trainer.should_stop:
                on_before_step(trainer)
                repeat (at most 1 + max_non_finite_grad_retries times):
                    for each of the gradient_accumulation_steps micro-batches:
                        batch = next(data)                       # step_info["data_time"]
                        with no_sync (all but the last micro-batch), autocast:
                            loss, records = trainer.forward(batch)
                        backward(loss / number of micro-batches)
                    grad_norm = clip (or measure) gradients      # step_info["grad_norm"]
                    if no hook reads_step(trainer, step + 1) and the optimizer takes found_inf:
                        found_inf stays on the device; break     # step_info["found_inf"]; the
                                                                 # optimizer skips it there if set
                    every rank agrees: all gradients finite?     # one collective per step
                    if finite: break
                    zero gradients; record the skipped batches   # step_info["skipped_batches"]
                    if retries spent:
                        on_non_finite(trainer, reason, batches)  # True: rolled back, go on
                        else raise NonFiniteError
                on_before_optimizer_step(trainer)                # loss, grad_norm, batches known;
                                                                 # trainer.skip_step() vetoes
                optimizer.step(); lr_scheduler.step(); zero gradients
                trainer.step += 1
                on_after_step(trainer)                           # step_info complete
            on_after_train(trainer)
        finally: on_teardown(trainer)                    # also when training raised

        trainer.log(records)         -> on_log(trainer, records, dry_run)
        trainer.log_images(records)  -> on_log_images(trainer, records, dry_run)
        trainer.state_dict()         -> on_state_dict(trainer, state_dict)

    ``dry_run`` is True on every rank but the main one: every rank calls the hooks (so a hook
    may enter collectives there), only the main rank writes.

    A hook that keeps state across steps implements ``state_dict()`` / ``load_state_dict()``
    returning tensors and JSON-able values only: the checkpoint stores them without pickle.

    Example:
        >>> class PrintEvery100(BaseHook):
        ...     def on_after_step(self, trainer):
        ...         if trainer.step % 100 == 0:
        ...             trainer.logger.info("step %d", trainer.step)
    """

    def on_before_train(self, trainer: BaseTrainer) -> None:
        """Once, after everything is built and prepared (and a checkpoint loaded), before step 1."""

    def on_after_train(self, trainer: BaseTrainer) -> None:
        """Once, after the last step (also after an early stop), before the trainer closes."""

    def on_teardown(self, trainer: BaseTrainer) -> None:
        """Last, whether training finished or raised: release what the hook holds (handlers,
        files). Do not enter collectives here: after an exception other ranks may be gone."""

    def on_before_step(self, trainer: BaseTrainer) -> None:
        """Before the first micro-batch of a step; ``trainer.step`` is the number of steps done."""

    def on_before_optimizer_step(self, trainer: BaseTrainer) -> None:
        """After backward, clipping and the finiteness check, before ``optimizer.step()``.

        ``step_info`` already holds ``loss``, ``grad_norm`` and ``batches`` (the positions of
        this step's micro-batches); ``trainer.skip_step(reason)`` discards the update."""

    def on_non_finite(self, trainer: BaseTrainer, reason: str, batches: list[int]) -> bool:
        """A step stayed non-finite after every retry. Return True after restoring a good state
        (the step is then redone with fresh batches); the default lets the trainer raise."""
        return False

    def on_after_step(self, trainer: BaseTrainer) -> None:
        """After the optimizer and scheduler stepped; ``trainer.step_info`` is complete."""

    def reads_step(self, trainer: BaseTrainer, step: int) -> bool:
        """Whether this hook needs the step's outcome settled on the host at step ``step`` (the
        number the step will have once done; asked before its optimizer update).

        On a step that no hook reads, the trainer decides finiteness on the device and skips a
        non-finite update there (see ``BaseTrainer``: "Host syncs"); on a step some hook reads, it
        reads the flag and redoes a non-finite step in place. A hook that logs on an interval
        returns True on its logging steps only. The default: True for a hook that overrides
        ``on_before_optimizer_step`` or ``on_non_finite`` (it inspects or steers the update),
        False otherwise (reading ``step_info`` tensors in ``on_after_step`` is the hook's own sync).
        """
        cls = type(self)
        return (cls.on_before_optimizer_step is not BaseHook.on_before_optimizer_step
                or cls.on_non_finite is not BaseHook.on_non_finite)

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], dry_run: bool = False) -> None:
        """When ``trainer.log(records)`` is called (LoggingHook does, every ``interval`` steps)."""

    def on_log_images(self, trainer: BaseTrainer, records: dict[str, Any], dry_run: bool = False) -> None:
        """When ``trainer.log_images(records)`` is called."""

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        """When ``trainer.state_dict()`` is built: add or edit entries in place."""

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        """When ``trainer.load_state_dict(state)`` is called, after the trainer restored its part."""

    def state_dict(self) -> dict[str, Any] | None:
        """This hook's own state for checkpoints (tensors and JSON-able values), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
