"""The hook base class and where each event fires in the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import torch

    from ..trainer import BaseTrainer


class StepInfo(TypedDict, total=False):
    """What ``trainer.step_info`` holds about the current step (``total=False``: a key is there
    once the loop has reached the point that writes it; see :class:`BaseHook` for where).

    Tensors stay on the device (read one with ``float()`` only on a step you log: that is a
    host sync). Hooks may add keys of their own, as the shipped ones do (``eval`` or the
    ``EvaluationHook`` prefix, ``max_memory``, ``tokens_per_s``/``mfu``, ``sparsity``/
    ``sparsity_layers``); every number among them is a step figure that ``LoggingHook`` and
    ``ProgressHook`` average and log.

    Keys the trainer (and the shipped hooks named) write:

    - ``loss``: The step's loss, 0-dim: the mean over its micro-batches (with ``count_loss_items``, over items).
    - ``grad_norm``: The global gradient norm before clipping, 0-dim.
    - ``batches``: Positions (in drawing order) of the micro-batches this update used.
    - ``found_inf``: Quiet steps only: 1.0 if the optimizer skipped this update on the device (non-finite).
    - ``lr``: Each param group's LR after the scheduler stepped.
    - ``records``: ``forward``'s records, averaged over the micro-batches (tensors stay tensors).
    - ``skipped_steps``: Earlier quiet steps found to have been skipped on the device, read during this step.
    - ``non_finite_retries``: How many times this step was redone because its gradients were not finite.
    - ``skipped_batches``: Batch positions discarded by those retries (and by skipped quiet steps read now).
    - ``data_time``: Seconds spent drawing this step's batches.
    - ``step_time``: Seconds from ``on_before_step`` to ``on_after_step``.
    - ``eval``: ``EvaluationHook``'s metrics on a step it evaluated (under its ``prefix``).
    - ``max_memory``: ``CudaMaxMemoryHook``: peak device memory so far, GiB.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    batches: list[int]
    found_inf: torch.Tensor
    lr: list[float]
    records: dict[str, Any]
    skipped_steps: list[int]
    non_finite_retries: int
    skipped_batches: list[int]
    data_time: float
    step_time: float
    eval: dict[str, float]
    max_memory: float


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

        trainer.log(records)         -> on_log(trainer, records, not_main_process)
        trainer.log_images(records)  -> on_log_images(trainer, records, not_main_process)
        trainer.state_dict()         -> on_state_dict(trainer, state_dict)

    ``not_main_process`` (passed by position; mini.trainer called it ``dry_run``) is True on
    every rank but the main one: every rank calls the hooks (so a hook may enter collectives
    there), only the main rank writes.

    A hook uses the trainer's public interface only (see ``BaseTrainer``'s docstring): the
    prepared and unwrapped optimizer/scheduler, ``trainable_parameters``, ``autocast()``,
    ``engine_kind``, ``data``, ``step_info``/``step_figures()``, ``request_stop()``,
    ``skip_step()``, ``log()``.

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
        non-finite update there (see :mod:`acceltrain.non_finite`); on a step some hook reads, it
        reads the flag and redoes a non-finite step in place. A hook that logs on an interval
        returns True on its logging steps only. The default: True for a hook that overrides
        ``on_before_optimizer_step`` or ``on_non_finite`` (it inspects or steers the update),
        False otherwise (reading ``step_info`` tensors in ``on_after_step`` is the hook's own sync).
        """
        cls = type(self)
        return (cls.on_before_optimizer_step is not BaseHook.on_before_optimizer_step
                or cls.on_non_finite is not BaseHook.on_non_finite)

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        """When ``trainer.log(records)`` is called (LoggingHook does, every ``interval`` steps)."""

    def on_log_images(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
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

    def resize_state(self, states: list[dict[str, Any] | None], rank: int, world: int) -> dict[str, Any] | None:
        """This rank's state when a checkpoint of ``len(states)`` processes resumes on ``world``.

        ``states[r]`` is what saved rank ``r``'s :meth:`state_dict` returned (None if nothing);
        the result goes to :meth:`load_state_dict` on rank ``rank``. The default keeps a saved
        rank's own state and gives a new rank rank 0's: right for state that every rank holds the
        same (early stopping, which the ranks decide together). Override it for per-rank partial
        sums (see ``LoggingHook``) or for state laid out by the world size (see ``GuardHook``).
        """
        return states[rank] if rank < len(states) else states[0]


def hook_keys(hooks: list[BaseHook]) -> list[tuple[str, BaseHook]]:
    """Each hook's key in a checkpoint: its class name, ``_1``, ``_2``, ... for repeats."""
    keys, seen = [], {}
    for hook in hooks:
        name = type(hook).__name__
        seen[name] = seen.get(name, -1) + 1
        keys.append((name if seen[name] == 0 else f"{name}_{seen[name]}", hook))
    return keys


def hook_states(hooks: list[BaseHook]) -> dict[str, Any]:
    """The ``state_dict()`` of every hook that has one, by :func:`hook_keys`."""
    return {key: state for key, hook in hook_keys(hooks) if (state := hook.state_dict()) is not None}


def resized_hook_states(hooks: list[BaseHook], per_rank: list[dict[str, Any]], rank: int,
                        world: int) -> dict[str, Any]:
    """This rank's hook states from every saved rank's (``per_rank[r]``: rank r's
    :func:`hook_states`), each hook's through its :meth:`BaseHook.resize_state`."""
    out = {}
    for key, hook in hook_keys(hooks):
        states = [saved.get(key) for saved in per_rank]
        if any(st is not None for st in states) and (state := hook.resize_state(states, rank, world)) is not None:
            out[key] = state
    return out


def load_hook_states(hooks: list[BaseHook], states: dict[str, Any]) -> None:
    """Give each hook its entry of :func:`hook_states`'s output (hooks without one keep theirs)."""
    for key, hook in hook_keys(hooks):
        if key in states:
            hook.load_state_dict(states[key])
