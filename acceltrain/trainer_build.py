"""The build step of :class:`~acceltrain.trainer.BaseTrainer`: call the ``build_*`` methods,
``Accelerator.prepare`` what they return, and decide once what the step loop needs per step.

A mixin of ``BaseTrainer`` (``trainer.build()``, public; the rest is not public API), kept apart
so ``trainer.py`` holds the build contract and the loop.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from .accelerator_setup import destroy_process_group
from .data_stream import DataStream
from .gradients import PLAIN_GRADS
from .hooks.base import EVENTS, BaseHook
from .schedules import unwrap_optimizer, unwrap_scheduler


class BuildStep:
    """``build()``: everything ``train()`` prepares before its first step."""

    def build(self) -> None:
        """Build and prepare model, optimizer, scheduler, data and hooks (idempotent: a built
        trainer is left as it is). ``train()``, ``find_lr()`` and the CLI call it; call it yourself
        to inspect or change the prepared objects before training. A state given to
        ``load_state_dict()`` before building is applied at its end."""
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
        self.unwrapped_optimizer = unwrap_optimizer(self.optimizer)
        self.unwrapped_scheduler = unwrap_scheduler(self.lr_scheduler)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self._fast_path = acc.distributed_type in PLAIN_GRADS
        self._sync_needed = acc.num_processes > 1
        self._set_no_sync()
        self._world = acc.num_processes
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
                       and bool(getattr(self.unwrapped_optimizer, "_step_supports_amp_scaling", False)))

        self.hooks = list(self.build_hooks() or [])
        for hook in self.hooks:
            if not isinstance(hook, BaseHook):
                raise TypeError(f"build_hooks() returned {type(hook).__name__}, which is not a BaseHook")
        self.index_hooks()
        self._built = True
        if acc.num_processes > 1:
            atexit.register(destroy_process_group)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _set_no_sync(self) -> None:
        # DeepSpeed decides gradient reduction from the accumulation boundary we set instead.
        self._use_no_sync = (self.no_sync_accumulate and self._sync_needed and self.gradient_accumulation_steps > 1
                             and not self._deepspeed)

    def set_gradient_accumulation_steps(self, accumulation: int) -> None:
        """Change the micro-batches per step of a built trainer (a resume on another number of
        processes keeps the samples per step this way; see :mod:`acceltrain.elastic`)."""
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"gradient_accumulation_steps must be an int >= 1, got {accumulation!r}")
        self.gradient_accumulation_steps = accumulation
        if self._built:
            self._set_no_sync()
            if self._deepspeed:  # the engine divides the loss by its own accumulation and counts samples by it
                engine = self.model
                engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * accumulation * engine.dp_world_size)
                if hasattr(engine.optimizer, "gradient_accumulation_steps"):  # ZeRO's CPU-offload accumulation
                    engine.optimizer.gradient_accumulation_steps = accumulation

    def index_hooks(self) -> None:
        """Decide which hooks each event calls; call it again after changing ``trainer.hooks``."""
        # Only the hooks that override an event are called for it.
        self._hooks_for = {
            name: [h for h in self.hooks if getattr(type(h), name) is not getattr(BaseHook, name)]
            for name in EVENTS
        }
        # BaseHook.reads_step depends only on the class: decided once, not asked every step.
        self._step_readers = [h for h in self.hooks if type(h).reads_step is not BaseHook.reads_step]
        self._reads_every_step = any(BaseHook.reads_step(h, self, 0) for h in self.hooks
                                     if type(h).reads_step is BaseHook.reads_step)

    def _configure_deepspeed(self, data: Any) -> None:
        """The trainer owns batch size, accumulation and clipping: write them into the DS config."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        batch_size = getattr(data, "batch_size", None)
        if not isinstance(batch_size, int):
            batch_size = config.get("train_micro_batch_size_per_gpu")
        if not isinstance(batch_size, int):
            raise ValueError("DeepSpeed needs the micro-batch size: return a DataLoader with batch_size from "
                             "build_data_loader(), or set train_micro_batch_size_per_gpu in the DeepSpeed config")
        k = self.gradient_accumulation_steps
        config["train_micro_batch_size_per_gpu"] = batch_size
        config["gradient_accumulation_steps"] = k
        config["train_batch_size"] = batch_size * k * self.accelerator.num_processes
        config["gradient_clipping"] = self.grad_clip or 0.0
