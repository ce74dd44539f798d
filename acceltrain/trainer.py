"""BaseTrainer: the build contract, the step loop on Accelerate, and the training state."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from .data_stream import EXHAUSTED, DataStream
from .engine import PLAIN_GRADS, GradientOps
from .hooks.base import EVENTS, BaseHook
from .signals import EarlyExit
from .utils import folder_problem, key_average
from .watchdog import collective_timeout as _loop_timeout

if TYPE_CHECKING:  # torch.distributed.checkpoint costs ~50 MiB: imported when a state is taken
    from torch.distributed.checkpoint.state_dict import StateDictOptions

__all__ = ["BaseTrainer", "NonFiniteError"]

# The fp16 scaler halves its scale on every overflow; past this many overflows in a row the
# scale is below 2**-48 and the model, not the scale, is the problem.
_MAX_SCALER_BACKOFFS = 64


class NonFiniteError(RuntimeError):
    """Gradients (or the loss) stayed non-finite after every allowed retry."""


class BaseTrainer(GradientOps):
    """A hook-driven training loop on Hugging Face Accelerate (the ``mini.trainer`` API).

    Subclass it and implement ``build_data_loader``, ``build_model``, ``build_optimizer`` and
    ``forward``; optionally ``build_lr_scheduler``, ``build_grad_scaler`` and ``build_hooks``.
    One step is one optimizer update over ``gradient_accumulation_steps`` micro-batches.

    Host syncs: a step reads nothing from the device on the host unless some hook reads it
    (``BaseHook.reads_step``: a logging hook on its logging steps, a hook that inspects the
    update in ``on_before_optimizer_step`` on every step). The non-finite check then works as
    follows (``defer_non_finite``):

    - On a step some hook reads (and wherever deferral does not apply) the finite flag is read
      on the host (one read, together with the flags of earlier quiet steps): a non-finite
      attempt is discarded and redone with fresh micro-batches, neither the step counter nor
      the scheduler advances, and ``step_info["non_finite_retries"]``/``["skipped_batches"]``
      say so; an fp16 overflow lowers the scale and redoes the step without spending a retry.
    - On a *quiet* step (no hook reads it, one process, plain gradients, and an optimizer
      that takes ``found_inf``: torch's fused Adam, AdamW, SGD, Adagrad) the flag stays on the
      device: ``found_inf = not isfinite(grad_norm)`` goes to the fused kernel (or to the
      GradScaler's own found_inf path), which leaves weights, moments and the optimizer's step
      count untouched when it is set, as ``torch.amp`` does. The host cannot know, so such a
      skipped step still counts: ``trainer.step`` and the scheduler advance and the next step
      draws fresh batches, which is the retry. ``step_info["found_inf"]`` holds the device flag.
      The flags are read at the next step a hook reads (at the latest every 100 steps, at the
      end of training and in ``state_dict()``): skipped steps are logged as a warning and
      reported in that step's ``step_info["skipped_steps"]``/``["skipped_batches"]``, and more
      than ``max_non_finite_grad_retries`` skipped steps in a row raise ``NonFiniteError``
      naming them.
    - Several processes (DDP, FSDP, DeepSpeed) read the per-step agreement on the host (one
      read per step): it carries stop requests and loss counts the host needs at once.

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
        defer_non_finite: Keep the finite flag on the device on quiet steps (see "Host syncs"
            above); ``False`` reads it on the host every step and always redoes a bad step in place.
        allow_global_batch_change: On a resume with another number of processes whose samples
            per step no accumulation can keep, continue with the new global batch (logged)
            instead of refusing (see :mod:`acceltrain.elastic`).

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

        self.accelerator = accelerator or self._make_accelerator(mixed_precision, device, accelerator_kwargs)
        self.mixed_precision = None if self.accelerator.mixed_precision == "no" else self.accelerator.mixed_precision
        if self.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise ValueError(
                "mixed_precision='fp16' needs a GPU: on the CPU Accelerate runs fp16 without autocast "
                "or loss scaling (silently fp32); use mixed_precision='bf16' on the CPU"
            )
        self.device = self.accelerator.device
        self.collective_timeout = self._guard_processes(collective_timeout)

        self.step = 0
        self.step_info: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: Any = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.data_loader: Iterable | None = None
        self.eval_data_loader: torch.utils.data.DataLoader | None = None
        self.hooks: list[BaseHook] = []
        self.should_stop = False
        self.stop_reason: str | None = None
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
        if loss is not None and self._items_mode:
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
            self._build()
        except BaseException:
            early.release()
            raise
        finished = in_loop = False
        try:
            self._call_hook("on_before_train")
            early.release()  # training has begun: a CheckpointingHook has installed its own handlers
            with _loop_timeout(self.collective_timeout if self._sync_needed else None):
                in_loop = True
                while self.step < self.max_steps and not self.should_stop:
                    self._run_step()
                in_loop = False
            self._settle_pending()  # device-side skips are reported (or raise) before the run ends
            self._call_hook("on_after_train")
            finished = True
        finally:
            # Raised inside the step loop, where a peer may be gone: close() skips its barriers.
            self._failed = in_loop
            if finished:
                self.accelerator.wait_for_everyone()
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self._call_hook("on_teardown")  # also after an exception: hooks release what they hold
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
        _destroy_process_group(meet=not failed)

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

            model_sd, optim_sd = get_state_dict(self.model, self._inner_optimizer, options=self.state_dict_options)
        state: dict[str, Any] = {
            "step": self.step,
            "model": model_sd,
            "optimizer": optim_sd,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "hooks": self._hook_states(),
            "data": self._data.state_dict(),
        }
        self._call_hook("on_state_dict", state)
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
                self._inner_optimizer,
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
        self._load_hook_states(state_dict.get("hooks") or {})
        self._call_hook("on_load_state_dict", state_dict)

    def _set_gradient_accumulation_steps(self, accumulation: int) -> None:
        """Change the micro-batches per step after building (a resume on another world size)."""
        self.gradient_accumulation_steps = accumulation
        self._use_no_sync = (self.no_sync_accumulate and self._sync_needed and accumulation > 1
                             and not self._deepspeed)
        if self._deepspeed:  # the engine divides the loss by its own accumulation and counts samples by it
            engine = self.model
            engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * accumulation * engine.dp_world_size)
            if hasattr(engine.optimizer, "gradient_accumulation_steps"):  # ZeRO's CPU-offload accumulation
                engine.optimizer.gradient_accumulation_steps = accumulation

    def log(self, records: dict[str, Any], dry_run: bool = False) -> None:
        """Send aggregated records to the hooks' ``on_log`` (LoggingHook calls this)."""
        self._call_hook("on_log", records, dry_run)

    def log_images(self, records: dict[str, Any], dry_run: bool = False) -> None:
        """Send images (PIL images, HWC/CHW arrays or tensors) to the hooks' ``on_log_images``."""
        self._call_hook("on_log_images", records, dry_run)

    def request_stop(self, reason: str, *, local: bool = False) -> None:
        """Stop after the current step.

        Call it on every rank at the same step (for example from metrics reduced across
        ranks). A rank-local reason, such as a signal, passes ``local=True``: the ranks agree
        on it in the next step's collective, so all of them stop after the same step.
        """
        self.stop_reason = self.stop_reason or reason
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

    def _recovered(self, why: str, skipped: list[int]) -> bool:
        """Retries are spent: a hook (e.g. GuardHook) may roll back and return True to go on."""
        return any(hook.on_non_finite(self, why, skipped) for hook in self._hooks_for["on_non_finite"])

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
        self._require_built("unwrapped_model")
        return self.unwrap(self.model)

    @property
    def epoch(self) -> int:
        """Passes over the data started so far, minus one (0 during the first)."""
        return self._data.epoch if self._data is not None else 0

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        if self._built:
            return
        acc = self.accelerator
        if self.workspace is not None and acc.is_main_process:
            self.workspace.mkdir(parents=True, exist_ok=True)
        self.model = self.build_model()
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"build_model() must return a torch.nn.Module, got {type(self.model).__name__}")
        self.optimizer = self.build_optimizer()
        self.lr_scheduler = self.build_lr_scheduler()
        scaler = self.build_grad_scaler()
        if scaler is not None and scaler is not acc.scaler:
            acc.scaler = scaler  # prepare() hands it to the AcceleratedOptimizer
        data = self.build_data_loader()
        self._deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self._deepspeed:
            self._configure_deepspeed(data)
        objects = [self.model, self.optimizer]
        # Under DeepSpeed the scheduler stays ours: given to prepare(), the engine would step it too.
        if self.lr_scheduler is not None and not self._deepspeed:
            objects.append(self.lr_scheduler)
        prepared = list(acc.prepare(*objects))
        self.model, self.optimizer = prepared[0], prepared[1]
        if len(prepared) > 2:
            self.lr_scheduler = prepared[2]
        self._data = DataStream(data, acc, self.data_seed)
        self.data_loader = self._data.loader
        eval_loader = self.build_eval_data_loader()
        if eval_loader is not None:
            if not isinstance(eval_loader, torch.utils.data.DataLoader) or isinstance(
                eval_loader.dataset, torch.utils.data.IterableDataset
            ):
                raise TypeError("build_eval_data_loader() must return a DataLoader over a map-style dataset")
            from .evaluation import shard_eval_loader

            eval_loader = shard_eval_loader(eval_loader, acc.num_processes, acc.process_index)
        self.eval_data_loader = eval_loader
        self.grad_scaler = acc.scaler

        # The hot path talks to the plain optimizer and scheduler: AcceleratedOptimizer.step
        # re-searches the file system for optional packages on every call (~15% of a tiny step).
        opt = self.optimizer
        while isinstance(opt, AcceleratedOptimizer):
            opt = opt.optimizer
        self._inner_optimizer = opt
        sched = self.lr_scheduler
        self._inner_scheduler = sched.scheduler if isinstance(sched, AcceleratedScheduler) else sched
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._fast_path = acc.distributed_type in PLAIN_GRADS
        self._sync_needed = acc.num_processes > 1
        # DeepSpeed decides gradient reduction from the accumulation boundary we set instead.
        self._use_no_sync = (self.no_sync_accumulate and self._sync_needed and self.gradient_accumulation_steps > 1
                             and not self._deepspeed)
        self._autocast = acc.autocast if self.mixed_precision is not None else _no_context
        self._world = acc.num_processes
        self._items_mode = type(self).count_loss_items is not BaseTrainer.count_loss_items
        self.loss_items: torch.Tensor | None = None
        # Where the engine's own gradient reduction already makes every rank see the same
        # non-finite gradients (DDP's all-reduce of every parameter, FSDP's and DeepSpeed's
        # global norms), the per-step agreement only has to count losses and stop requests: both
        # are known before the last backward, so it runs asynchronously beside it instead of
        # adding a rendezvous after clipping (measured: ~3% of a 25 ms step on 2 gloo ranks).
        ddp = isinstance(self.model, DistributedDataParallel)
        self._agree_early = self._sync_needed and (
            self._deepspeed or not self._fast_path or ddp and not self.model.parameters_to_ignore)
        self._agreement: tuple[torch.Tensor, Any] | None = None
        # Quiet steps keep the finite flag on the device: only where the optimizer itself can
        # skip an update from a device flag (found_inf) and no other rank needs the answer.
        self._defer = (self.defer_non_finite and self._fast_path and not self._sync_needed
                       and bool(getattr(self._inner_optimizer, "_step_supports_amp_scaling", False)))

        self.hooks = list(self.build_hooks() or [])
        for hook in self.hooks:
            if not isinstance(hook, BaseHook):
                raise TypeError(f"build_hooks() returned {type(hook).__name__}, which is not a BaseHook")
        self._index_hooks()
        self._built = True
        if acc.num_processes > 1:
            atexit.register(_destroy_process_group)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _index_hooks(self) -> None:
        # Only the hooks that override an event are called for it.
        self._hooks_for = {
            name: [h for h in self.hooks if getattr(type(h), name) is not getattr(BaseHook, name)]
            for name in EVENTS
        }
        # BaseHook.reads_step depends only on the class: decided once, not asked every step.
        self._step_readers = [h for h in self.hooks if type(h).reads_step is not BaseHook.reads_step]
        self._reads_every_step = any(BaseHook.reads_step(h, self, 0) for h in self.hooks
                                     if type(h).reads_step is BaseHook.reads_step)

    def _require_built(self, what: str) -> None:
        if not self._built:
            raise RuntimeError(f"{what} needs the model and optimizer: call train() (or _build()) first")

    # ------------------------------------------------------------------ hooks
    def _call_hook(self, name: str, *args: Any) -> None:
        for hook in self._hooks_for[name]:
            getattr(hook, name)(self, *args)

    def _hook_keys(self) -> list[tuple[str, BaseHook]]:
        keys, seen = [], {}
        for hook in self.hooks:
            name = type(hook).__name__
            seen[name] = seen.get(name, -1) + 1
            keys.append((name if seen[name] == 0 else f"{name}_{seen[name]}", hook))
        return keys

    def _hook_states(self) -> dict[str, Any]:
        states = {}
        for key, hook in self._hook_keys():
            state = hook.state_dict()
            if state is not None:
                states[key] = state
        return states

    def _load_hook_states(self, states: dict[str, Any]) -> None:
        for key, hook in self._hook_keys():
            if key in states:
                hook.load_state_dict(states[key])

    # ------------------------------------------------------------------ the step
    def _micro_steps(self) -> tuple[torch.Tensor | None, int, list[dict], list[int], float]:
        """Run one accumulation window: forward and backward over its micro-batches."""
        k = self.gradient_accumulation_steps
        t0 = time.perf_counter()
        batches = []
        for _ in range(k):
            batch = self._data.next()
            if batch is EXHAUSTED:
                break
            batches.append(batch)
        data_time = time.perf_counter() - t0
        positions = list(range(self._data.batches_drawn - len(batches), self._data.batches_drawn))
        if self._items_mode and batches:
            # Normalise by the items (e.g. valid tokens) of the whole window on all ranks, not by
            # micro-batch count: forward returns sums; W undoes DDP's gradient averaging.
            items = sum(torch.as_tensor(self.count_loss_items(b), dtype=torch.float32, device=self.device)
                        for b in batches)
            # Summed across ranks while the first forward runs; waited for before its backward.
            items_work = torch.distributed.all_reduce(items, async_op=True) if self._sync_needed else None
            self.loss_items = items
            scale = None
        else:
            items_work, scale = None, 1.0 / k
        unit = k == 1 and not self._items_mode  # then no `loss * 1.0` kernel per micro-batch
        loss_sum: torch.Tensor | None = None
        contributed = 0
        records: list[dict] = []
        last = len(batches) - 1
        for micro, batch in enumerate(batches):
            sync_ctx = (
                self.accelerator.no_sync(self.model)
                if self._use_no_sync and micro < last
                else _NO_CONTEXT
            )
            with sync_ctx:
                with self._autocast():
                    loss, rec = self.forward(batch)
                if rec:
                    records.append(rec)
                if loss is None and self._use_no_sync and micro == last and contributed:
                    # Gradients of this window were accumulated under no_sync and only the
                    # last backward would all-reduce them: stepping now would let replicas drift.
                    raise ValueError(
                        f"step {self.step + 1}: forward() returned None on the last micro-batch of an "
                        "accumulation window after earlier ones returned a loss; under DDP/FSDP the "
                        "gradients are synchronised by that last backward: return a zero loss there "
                        "(e.g. 0 * output.sum()) instead of None")
                if micro == last and self._agree_early:
                    self._start_agreement(contributed + (loss is not None))
                if loss is None:
                    continue
                if scale is None:  # items mode, first loss of the window
                    if items_work is not None:
                        items_work.wait()
                        items_work = None
                    scale = self._world / items.clamp(min=1)
                if self._deepspeed:
                    # The engine divides by its gradient_accumulation_steps (= k) itself.
                    self.model.set_gradient_accumulation_boundary(micro == len(batches) - 1)
                    self.model.backward(loss * (scale * k))
                else:
                    self._backward(loss if unit else loss * scale)
            contributed += 1
            detached = loss.detach() * scale if self._items_mode else loss.detach()
            loss_sum = detached if loss_sum is None else loss_sum + detached
        if items_work is not None:  # items mode, and no micro-batch gave a loss
            items_work.wait()
        return loss_sum, contributed, records, positions, data_time

    def _run_step(self) -> None:
        t_start = time.perf_counter()
        self.step_info = {}
        self._call_hook("on_before_step")
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
                # fault, so the first _MAX_SCALER_BACKOFFS of them spend no retry.
                self.grad_scaler.update()
                backoffs += 1
                if backoffs <= _MAX_SCALER_BACKOFFS:
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
        if total != expected and not self._items_mode and not self._deepspeed:
            # Some micro-batches gave no loss (or the data ran out mid-window): each
            # contributing micro-batch weighs 1/total, not 1/k, so nothing is under-scaled.
            # Clipping already used the smaller norm; clipping again after the rescale gives
            # exactly what clipping the rescaled gradients once would.
            factor = expected / total
            torch._foreach_mul_([p.grad for p in self._trainable if p.grad is not None], factor)
            grad_norm = grad_norm * factor
            if self.grad_clip is not None:
                self._grad_norm(unscale=False)
        info = self.step_info
        info["loss"] = loss_sum if self._items_mode or contributed == 1 else loss_sum / contributed
        info["grad_norm"] = grad_norm
        info["batches"] = positions
        if found_inf is not None:
            info["found_inf"] = found_inf
        self._skip_reason = None
        self._call_hook("on_before_optimizer_step")
        if self._skip_reason is not None:  # a hook vetoed this update (e.g. a loss spike)
            if self.grad_scaler is not None:
                self.grad_scaler.update()  # its unscale_() of this step must be closed
            self._zero_grad()
            return
        if not self._deepspeed:  # the engine applied the update in _deepspeed_step
            self._optimizer_step(found_inf)
        if self._inner_scheduler is not None:
            self._inner_scheduler.step()
        self._zero_grad()
        self.step += 1
        if self._data.exhausted:
            self.request_stop("data exhausted")
        info["lr"] = [group["lr"] for group in self._inner_optimizer.param_groups]
        info["records"] = (records[0] if len(records) == 1 else _mean_records(records)) if records else {}
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
        self._call_hook("on_after_step")


_EXIT_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def _no_context() -> contextlib.nullcontext:
    return _NO_CONTEXT


def _mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """key_average without host syncs: tensor values are averaged as tensors."""
    keys: dict[str, list[Any]] = {}
    for rec in records:
        for key, value in rec.items():
            keys.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in keys.items():
        if all(isinstance(v, dict) for v in values):
            out[key] = _mean_records(values)
        elif all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
            out[key] = torch.stack([v.detach().reshape(()).float() for v in values]).mean()
        else:
            out.update(key_average([{key: v} for v in values]))
    return out


def _destroy_process_group(meet: bool = True) -> None:
    # gloo aborts the interpreter at exit ("terminate called without an active exception") if
    # the process group is still alive, and now and then when one rank tears it down while a
    # peer still talks on it: meet first. A peer that died does not come; after the timeout the
    # group goes anyway.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if meet and torch.distributed.get_backend() == "gloo":
            try:
                torch.distributed.monitored_barrier(timeout=_EXIT_BARRIER_TIMEOUT)
            except RuntimeError:
                pass
        torch.distributed.destroy_process_group()
