"""LR range test: sweep the LR exponentially, watch the smoothed loss, suggest an LR, undo everything.

The sweep trains for real (one optimizer update per batch), so it saves what it will change
and puts it back bit for bit afterwards: parameters, buffers, gradients, the optimizer's state
and param groups, train/eval mode, and the Python, NumPy, torch (and CUDA) RNG states, plus the
data loader's own generators. The caller's next step is exactly what it would have been.

Example:
    >>> finder = LRFinder(model, torch.optim.AdamW(model.parameters()), criterion=nn.CrossEntropyLoss())
    >>> lr = finder.find(train_loader, end_lr=1.0)
    >>> finder.plot("lr_finder.png")
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import send_to_device

from .rng import rng_state, set_rng_state
from .schedules import base_lr, scale_lr, unwrap_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .trainer import BaseTrainer

__all__ = ["LRFinder", "find_lr"]

ForwardFn = Callable[[torch.nn.Module, Any], Any]


def suggest_lr(lrs: list[float], losses: list[float], method: str = "minimum", skip: int | None = None) -> float:
    """Suggest an LR from a sweep, ignoring its first ``skip`` points (default: 10%), where the
    moving average still rests on a few batches.

    ``"minimum"`` (the default of :meth:`LRFinder.find`): the LR of the lowest smoothed loss
    divided by 10 (fastai's ``lr_min``). ``"steepest"``: the LR where the smoothed loss falls
    fastest against log(LR), also ignoring the last 5% of the points. The minimum is
    the robust one: on small, noisy batches the moving average lags the LR by tens of steps and
    its steepest point jumps to wherever early noise happened to dip (measured on a linear
    regression with batches of 32 where 1/L = 0.05: steepest 1.1e-4, minimum/10 0.017).
    """
    if not lrs or len(lrs) != len(losses):
        raise ValueError("the sweep recorded no loss (or lrs and losses differ in length): nothing to suggest")
    n = len(lrs)
    lo = n // 10 if skip is None else skip
    if method == "minimum":
        lo = lo if lo < n else 0  # a sweep that stopped inside the warm-up: use what there is
        return float(lrs[lo + int(np.argmin(losses[lo:]))] / 10)
    if method != "steepest":
        raise ValueError(f"method must be 'minimum' or 'steepest', got {method!r}")
    hi = n - n // 20
    if hi - lo < 3:
        raise ValueError(f"method 'steepest' needs a longer sweep (got {n} points)")
    slope = np.gradient(np.asarray(losses[lo:hi]), np.log(np.asarray(lrs[lo:hi])))
    return float(lrs[lo + int(np.argmin(slope))])


class LRFinder:
    """The LR range test (Smith, 2017), in the SELGIS API.

    Args:
        model: The model (possibly wrapped by DDP; not moved).
        optimizer: Its optimizer (an Accelerate wrapper is fine). Every param group gets the
            same swept LR.
        criterion: ``criterion(model(x), y)`` for ``(x, y)`` batches (not needed for dict batches
            whose model output has ``.loss``, nor with a ``forward_fn``).
        device: Where batches go (default: the model's first parameter's device).
        trainable_only: Save and restore only parameters with ``requires_grad`` (saves memory
            for LoRA/frozen models; exact, since the optimizer never touches the others).
            Buffers are always saved.
        accelerator: Average each loss over its processes, so every rank takes the same
            decisions (every rank must then call :meth:`find`).

    Attributes:
        history: ``{"lrs": [...], "losses": [...] (smoothed), "raw_losses": [...]}``.
        suggestion: The last suggested LR (None before :meth:`find`).

    Example:
        >>> finder = LRFinder(model, optimizer, criterion=torch.nn.MSELoss())
        >>> lr = finder.find(loader, start_lr=1e-6, end_lr=1.0, num_steps=100)
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable | None = None,
                 device: torch.device | str | None = None, trainable_only: bool = False,
                 accelerator: Accelerator | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.trainable_only = trainable_only
        self.accelerator = accelerator
        if device is None:
            device = accelerator.device if accelerator is not None else next(model.parameters()).device
        self.device = torch.device(device)
        self.history: dict[str, list[float]] = {"lrs": [], "losses": [], "raw_losses": []}
        self.suggestion: float | None = None

    # ------------------------------------------------------------------ the sweep
    def find(self, train_loader: Iterable, forward_fn: ForwardFn | None = None, start_lr: float = 1e-7,
             end_lr: float = 10.0, num_steps: int = 100, smooth_f: float = 0.05, diverge_th: float = 5.0) -> float:
        """Sweep the LR from ``start_lr`` to ``end_lr`` over ``num_steps`` batches; return a suggestion.

        The loss is smoothed as ``avg = (1 - smooth_f) * avg + smooth_f * loss`` (bias-corrected,
        so the first point is the first loss). The sweep stops early when the smoothed loss
        exceeds ``diverge_th`` times its minimum or a loss is not finite; the first
        ``num_steps // 10`` points only warm the average up (a single noisy batch weighs a lot
        there), so they neither set the minimum nor stop the sweep. The suggestion is the
        LR of the lowest smoothed loss divided by 10 (see :func:`suggest_lr`, which also offers
        the steepest-descent point: ``suggest_lr(finder.history["lrs"], finder.history["losses"],
        "steepest")``).

        Args:
            train_loader: Batches; re-iterated when it runs out before ``num_steps``.
            forward_fn: ``forward_fn(model, batch) -> loss`` (or ``(loss, ...)``); ``None`` for
                the default: dict batches give ``model(**batch).loss``, ``(x, y)`` batches give
                ``criterion(model(x), y)``. A ``None`` loss skips the batch.
            start_lr: First LR (> 0).
            end_lr: Last LR (> ``start_lr``).
            num_steps: Number of updates (>= 2).
            smooth_f: Weight of the newest loss in the moving average, in (0, 1].
            diverge_th: Divergence threshold (> 1) on the smoothed loss.
        """
        if not 0 < start_lr < end_lr:
            raise ValueError(f"start_lr and end_lr must satisfy 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
        if not (isinstance(num_steps, int) and num_steps >= 2):
            raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
        if not 0 < smooth_f <= 1:
            raise ValueError(f"smooth_f must be in (0, 1], got {smooth_f}")
        if not diverge_th > 1:
            raise ValueError(f"diverge_th must be > 1, got {diverge_th}")
        forward_fn = forward_fn or self._default_forward
        saved = self._save(train_loader)
        self.history = {"lrs": [], "losses": [], "raw_losses": []}
        try:
            self._sweep(train_loader, forward_fn, start_lr, end_lr, num_steps, smooth_f, diverge_th)
        finally:
            self._restore(saved)
        self.suggestion = suggest_lr(self.history["lrs"], self.history["losses"], skip=num_steps // 10)
        return self.suggestion

    def _sweep(self, loader: Iterable, forward_fn: ForwardFn, start_lr: float, end_lr: float, num_steps: int,
               smooth_f: float, diverge_th: float) -> None:
        optimizer = self.optimizer
        self.model.train()
        batches = self._batches(loader)
        avg, best, warm = 0.0, math.inf, num_steps // 10
        for k in range(num_steps):
            lr = start_lr * (end_lr / start_lr) ** (k / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            unwrap_optimizer(optimizer).zero_grad(set_to_none=True)
            loss = None
            for _ in range(1000):  # a loader whose every batch gives None must not hang
                loss = self._loss(forward_fn, next(batches))
                if loss is not None:
                    break
            if loss is None:
                raise RuntimeError("forward gave no loss for 1000 batches in a row")
            loss.backward()  # not accelerator.backward: it would divide by its accumulation steps
            optimizer.step()
            value = self._reduced(loss)
            if not math.isfinite(value):
                break
            avg = (1 - smooth_f) * avg + smooth_f * value
            smoothed = avg / (1 - (1 - smooth_f) ** (k + 1))
            self.history["lrs"].append(lr)
            self.history["losses"].append(smoothed)
            self.history["raw_losses"].append(value)
            if k < warm:
                continue
            best = min(best, smoothed)
            if smoothed > diverge_th * best:
                break

    def _batches(self, loader: Iterable) -> Iterator[Any]:
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield send_to_device(batch, self.device)
            if empty or isinstance(loader, Iterator):
                raise ValueError("train_loader ran out of batches (a one-shot iterator cannot be re-read)")

    def _loss(self, forward_fn: ForwardFn, batch: Any) -> torch.Tensor | None:
        out = forward_fn(self.model, batch)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _default_forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise ValueError("forward_fn: the model returned no .loss for a dict batch; pass forward_fn=")
            return loss
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            if self.criterion is None:
                raise ValueError("criterion: (x, y) batches need a criterion (or pass forward_fn=)")
            x, y = batch
            return self.criterion(model(x), y)
        raise ValueError(f"forward_fn: cannot infer the loss of a {type(batch).__name__} batch; pass forward_fn=")

    def _reduced(self, loss: torch.Tensor) -> float:
        value = loss.detach().float().reshape(())
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)  # SUM, then divide: gloo has no AVG
            value = value / self.accelerator.num_processes
        return float(value.item())

    # ------------------------------------------------------------------ save / restore
    def _save(self, loader: Iterable) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad or not self.trainable_only]
        optimizer = unwrap_optimizer(self.optimizer)
        generators = [g for g in (getattr(loader, "generator", None),
                                  getattr(getattr(loader, "sampler", None), "generator", None))
                      if isinstance(g, torch.Generator)]
        with torch.no_grad():
            saved = {
                "params": [(p, p.detach().clone()) for p in params],
                # Backward accumulates into existing .grad in place: keep the tensors aside.
                "grads": [(p, p.grad) for p in self.model.parameters()],
                "buffers": [(b, b.detach().clone()) for b in self.model.buffers()],
                "state": {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                          for p, s in optimizer.state.items()},
                "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                           for g in optimizer.param_groups],
                "training": [(m, m.training) for m in self.model.modules()],
                "rng": rng_state(),
                "generators": [(g, g.get_state()) for g in generators],
            }
        for p in self.model.parameters():
            p.grad = None
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        optimizer = unwrap_optimizer(self.optimizer)
        with torch.no_grad():
            for p, value in saved["params"]:
                p.copy_(value)
            for b, value in saved["buffers"]:
                b.copy_(value)
        for p, grad in saved["grads"]:
            p.grad = grad
        optimizer.state.clear()
        optimizer.state.update(saved["state"])
        for group, values in zip(optimizer.param_groups, saved["groups"], strict=True):
            group.update(values)
        for module, training in saved["training"]:
            module.training = training
        set_rng_state(saved["rng"])
        for generator, state in saved["generators"]:
            generator.set_state(state)

    # ------------------------------------------------------------------ plot
    def plot(self, path: str | Path, *, title: str = "LR range test") -> Path:
        """Save a PNG of the smoothed loss against the LR (log axis) with the suggestion marked.

        Raises:
            ImportError: matplotlib is missing (``pip install 'acceltrain[plot]'``).
        """
        if not self.history["lrs"]:
            raise RuntimeError("plot() needs a sweep: call find() first")
        try:
            from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
        except ImportError:
            raise ImportError("LRFinder.plot needs matplotlib: pip install 'acceltrain[plot]'") from None
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot(self.history["lrs"], self.history["losses"], label="smoothed loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(title)
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggestion {self.suggestion:.2e}")
        ax.legend()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")  # Figure.savefig renders with Agg for PNG
        return path


def find_lr(trainer: BaseTrainer, *, apply: bool = False, plot: str | Path | None = None,
            trainable_only: bool = True, **kwargs: Any) -> float:
    """Run the LR range test with a trainer's own ``forward``, data and optimizer.

    The trainer is built if needed. Each update uses one micro-batch (no accumulation, no
    clipping) under the trainer's autocast; with ``count_loss_items`` overridden, the summed
    loss is divided by the batch's items. Every rank must call it (losses are averaged over
    ranks so all stop together). The data position is restored, so training then starts where
    it would have. fp16 loss scaling and DeepSpeed are not supported.

    Args:
        trainer: A ``BaseTrainer``.
        apply: Scale every param group's base LR (and the scheduler's) so that group 0's
            becomes the suggestion, keeping the groups' ratios.
        plot: Also save the sweep's PNG there (see :meth:`LRFinder.plot`; main process only).
        trainable_only: See :class:`LRFinder`.
        **kwargs: :meth:`LRFinder.find` arguments (``start_lr``, ``end_lr``, ``num_steps``, ...).

    Example:
        >>> lr = find_lr(trainer, end_lr=1.0, apply=True)
        >>> trainer.train()
    """
    trainer.build()
    acc = trainer.accelerator
    if trainer.grad_scaler is not None or trainer.engine_kind == "deepspeed":
        raise ValueError("find_lr does not support fp16 loss scaling or DeepSpeed: run it in bf16/fp32 without DeepSpeed")
    if isinstance(trainer.data_loader, Iterator):
        raise ValueError("find_lr needs a re-iterable data loader, not a one-shot iterator")

    def forward(model: torch.nn.Module, batch: Any) -> torch.Tensor | None:
        with trainer.autocast():
            loss, _ = trainer.forward(batch)
        if loss is not None and trainer.counts_items:
            loss = loss / torch.as_tensor(trainer.count_loss_items(batch), device=loss.device).clamp(min=1)
        return loss

    data_state = trainer.data.state_dict()
    finder = LRFinder(trainer.model, trainer.optimizer, device=trainer.device, trainable_only=trainable_only,
                      accelerator=acc)
    try:
        lr = finder.find(trainer.data_loader, forward_fn=forward, **kwargs)
    finally:
        trainer.data.load_state_dict(data_state)
    if plot is not None and trainer.is_main_process:
        finder.plot(plot)
    if apply:  # group 0's base LR becomes the suggestion; the groups keep their ratios
        scale_lr(trainer, lr / base_lr(trainer))
    return lr
