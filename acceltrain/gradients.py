"""How gradients reach the weights on each engine: the accumulation window's forwards and
backwards (``no_sync``, loss normalisation by items), clipping, the DeepSpeed step and the
optimizer step, for plain tensors (one process, DDP), FSDP2 and DeepSpeed.

A mixin of :class:`~acceltrain.trainer.BaseTrainer`, kept apart so the step loop reads in one
sitting; these methods use the trainer's prepared objects and are not public API. Whether a
step's gradients are finite, and what happens when they are not, is
:mod:`acceltrain.non_finite`.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from accelerate.utils import DistributedType

from .data_stream import EXHAUSTED

# Distributed types where gradients are plain tensors and torch's own clipping is exact.
PLAIN_GRADS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def no_context() -> contextlib.nullcontext:
    """A do-nothing context (the trainer's ``autocast()`` without mixed precision)."""
    return _NO_CONTEXT


class GradientOps:
    """Engine-specific parts of a step (see BaseTrainer.run_step for the order)."""

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
        if self._counts_items and batches:
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
        unit = k == 1 and not self._counts_items  # then no `loss * 1.0` kernel per micro-batch
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
            detached = loss.detach() * scale if self._counts_items else loss.detach()
            loss_sum = detached if loss_sum is None else loss_sum + detached
        if items_work is not None:  # items mode, and no micro-batch gave a loss
            items_work.wait()
        return loss_sum, contributed, records, positions, data_time

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
            grads = [p.grad for p in self.trainable_parameters if p.grad is not None]
            if not grads:  # no micro-batch gave a loss
                return torch.zeros((), device=self.device)
            if unscale and self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.unwrapped_optimizer)
            if self.grad_clip is not None:
                return torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.grad_clip, foreach=True)
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        if not unscale and self.grad_scaler is not None:
            # A re-clip after rescaling: Accelerate's clip would unscale a second time.
            return torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.grad_clip or math.inf)
        # FSDP / DeepSpeed: Accelerate knows how to reduce sharded norms (and unscales once).
        norm = self.accelerator.clip_grad_norm_(self.trainable_parameters, self.grad_clip or math.inf)
        if norm is None:  # DeepSpeed before its first step
            return torch.zeros((), device=self.device)
        # FSDP2 returns the (already reduced) norm as a replicated DTensor: take the plain value.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _reweigh_window(self, grad_norm: torch.Tensor, factor: float) -> torch.Tensor:
        """Some micro-batches gave no loss (or the data ran out mid-window): each contributing
        micro-batch weighs 1/total, not 1/k, so nothing is under-scaled. Clipping already used
        the smaller norm; clipping again after the rescale gives exactly what clipping the
        rescaled gradients once would. Returns the rescaled norm."""
        torch._foreach_mul_([p.grad for p in self.trainable_parameters if p.grad is not None], factor)
        if self.grad_clip is not None:
            self._grad_norm(unscale=False)
        return grad_norm * factor

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

    def _zero_grad(self) -> None:
        self.unwrapped_optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, found_inf: torch.Tensor | None = None) -> None:
        """Apply the update; with ``found_inf`` (a 0-dim device flag, quiet steps only) the
        optimizer's fused kernel skips it on the device when the flag is set."""
        if not self._fast_path:
            self.optimizer.step()
        elif self.grad_scaler is not None:
            # With a fused optimizer the scaler passes its own found_inf (from unscale_) to the
            # kernel: no host read; otherwise it reads found_inf to decide (one sync).
            self.grad_scaler.step(self.unwrapped_optimizer)
            self.grad_scaler.update()
        elif found_inf is not None:
            opt = self.unwrapped_optimizer
            # The attributes torch's fused Adam/AdamW/SGD/Adagrad read (what GradScaler sets).
            opt.grad_scale, opt.found_inf = None, found_inf
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        else:
            self.unwrapped_optimizer.step()
