"""BaseTrainer: the build contract, the step loop on Accelerate, and the training state."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from .accelerator_setup import check_collective_timeout, destroy_process_group, make_accelerator
from .data_stream import DataStream
from .gradients import PLAIN_GRADS, GradientOps, no_context
from .hooks.base import BaseHook, StepInfo, hook_states, load_hook_states
from .non_finite import MAX_SCALER_BACKOFFS, NonFiniteChecks, NonFiniteError
from .signals import EarlyExit
from .trainer_build import BuildStep
from .utils import folder_problem, mean_records
from .watchdog import collective_timeout as _loop_timeout

if TYPE_CHECKING:  # torch.distributed.checkpoint costs ~50 MiB: imported when a state is taken
    from torch.distributed.checkpoint.state_dict import StateDictOptions

__all__ = ["BaseTrainer", "NonFiniteError", "StepInfo"]


class BaseTrainer(BuildStep, GradientOps, NonFiniteChecks):
    """A hook-driven training loop on Hugging Face Accelerate (the ``mini.trainer`` API).

    Subclass it and implement ``build_data_loader``, ``build_model``, ``build_optimizer`` and
    ``forward``; optionally ``build_lr_scheduler``, ``build_grad_scaler`` and ``build_hooks``.
    One step is one optimizer update over ``gradient_accumulation_steps`` micro-batches.

    Host syncs: a step reads nothing from the device on the host unless some hook reads it
    (``BaseHook.reads_step``); on a quiet step of one process the non-finite check stays on the
    device and the optimizer skips a bad update there (see :mod:`acceltrain.non_finite`).

    Args:
        max_steps: Number of optimizer updates to train for.
        grad_clip: Clip the global gradient norm to this value (through Accelerate, so it is
            correct under FSDP and DeepSpeed). ``None`` measures the norm without clipping.
        max_non_finite_grad_retries: How many times a step whose gradients are not finite is
            redone with fresh micro-batches. ``None`` or ``0`` raises at the first one.
        mixed_precision: ``"bf16"``, ``"fp16"`` (GPU only) or ``None``.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        workspace: Folder for checkpoints, logs and exports (created on the main process).
        device: ``"cpu"``, ``"cuda"``, a ``torch.device`` or ``None`` to let Accelerate decide.
        no_sync_accumulate: Skip the gradient all-reduce on every micro-batch but the last.
        state_dict_options: ``torch.distributed.checkpoint`` options for ``state_dict()``.
        logger: A ``logging.Logger``; defaults to ``logging.getLogger("acceltrain")``.
        accelerator: A ready ``Accelerator`` (its settings win over ``mixed_precision``/``device``).
        accelerator_kwargs: Extra keyword arguments for the ``Accelerator`` the trainer creates.
            Creating one resets Accelerate's process-wide state first, so several trainers in
            one process (a notebook, a sweep) each get the precision they ask for; an earlier
            trainer's ``accelerator`` then reports the newer settings, so train one at a time.
        data_seed: Seed of the shuffling order when the trainer makes the data loader
            resumable; default: the loader's generator seed, else rank 0's ``torch.initial_seed()``.
        collective_timeout: Seconds a collective in the step loop may wait for its peers before
            it raises (multi-process runs; ``None`` keeps the process group's own, 10-30 min).
            Setup (data preparation on one rank, checkpoint loading) keeps the longer one.
        defer_non_finite: Keep the finite flag on the device on quiet steps (see
            :mod:`acceltrain.non_finite`); ``False`` reads it on the host every step and always
            redoes a bad step in place.
        allow_global_batch_change: On a resume with another number of processes whose samples
            per step no accumulation can keep, continue with the new global batch (logged)
            instead of refusing (see :mod:`acceltrain.elastic`).

    What hooks and tools may use besides the build contract (all public; "built" means after
    :meth:`build`, which :meth:`train` calls first):

    - ``model``, ``optimizer``, ``lr_scheduler``: the prepared (wrapped) objects; ``unwrapped_model``
      the plain module; ``unwrapped_optimizer``/``unwrapped_scheduler`` the plain torch optimizer and
      scheduler under Accelerate's wrappers (what the step loop steps; read and edit state there;
      under DeepSpeed the optimizer is the ZeRO optimizer, whose ``param_groups`` hold the LR and
      whose state is partitioned); ``trainable_parameters`` the list of parameters with
      ``requires_grad``. Before building, the objects are None and ``trainable_parameters`` is
      ``[]``; :meth:`set_gradient_accumulation_steps` after building.
    - :meth:`autocast` (the run's precision context), ``engine_kind``, ``counts_items``, ``data``
      (the data position), ``step``, ``step_info`` (:class:`StepInfo`), :meth:`step_figures`.
    - Stopping: :meth:`request_stop`, ``should_stop``, ``stop_requested``, ``stop_reason``,
      ``stopped_by_signal``, ``exit_code``; steering an update: :meth:`skip_step`.
    - Driving the loop yourself (benchmarks): :meth:`build`, :meth:`call_hooks`,
      :meth:`run_step`, :meth:`index_hooks` after changing ``hooks``.

    Example:
        >>> class MyTrainer(BaseTrainer):
        ...     def build_data_loader(self):
        ...         return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
        ...     def build_model(self):
        ...         return torch.nn.Linear(8, 2).to(self.device)
        ...     def build_optimizer(self):
        ...         return torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        ...     def forward(self, input):
        ...         x, y = input
        ...         loss = torch.nn.functional.cross_entropy(self.model(x), y)
        ...         return loss, {}
        >>> MyTrainer(max_steps=100, device="cpu").train()
    """

    def __init__(
        self,
        *,
        max_steps: int,
        grad_clip: float | None = None,
        max_non_finite_grad_retries: int | None = None,
        mixed_precision: str | None = None,
        gradient_accumulation_steps: int | None = 1,
        workspace: Path | str | None = None,
        device: torch.device | str | int | None = None,
        no_sync_accumulate: bool = True,
        state_dict_options: StateDictOptions | None = None,
        logger: logging.Logger | None = None,
        accelerator: Accelerator | None = None,
        accelerator_kwargs: dict[str, Any] | None = None,
        data_seed: int | None = None,
        collective_timeout: float | None = 60.0,
        defer_non_finite: bool = True,
        allow_global_batch_change: bool = False,
    ) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
        retries = 0 if max_non_finite_grad_retries is None else max_non_finite_grad_retries
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"max_non_finite_grad_retries must be an int >= 0 or None, got {retries!r}")
        accumulation = 1 if gradient_accumulation_steps is None else gradient_accumulation_steps
        if not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"gradient_accumulation_steps must be an int >= 1, got {accumulation!r}")
        if mixed_precision == "no":
            mixed_precision = None
        if mixed_precision not in (None, "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'fp16', 'bf16' or None, got {mixed_precision!r}")

        self.max_steps = max_steps
        self.grad_clip = float(grad_clip) if grad_clip is not None else None
        self.max_non_finite_grad_retries = retries
        self.gradient_accumulation_steps = accumulation
        self.no_sync_accumulate = no_sync_accumulate
        self.state_dict_options = state_dict_options
        self.logger = logger or logging.getLogger("acceltrain")
        self.workspace = Path(workspace) if workspace is not None else None
        problem = folder_problem(self.workspace) if self.workspace is not None else None
        if problem:
            raise ValueError(f"workspace {self.workspace}: {problem}")

        self.accelerator = accelerator or make_accelerator(mixed_precision, device, accelerator_kwargs)
        self.mixed_precision = None if self.accelerator.mixed_precision == "no" else self.accelerator.mixed_precision
        if self.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise ValueError(
                "mixed_precision='fp16' needs a GPU: on the CPU Accelerate runs fp16 without autocast "
                "or loss scaling (silently fp32); use mixed_precision='bf16' on the CPU"
            )
        self.device = self.accelerator.device
        self.collective_timeout = check_collective_timeout(collective_timeout, self.accelerator)
        self._autocast: Callable[[], Any] = self.accelerator.autocast if self.mixed_precision is not None else no_context
        self._counts_items = type(self).count_loss_items is not BaseTrainer.count_loss_items

        self.step = 0
        self.step_info: StepInfo = {}
        self._figures: tuple[dict, int, dict[str, Any]] | None = None  # step_figures() of this step_info
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: Any = None
        #: The plain torch optimizer/scheduler under Accelerate's wrappers (set by build()).
        self.unwrapped_optimizer: torch.optim.Optimizer | None = None
        self.unwrapped_scheduler: Any = None
        #: The model's parameters with ``requires_grad``, in ``model.parameters()`` order (build()).
        self.trainable_parameters: list[torch.nn.Parameter] = []
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.data_loader: Iterable | None = None
        self.eval_data_loader: torch.utils.data.DataLoader | None = None
        self.hooks: list[BaseHook] = []
        self.should_stop = False
        self.stop_reason: str | None = None
        # A signal (preemption, cancel) stops this run: set at once on the rank that received it
        # (request_stop(by_signal=True)), on the others by CheckpointingHook.on_after_train.
        self.stopped_by_signal = False
        self.exit_code: int | None = None  # set by a hook (e.g. after a signal): train() exits with it
        self._skip_reason: str | None = None
        self._stop_local = False
        self._built = False
        self._failed = False  # the last train() raised inside its step loop
        self._pending_state: dict[str, Any] | None = None
        self.data_seed = data_seed
        self.allow_global_batch_change = allow_global_batch_change
        self._data: DataStream | None = None
        self.defer_non_finite = bool(defer_non_finite)
        # (step, batch positions, device flag) of quiet steps whose finiteness the host has not read.
        self._pending_flags: list[tuple[int, list[int], torch.Tensor]] = []
        self._deferred_run: list[tuple[int, list[int]]] = []  # consecutive device-side skips so far
        self._settled: tuple[list[int], list[int]] | None = None
        self._early_exit = EarlyExit()  # signals before training starts: a clean exit (train())

    # ------------------------------------------------------------------ build contract
    def build_data_loader(self) -> Iterable:
        """Return the training data: a ``DataLoader`` (prepared and sharded) or any iterable."""
        raise NotImplementedError("implement build_data_loader() in your BaseTrainer subclass")

    def build_model(self) -> torch.nn.Module:
        """Return the model (the trainer moves and wraps it through ``Accelerator.prepare``)."""
        raise NotImplementedError("implement build_model() in your BaseTrainer subclass")

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Return the optimizer over ``self.model``'s parameters."""
        raise NotImplementedError("implement build_optimizer() in your BaseTrainer subclass")

    def build_lr_scheduler(self) -> Any:
        """Return an LR scheduler over ``self.optimizer`` (stepped once per optimizer step), or None."""
        return None

    def build_grad_scaler(self) -> torch.amp.GradScaler | None:
        """Return the fp16 gradient scaler; the default is Accelerate's (only with fp16 on a GPU)."""
        return self.accelerator.scaler

    def build_hooks(self) -> list[BaseHook]:
        """Return the hooks for this run (default: none)."""
        return []

    def build_eval_data_loader(self) -> torch.utils.data.DataLoader | None:
        """Return a map-style evaluation ``DataLoader`` for :meth:`evaluate`, or None."""
        return None

    def evaluation_step(self, batch: Any) -> dict[str, Any]:
        """Metrics of one evaluation batch, each a mean over its samples (default: ``forward``'s
        loss and records; with ``count_loss_items`` the loss sum divided by the batch's items).
        Runs under ``no_grad``, autocast and ``model.eval()``; override it for metrics that must
        be weighted by items rather than samples (the causal-LM recipe's token perplexity)."""
        loss, records = self.forward(batch)
        if loss is not None and self._counts_items:
            # forward returns sums in this mode: report the batch's mean per item.
            loss = loss / max(float(self.count_loss_items(batch)), 1.0)
        return {**records, "loss": loss} if loss is not None else dict(records)

    def evaluate(self) -> dict[str, float]:
        """Sample-weighted means of :meth:`evaluation_step` over the whole evaluation set,
        exact across ranks (no duplicated tail samples); every rank must call it."""
        from .evaluation import evaluate

        self._require_built("evaluate()")
        return evaluate(self)

    def forward(self, input: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Compute ``(loss, records)`` for one micro-batch; ``loss=None`` skips its backward."""
        raise NotImplementedError("implement forward(input) in your BaseTrainer subclass")

    def count_loss_items(self, batch: Any) -> int | torch.Tensor | None:
        """Override to normalise the loss by items (e.g. tokens with a label) instead of batches.

        Return how many loss items ``batch`` holds and have ``forward`` return the *sum* of its
        per-item losses. The trainer then divides by the number of items in the whole
        accumulation window on all ranks (``self.loss_items``, known before the first forward
        of the step; one extra all-reduce per step), so k micro-batches of a padded batch give
        exactly the gradient of the unaccumulated token mean. The default (not overridden):
        ``forward`` returns a mean and every micro-batch weighs the same.
        """
        return None

    # ------------------------------------------------------------------ public API
    def train(self) -> None:
        """Build, prepare, then run steps until ``max_steps`` or a stop request.

        From the call until the hooks' ``on_before_train`` has run, SIGTERM, SIGINT and SIGUSR1
        (where still at their defaults) exit cleanly with ``128+signum`` (see
        :mod:`acceltrain.signals`); from then on ``CheckpointingHook`` owns them.
        """
        early = self._early_exit
        early.install()
        try:
            self.build()
        except BaseException:
            early.release()
            raise
        finished = in_loop = False
        try:
            self.call_hooks("on_before_train")
            early.release()  # training has begun: a CheckpointingHook has installed its own handlers
            with _loop_timeout(self.collective_timeout if self._sync_needed else None):
                in_loop = True
                while self.step < self.max_steps and not self.should_stop:
                    self.run_step()
                in_loop = False
            self._settle_pending()  # device-side skips are reported (or raise) before the run ends
            self.call_hooks("on_after_train")
            finished = True
        finally:
            # Raised inside the step loop, where a peer may be gone: close() skips its barriers.
            self._failed = in_loop
            if finished:
                self.accelerator.wait_for_everyone()
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.call_hooks("on_teardown")  # also after an exception: hooks release what they hold
            early.release()
        if self.exit_code is not None:
            raise SystemExit(self.exit_code)

    def close(self) -> None:
        """End a run cleanly: wait for every rank, close trackers, tear down the process group.

        Call it last in multi-process scripts (recipes do, in ``finally``): gloo aborts the
        interpreter at exit when a process group is torn down while other ranks still talk.
        """
        acc = self.accelerator
        failed = self._failed
        if acc.num_processes > 1 and torch.distributed.is_initialized() and not failed:
            acc.wait_for_everyone()
        acc.end_training()
        destroy_process_group(meet=not failed)

    def state_dict(self) -> dict[str, Any]:
        """The full training state: model, optimizer, scheduler, scaler, step, hooks.

        Under DeepSpeed ``model`` and ``optimizer`` are ``None``: torch cannot read a ZeRO
        optimizer, and checkpoints save the engine's partitions themselves
        (``acceltrain.checkpoint_deepspeed``)."""
        self._require_built("state_dict()")
        self._settle_pending()  # a checkpoint carries no unread finiteness flags
        if self._deepspeed:
            model_sd = optim_sd = None
        else:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.unwrapped_optimizer, options=self.state_dict_options)
        state: dict[str, Any] = {
            "step": self.step,
            "model": model_sd,
            "optimizer": optim_sd,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "hooks": hook_states(self.hooks),
            "data": self._data.state_dict(),
        }
        self.call_hooks("on_state_dict", state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], *, strict_data: bool = True,
                        full_state_dict: bool = False) -> None:
        """Restore ``state_dict()``'s output. Before ``train()`` it is kept and applied after building.

        The data position is restored too: the next batch is the one the saved run would have
        drawn (checked by a fingerprint of its sample indices; ``strict_data=False`` warns
        instead of raising on a mismatch). ``full_state_dict``: the model and optimizer state
        hold full tensors, to be laid out on the live (FSDP2) mesh, e.g. a checkpoint of another
        world size.
        """
        if not self._built:
            self._pending_state = state_dict
            return
        if state_dict.get("model") is not None:  # None: a DeepSpeed engine restored its own
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            options = self.state_dict_options
            if full_state_dict:
                options = StateDictOptions(full_state_dict=True, strict=getattr(options, "strict", True))
            set_state_dict(
                self.model,
                self.unwrapped_optimizer,
                model_state_dict=state_dict["model"],
                optim_state_dict=state_dict["optimizer"],
                options=options,
            )
        if self.lr_scheduler is not None and state_dict.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])
        if self.grad_scaler is not None and state_dict.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self.step = int(state_dict["step"])
        self._data.load_state_dict(state_dict.get("data"), strict=strict_data)
        load_hook_states(self.hooks, state_dict.get("hooks") or {})
        self.call_hooks("on_load_state_dict", state_dict)

    def log(self, records: dict[str, Any], not_main_process: bool | None = None, *,
            dry_run: bool | None = None) -> None:
        """Send aggregated records to the hooks' ``on_log`` (LoggingHook calls this). Call it on
        every rank; ``not_main_process`` (default: whether this is not the main process; the
        seed's name for it, ``dry_run``, is accepted too) tells hooks not to write."""
        self.call_hooks("on_log", records, self._not_main(not_main_process, dry_run))

    def log_images(self, records: dict[str, Any], not_main_process: bool | None = None, *,
                   dry_run: bool | None = None) -> None:
        """Send images (PIL images, HWC/CHW arrays or tensors) to the hooks' ``on_log_images``."""
        self.call_hooks("on_log_images", records, self._not_main(not_main_process, dry_run))

    def _not_main(self, not_main_process: bool | None, dry_run: bool | None) -> bool:
        if not_main_process is None:
            not_main_process = dry_run
        return not self.is_main_process if not_main_process is None else bool(not_main_process)

    def request_stop(self, reason: str, *, local: bool = False, by_signal: bool = False) -> None:
        """Stop after the current step.

        Call it on every rank at the same step (for example from metrics reduced across
        ranks). A rank-local reason, such as a signal, passes ``local=True``: the ranks agree
        on it in the next step's collective, so all of them stop after the same step.
        ``by_signal=True`` (CheckpointingHook's signal handler) sets ``stopped_by_signal``: the run
        is being preempted or cancelled, not finished (``ExportHook`` then exports nothing).
        """
        self.stop_reason = self.stop_reason or reason
        if by_signal:
            self.stopped_by_signal = True
        if local and self.accelerator.num_processes > 1:
            self._stop_local = True
        else:
            self.should_stop = True

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Export a Hugging Face folder (safetensors; the adapter for PEFT models). See
        :func:`acceltrain.export.save_pretrained`; every rank must call it."""
        from .export import save_pretrained

        self._require_built("save_pretrained()")
        return save_pretrained(self, directory, **kwargs)

    def find_lr(self, **kwargs: Any) -> float:
        """Run the LR range test with this trainer's ``forward``, data and optimizer, then put
        everything back (weights, optimizer, RNG, data position); every rank must call it. See
        :func:`acceltrain.lr_finder.find_lr` (``apply=True`` adopts the suggestion).

        Example:
            >>> lr = trainer.find_lr(end_lr=1.0, apply=True)
        """
        from .lr_finder import find_lr

        return find_lr(self, **kwargs)

    def skip_step(self, reason: str) -> None:
        """From ``on_before_optimizer_step``: discard this step's gradients instead of applying
        them. Neither the step counter nor the scheduler advances and ``on_after_step`` is not
        called. Call it on every rank alike (decide from reduced values)."""
        self._skip_reason = reason

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module under DDP/FSDP/DeepSpeed/``torch.compile`` wrappers."""
        if "deepspeed" in sys.modules:
            return self.accelerator.unwrap_model(model, keep_torch_compile=False)
        # Accelerate's unwrap_model imports DeepSpeed whenever it is installed, only to recognise
        # its engine (~25 MiB of RSS and its start-up log); no engine exists before that import.
        from accelerate.utils import is_compiled_module
        from torch.distributed.fsdp import FullyShardedDataParallel

        if is_compiled_module(model):
            model = model._orig_mod
        while isinstance(model, (DistributedDataParallel, torch.nn.DataParallel, FullyShardedDataParallel)):
            model = model.module
        return model

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The plain module under the prepared ``model`` (built trainers only)."""
        self._require_built("unwrapped_model")
        return self.unwrap(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the trainer runs ``forward`` in: Accelerate's autocast with mixed
        precision, else a no-op (use it for extra forwards, e.g. in a hook)."""
        return self._autocast()

    @property
    def engine_kind(self) -> str:
        """How the model is distributed: ``"single"`` (one process), ``"ddp"`` (replicas on several
        processes), ``"fsdp2"`` (or ``"fsdp"`` for FSDP1), ``"deepspeed"``; another Accelerate
        type is its lower-case name. Known from the Accelerator, before building."""
        acc = self.accelerator
        kind = acc.distributed_type
        if kind in PLAIN_GRADS:
            return "single" if acc.num_processes == 1 else "ddp"
        if kind == DistributedType.FSDP:
            plugin = acc.state.fsdp_plugin
            return "fsdp2" if getattr(plugin, "fsdp_version", 1) == 2 else "fsdp"
        if kind == DistributedType.DEEPSPEED:
            return "deepspeed"
        return kind.value.lower()

    @property
    def counts_items(self) -> bool:
        """Whether losses are normalised by items: the subclass overrides
        :meth:`count_loss_items`, so ``forward`` returns per-item *sums* (else it returns means)."""
        return self._counts_items

    @property
    def data(self) -> DataStream | None:
        """The training data's state once built (None before): ``position`` (sampler, batch size,
        seed; None for iterables), ``epoch``, ``batches_drawn``, ``state_dict()`` and
        ``load_state_dict(state)``, which is how checkpoints and the LR finder save and put back
        the data position."""
        return self._data

    @property
    def stop_requested(self) -> bool:
        """True from the moment this rank called ``request_stop(..., local=True)`` (a signal
        here) in a multi-process run: the request is rank-local until the next step's
        collective agreement, which sets ``should_stop`` on every rank. It is never cleared, and
        is False with one process (there a local request sets ``should_stop`` at once). "Has any
        stop been asked for on this rank" is ``should_stop or stop_requested``."""
        return self._stop_local

    def step_figures(self) -> dict[str, Any]:
        """This step's numbers worth aggregating (``hooks.logging.step_figures`` of
        ``step_info``), computed once per step for all hooks and again only when a hook adds a
        key; tensors stay tensors, so nothing is read on the host. Treat it as read-only."""
        from .hooks.logging import step_figures

        info, cached = self.step_info, self._figures
        if cached is not None and cached[0] is info and cached[1] == len(info):
            return cached[2]
        figures = step_figures(info)
        self._figures = (info, len(info), figures)
        return figures

    @property
    def epoch(self) -> int:
        """Passes over the data started so far, minus one (0 during the first)."""
        return self._data.epoch if self._data is not None else 0

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _require_built(self, what: str) -> None:
        if not self._built:
            raise RuntimeError(f"{what} needs the model and optimizer: call train() (or build()) first")

    # ------------------------------------------------------------------ hooks
    def call_hooks(self, name: str, *args: Any) -> None:
        """Send event ``name`` (one of ``EVENTS``) to every hook that overrides it, in list order,
        as the loop does (for code that drives the loop itself: ``call_hooks("on_before_train")``)."""
        for hook in self._hooks_for[name]:
            getattr(hook, name)(self, *args)

    # ------------------------------------------------------------------ the step
    def run_step(self) -> None:
        """One optimizer step with its hook events, exactly what :meth:`train` loops over (for
        benchmarks and drivers that own the loop: ``build()`` and ``on_before_train`` first)."""
        t_start = time.perf_counter()
        self.step_info = {}
        self._figures = None
        self.call_hooks("on_before_step")
        k = self.gradient_accumulation_steps
        expected = k * self._world
        retries = backoffs = 0
        skipped: list[int] = []
        data_time = 0.0
        quiet = self._quiet()
        found_inf: torch.Tensor | None = None
        self._settled = None
        while True:
            loss_sum, contributed, records, positions, dt = self._micro_steps()
            data_time += dt
            if not positions:  # a one-shot iterable ran dry at a window boundary
                self.request_stop("data exhausted")
                return
            grad_norm = self._deepspeed_step() if self._deepspeed else self._grad_norm()
            if quiet and contributed:
                # Decided on the device: the optimizer skips the update itself if this is set.
                found_inf = (~torch.isfinite(grad_norm.detach())).to(torch.float32).reshape(())
                total = contributed  # one process: nothing to agree on
                break
            finite, total, stop = self._agree(grad_norm, contributed)
            if stop:
                self.should_stop = True
            if total == 0:
                why = f"forward() returned None for all {len(positions)} micro-batches"
            elif finite:
                break
            else:
                why = "non-finite gradients"
            self._zero_grad()
            skipped.extend(positions)
            if self.grad_scaler is not None and total > 0:
                # The scaler unscaled this attempt's gradients: update() closes its bookkeeping
                # (and lowers the scale). An fp16 overflow is the scaler's routine, not a
                # fault, so the first MAX_SCALER_BACKOFFS of them spend no retry.
                self.grad_scaler.update()
                backoffs += 1
                if backoffs <= MAX_SCALER_BACKOFFS:
                    continue
            retries += 1
            self.logger.warning(
                "step %d: %s (batches %s); retry %d of %d",
                self.step + 1, why, positions, retries, self.max_non_finite_grad_retries,
            )
            if retries > self.max_non_finite_grad_retries and self._recovered(why, skipped):
                retries, skipped = 0, []
                continue
            if retries > self.max_non_finite_grad_retries:
                raise NonFiniteError(
                    f"step {self.step + 1}: {why} after {retries} attempt(s) "
                    f"(max_non_finite_grad_retries={self.max_non_finite_grad_retries}); "
                    f"skipped batches {skipped}"
                )
            if self._data.exhausted:
                self.request_stop("data exhausted")
                return
        if total != expected and not self._counts_items and not self._deepspeed:
            grad_norm = self._reweigh_window(grad_norm, expected / total)
        info = self.step_info
        info["loss"] = loss_sum if self._counts_items or contributed == 1 else loss_sum / contributed
        info["grad_norm"] = grad_norm
        info["batches"] = positions
        if found_inf is not None:
            info["found_inf"] = found_inf
        self._skip_reason = None
        self.call_hooks("on_before_optimizer_step")
        if self._skip_reason is not None:  # a hook vetoed this update (e.g. a loss spike)
            if self.grad_scaler is not None:
                self.grad_scaler.update()  # its unscale_() of this step must be closed
            self._zero_grad()
            return
        if not self._deepspeed:  # the engine applied the update in _deepspeed_step
            self._optimizer_step(found_inf)
        if self.unwrapped_scheduler is not None:
            self.unwrapped_scheduler.step()
        self._zero_grad()
        self.step += 1
        if self._data.exhausted:
            self.request_stop("data exhausted")
        info["lr"] = [group["lr"] for group in self.unwrapped_optimizer.param_groups]
        info["records"] = (records[0] if len(records) == 1 else mean_records(records)) if records else {}
        if found_inf is not None:
            self._pending_flags.append((self.step, positions, found_inf))
        else:  # decided on the host: finite (or redone until it was)
            self._deferred_run = []
        if self._settled is not None:  # device-side skips of earlier steps, read during this one
            info["skipped_steps"] = self._settled[0]
            skipped = self._settled[1] + skipped
            self._settled = None
        info["non_finite_retries"] = retries
        info["skipped_batches"] = skipped
        info["data_time"] = data_time
        info["step_time"] = time.perf_counter() - t_start
        self.call_hooks("on_after_step")
