"""How gradients reach the weights on each engine: backward, clipping, the agreed finiteness
check and the optimizer step, for plain tensors (one process, DDP), FSDP2 and DeepSpeed.

A mixin of :class:`~acceltrain.trainer.BaseTrainer`, kept apart so the step loop reads in one
sitting; these methods use the trainer's prepared objects and are not public API.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from .watchdog import start_launcher_watchdog

# Distributed types where gradients are plain tensors and torch's own clipping is exact.
PLAIN_GRADS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
# Device-side finiteness flags are read on the host at least this often, even when no hook
# reads a step: a run gone non-finite is then reported within this many steps.
_MAX_DEFERRED_STEPS = 100


def reset_accelerate_state(*, cpu: bool) -> None:
    """Clear Accelerate's process-wide state so the next ``Accelerator`` gets the settings it asks for.

    ``AcceleratorState``/``PartialState``/``GradientState`` are singletons: without this a second
    trainer in one process (a notebook, a sweep) asking for another ``mixed_precision`` fails
    with "AcceleratorState has already been initialized". ``_reset_state`` is private API (what
    Accelerate's own test base class calls); this is the one place that uses it. Under a live
    process group only the single-process parts are reset: ``PartialState`` owns the group.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        partial = PartialState._shared_state
        if partial and cpu and partial.get("device") is not None and partial["device"].type != "cpu":
            raise ValueError(f"device='cpu' was asked for, but this process's distributed state already runs on "
                             f"{partial['device']}: a running process group keeps its device")
        AcceleratorState._reset_state(reset_partial_state=False)
    else:
        AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class GradientOps:
    """Engine-specific parts of a step (see BaseTrainer._run_step for the order)."""

    def _guard_processes(self, collective_timeout: float | None) -> float | None:
        """Validate ``collective_timeout``; in a multi-process run, start the launcher watchdog
        (a rank whose launcher died stops, then exits, instead of sleeping in a collective)."""
        if collective_timeout is not None and (
            isinstance(collective_timeout, bool) or not isinstance(collective_timeout, int | float)
            or not 0 < collective_timeout < math.inf
        ):
            raise ValueError(f"collective_timeout must be a number of seconds > 0 or None, got {collective_timeout!r}")
        if self.accelerator.num_processes > 1:
            start_launcher_watchdog()
        return None if collective_timeout is None else float(collective_timeout)

    def _make_accelerator(
        self, mixed_precision: str | None, device: Any, kwargs: dict[str, Any] | None
    ) -> Accelerator:
        kwargs = dict(kwargs or {})
        kwargs.setdefault("mixed_precision", mixed_precision or "no")
        # The trainer steps the scheduler once per optimizer update itself; Accelerate's
        # default would step it num_processes times.
        kwargs.setdefault("step_scheduler_with_optimizer", False)
        if device is not None:
            device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            if device.type == "cpu":
                kwargs.setdefault("cpu", True)
            elif device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use device='cpu'")
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Without a GPU, Accelerate leaves the backend unset for some launchers
            # (DeepSpeed under torchrun) and every process believes it is rank 0 of 1.
            handlers = list(kwargs.get("kwargs_handlers") or [])
            if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
            kwargs["kwargs_handlers"] = handlers
        reset_accelerate_state(cpu=bool(kwargs.get("cpu")))
        acc = Accelerator(**kwargs)
        asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
        if (asked or kwargs.get("deepspeed_plugin")) and acc.distributed_type != DistributedType.DEEPSPEED:
            # Accelerate drops the DeepSpeed plugin without a word when it is told to use the CPU.
            raise ValueError(
                f"DeepSpeed was asked for but Accelerate chose {acc.distributed_type.value}: ACCELERATE_USE_CPU=true "
                "or device='cpu' turns DeepSpeed off; for DeepSpeed on CPU ranks leave both unset")
        return acc

    def _backward(self, loss: torch.Tensor) -> None:
        if not self._fast_path:
            self.accelerator.backward(loss)
        elif self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()

    def _grad_norm(self, unscale: bool = True) -> torch.Tensor:
        """Clip to ``grad_clip`` (or only measure) and return the global norm before clipping."""
        if self._fast_path:
            grads = [p.grad for p in self._trainable if p.grad is not None]
            if not grads:  # no micro-batch gave a loss
                return torch.zeros((), device=self.device)
            if unscale and self.grad_scaler is not None:
                self.grad_scaler.unscale_(self._inner_optimizer)
            if self.grad_clip is not None:
                return torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip, foreach=True)
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        if not unscale and self.grad_scaler is not None:
            # A re-clip after rescaling: Accelerate's clip would unscale a second time.
            return torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip or math.inf)
        # FSDP / DeepSpeed: Accelerate knows how to reduce sharded norms (and unscales once).
        norm = self.accelerator.clip_grad_norm_(self._trainable, self.grad_clip or math.inf)
        if norm is None:  # DeepSpeed before its first step
            return torch.zeros((), device=self.device)
        # FSDP2 returns the (already reduced) norm as a replicated DTensor: take the plain value.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

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

    def _deepspeed_step(self) -> torch.Tensor:
        """Let the engine clip and step; it skips (and zeroes) a step with non-finite gradients
        itself, agreed across ranks, so the trainer only reads the outcome: the decision comes
        after the update was attempted, unlike the other engines (hooks cannot veto it)."""
        engine = self.model
        engine.step()
        norm = engine.get_global_grad_norm()
        if bool(getattr(engine.optimizer, "overflow", False)):
            return torch.tensor(math.inf, device=self.device)
        return torch.tensor(float(norm) if norm is not None else 0.0, device=self.device)

    def _start_agreement(self, contributed: int) -> None:
        """Launch the step's agreement (micro-batches with a loss, anyone stopping?) before the
        window's last backward, so it completes beside it (see ``_agree_early``)."""
        flags = torch.tensor([float(contributed), float(self._stop_local)], device=self.device)
        self._agreement = (flags, torch.distributed.all_reduce(flags, async_op=True))  # SUM

    def _agree(self, grad_norm: torch.Tensor, contributed: int) -> tuple[bool, int, bool]:
        """One collective per step: (all finite?, micro-batches with a loss, anyone stopping?)."""
        if not self._sync_needed:
            if self._pending_flags:  # one read for this step's norm and the quiet steps' flags
                values = torch.stack([grad_norm.detach().reshape(()).float(),
                                      *(flag for _, _, flag in self._pending_flags)]).tolist()
                self._settle(values[1:])
                return math.isfinite(values[0]), contributed, self._stop_local
            return math.isfinite(grad_norm.item()), contributed, self._stop_local
        if self._agreement is not None:
            # The gradients were reduced across ranks, so finiteness is the same everywhere.
            (flags, work), self._agreement = self._agreement, None
            work.wait()
            # One read from the device for the flags and the norm (on a GPU: one host sync).
            total, stop, norm = torch.cat([flags, grad_norm.detach().reshape(1).to(flags)]).tolist()
            return math.isfinite(norm), int(total), stop > 0
        flags = torch.stack(
            [
                (~torch.isfinite(grad_norm)).to(torch.float32),
                torch.tensor(float(contributed), device=grad_norm.device),
                torch.tensor(float(self._stop_local), device=grad_norm.device),
            ]
        ).to(self.device)
        torch.distributed.all_reduce(flags)  # SUM: gloo has no AVG
        bad, total, stop = flags.tolist()
        return bad == 0, int(total), stop > 0

    def _quiet(self) -> bool:
        """Whether the coming step may keep its finite flag on the device (no hook reads it)."""
        if not self._defer or self._reads_every_step or len(self._pending_flags) >= _MAX_DEFERRED_STEPS:
            return False
        step = self.step + 1
        return not any(h.reads_step(self, step) for h in self._step_readers)

    def _settle_pending(self) -> None:
        """Read the quiet steps' device-side finite flags now (one host read), if any."""
        if self._pending_flags:
            self._settle(torch.stack([flag for _, _, flag in self._pending_flags]).tolist())

    def _settle(self, flags: list[float]) -> None:
        """Account for the quiet steps whose flags were just read: warn about the ones the
        optimizer skipped on the device, and raise once more than ``max_non_finite_grad_retries``
        of them came in a row (each was already "retried" by the next step's fresh batches)."""
        from .trainer import _MAX_SCALER_BACKOFFS, NonFiniteError

        # An fp16 overflow is the scaler's routine (it lowered the scale on the device), not a
        # fault: as on the host path, that many in a row spend no retry.
        allowed = self.max_non_finite_grad_retries + (_MAX_SCALER_BACKOFFS if self.grad_scaler is not None else 0)
        pending, self._pending_flags = self._pending_flags, []
        steps: list[int] = []
        batches: list[int] = []
        too_long: list[tuple[int, list[int]]] | None = None  # the first run past the retries, in full
        for (step, positions, _), flag in zip(pending, flags, strict=True):
            if flag:
                steps.append(step)
                batches.extend(positions)
                self._deferred_run.append((step, positions))
                if too_long is None and len(self._deferred_run) > allowed:
                    too_long = self._deferred_run
            else:
                self._deferred_run = []
        if not steps:
            return
        if self.grad_scaler is None:
            self.logger.warning("steps %s: non-finite gradients, the update was skipped on the device (batches %s)",
                                steps, batches)
        else:
            self.logger.info("steps %s: fp16 overflow or non-finite gradients, the update was skipped and the "
                             "scale lowered on the device (batches %s)", steps, batches)
        if self._settled is not None:
            steps, batches = self._settled[0] + steps, self._settled[1] + batches
        self._settled = (steps, batches)
        run = too_long
        if run is not None:
            raise NonFiniteError(
                f"steps {run[0][0]}-{run[-1][0]}: non-finite gradients in {len(run)} consecutive steps, each "
                f"skipped on the device (max_non_finite_grad_retries={self.max_non_finite_grad_retries}"
                f"{f', plus {_MAX_SCALER_BACKOFFS} scaler back-offs' if self.grad_scaler is not None else ''}); "
                f"skipped batches {[b for _, positions in run for b in positions]}")

    def _zero_grad(self) -> None:
        self._inner_optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, found_inf: torch.Tensor | None = None) -> None:
        """Apply the update; with ``found_inf`` (a 0-dim device flag, quiet steps only) the
        optimizer's fused kernel skips it on the device when the flag is set."""
        if not self._fast_path:
            self.optimizer.step()
        elif self.grad_scaler is not None:
            # With a fused optimizer the scaler passes its own found_inf (from unscale_) to the
            # kernel: no host read; otherwise it reads found_inf to decide (one sync).
            self.grad_scaler.step(self._inner_optimizer)
            self.grad_scaler.update()
        elif found_inf is not None:
            opt = self._inner_optimizer
            # The attributes torch's fused Adam/AdamW/SGD/Adagrad read (what GradScaler sets).
            opt.grad_scale, opt.found_inf = None, found_inf
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        else:
            self._inner_optimizer.step()
