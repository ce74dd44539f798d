"""Learning-rate schedules on ``torch.optim.lr_scheduler.LambdaLR`` that checkpoint exactly.

Every schedule is ``lr = base_lr * multiplier * factor(step)`` where ``step`` counts optimizer
updates done (``scheduler.last_epoch``). ``factor`` is:

- warmup (all schedules): ``step / warmup_steps`` while ``step < warmup_steps`` (0 at the first
  update, as in ``transformers``);
- ``constant``: 1;
- ``linear`` / ``polynomial``: ``m + (1 - m) * (1 - p) ** power`` (``power=1`` for linear);
- ``cosine``: ``m + (1 - m) * 0.5 * (1 + cos(pi * p))``;
- ``cosine_restarts``: the cosine over cycles of ``t_0``, ``t_0 * t_mult``, ... steps counted
  from the end of warmup (SGDR); it keeps cycling past ``total_steps``;
- ``wsd``: 1 until the last ``decay_ratio * total_steps`` steps, then a ``decay_type``
  (``cosine``, ``linear`` or ``1-sqrt``) decay to ``m``;

with ``p = (step - warmup) / (total_steps - warmup)`` clamped to ``[0, 1]`` (decays hold at
``m`` after ``total_steps``) and ``m = min_lr_ratio``: the floor is a *ratio* of each param
group's base LR (so groups with different LRs keep their proportions).

The factor object is a small callable class: ``LambdaLR.state_dict()`` saves the ``__dict__``
of such objects (never of plain functions), so its fields, including the ``multiplier`` that
:func:`reduce_lr` / :func:`surge_lr` change, are part of the checkpoint and a resumed run
continues exactly.

This module is also the one place that unwraps Accelerate's optimizer and scheduler wrappers
(:func:`unwrap_optimizer`, :func:`unwrap_scheduler`) and rescales a run's LR (:func:`scale_lr`,
which the LR finder and ``GuardHook`` use too).

Example:
    >>> opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    >>> sched = build_schedule(opt, "cosine", total_steps=10_000, warmup_ratio=0.01, min_lr_ratio=0.1)
    >>> reduce_lr(sched, 0.5)  # e.g. after a loss spike: every later LR is halved, also after resume
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


@functools.cache
def _hf() -> SimpleNamespace:
    """The decay formulas of transformers' schedules, reused as they are (their public factories
    wrap them in functools.partial objects, whose state LambdaLR cannot save). Our own code only
    adds the shared warmup, the clamp past total_steps, SGDR restarts and the multiplier.
    Imported on first use, so `import acceltrain` does not load transformers."""
    from transformers import optimization as hf

    return SimpleNamespace(cosine=hf._get_cosine_schedule_with_warmup_lr_lambda,
                           polynomial=hf._get_polynomial_decay_schedule_with_warmup_lr_lambda,
                           wsd=hf._get_wsd_scheduler_lambda)


__all__ = ["SCHEDULES", "Schedule", "build_schedule", "reduce_lr", "surge_lr", "scale_lr", "base_lr",
           "unwrap_optimizer", "unwrap_scheduler"]

#: Schedule names and the extra keyword arguments each accepts.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": (),
    "cosine": (),
    "cosine_restarts": ("t_0", "t_mult"),
    "polynomial": ("power",),
    "wsd": ("decay_ratio", "decay_type"),
}
_WSD_DECAYS = ("cosine", "linear", "1-sqrt")


class Schedule:
    """The LR factor of one schedule as a callable whose fields are plain, JSON-able values.

    Build it with :func:`build_schedule`; ``multiplier`` scales every factor (see :func:`scale_lr`).

    Example:
        >>> f = Schedule("linear", total_steps=100, warmup_steps=10)
        >>> f(5), f(10), f(100)
        (0.5, 1.0, 0.0)
    """

    def __init__(self, name: str, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 t_0: int | None = None, t_mult: int = 1, power: float = 1.0, decay_ratio: float = 0.1,
                 decay_type: str = "cosine") -> None:
        self.name = name
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.t_0 = t_0
        self.t_mult = t_mult
        self.power = power
        self.decay_ratio = decay_ratio
        self.decay_type = decay_type
        self.multiplier = 1.0

    def __call__(self, step: int) -> float:
        return self.multiplier * self.factor(step)

    def factor(self, step: int) -> float:
        """The schedule's factor at ``step`` without the multiplier."""
        w, total, m = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < w:
            return step / w
        if self.name == "constant":
            return 1.0
        if self.name in ("linear", "polynomial"):
            return _hf().polynomial(min(step, total), num_warmup_steps=w, num_training_steps=total,
                                  lr_end=m, power=self.power if self.name == "polynomial" else 1.0, lr_init=1)
        if self.name == "cosine":
            return _hf().cosine(min(step, total), num_warmup_steps=w, num_training_steps=total,
                              num_cycles=0.5, min_lr_rate=m)
        if self.name == "wsd":
            decay = self.decay_steps()
            return _hf().wsd(step, num_warmup_steps=w, num_stable_steps=total - w - decay, num_decay_steps=decay,
                           warmup_type="linear", decay_type=self.decay_type, min_lr_ratio=m, num_cycles=0.5)
        # cosine_restarts: no library offers SGDR as a LambdaLR factor (torch's
        # CosineAnnealingWarmRestarts is its own stateful scheduler with an absolute floor).
        # Integer arithmetic, so restarts land exactly on t_0, t_0 + t_0 * t_mult, ...
        t_cur, period = step - w, self.t_0
        if self.t_mult == 1:
            t_cur %= period
        while t_cur >= period:  # t_mult >= 2: O(log) cycles
            t_cur -= period
            period *= self.t_mult
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t_cur / period))

    def decay_steps(self) -> int:
        """Length of the WSD decay phase: ``round(decay_ratio * total_steps)``, within what warmup leaves."""
        return min(round(self.decay_ratio * self.total_steps), self.total_steps - self.warmup_steps)


def _check_int(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an int >= {low}, got {value!r}")


def build_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int, *, warmup_steps: int = 0,
                   warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0, **kwargs: Any) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following schedule ``name`` (see the module docstring).

    Args:
        optimizer: The optimizer whose param groups' LRs are the base LRs.
        name: One of ``constant``, ``linear``, ``cosine``, ``cosine_restarts``, ``polynomial``, ``wsd``.
        total_steps: Optimizer updates in the run; decays reach ``min_lr_ratio`` there.
        warmup_steps: Linear warmup length in steps (give this or ``warmup_ratio``, not both).
        warmup_ratio: Warmup as a fraction of ``total_steps`` (rounded up, as transformers does).
        min_lr_ratio: The floor, as a fraction of each group's base LR, in ``[0, 1]``.
        **kwargs: ``t_0`` (required) and ``t_mult`` (int >= 1, default 1) for ``cosine_restarts``;
            ``power`` (default 1.0) for ``polynomial``; ``decay_ratio`` (fraction of
            ``total_steps``, default 0.1) and ``decay_type`` (default ``"cosine"``) for ``wsd``.

    Raises:
        ValueError: naming the bad field (unknown schedule, an argument that does not apply to
            it, a value out of range, or both warmup forms).

    Example:
        >>> sched = build_schedule(opt, "cosine_restarts", total_steps=1000, warmup_steps=50, t_0=100, t_mult=2)
    """
    if name not in SCHEDULES:
        raise ValueError(f"name: unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    extra = set(kwargs) - set(SCHEDULES[name])
    if extra:
        allowed = ", ".join(SCHEDULES[name]) or "none"
        raise ValueError(f"{sorted(extra)[0]}: not an argument of schedule {name!r} (it takes: {allowed})")
    _check_int("total_steps", total_steps, 1)
    if warmup_steps and warmup_ratio:
        raise ValueError("warmup_steps and warmup_ratio: give one of them, not both")
    if not (isinstance(warmup_ratio, (int, float)) and 0.0 <= warmup_ratio < 1.0):
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if warmup_ratio:
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    _check_int("warmup_steps", warmup_steps, 0)
    if name != "constant" and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps}) for a decaying schedule")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be in [0, 1] (a fraction of the base LR), got {min_lr_ratio!r}")
    if name == "cosine_restarts":
        if "t_0" not in kwargs:
            raise ValueError("t_0: schedule 'cosine_restarts' needs t_0, the first cycle's length in steps")
        _check_int("t_0", kwargs["t_0"], 1)
        _check_int("t_mult", kwargs.get("t_mult", 1), 1)
    if name == "polynomial" and not (isinstance(kwargs.get("power", 1.0), (int, float)) and kwargs.get("power", 1.0) > 0):
        raise ValueError(f"power must be a number > 0, got {kwargs['power']!r}")
    if name == "wsd":
        ratio = kwargs.get("decay_ratio", 0.1)
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise ValueError(f"decay_ratio must be in (0, 1], got {ratio!r}")
        if kwargs.get("decay_type", "cosine") not in _WSD_DECAYS:
            raise ValueError(f"decay_type must be one of {list(_WSD_DECAYS)}, got {kwargs['decay_type']!r}")
    schedule = Schedule(name, total_steps=total_steps, warmup_steps=warmup_steps,
                        min_lr_ratio=float(min_lr_ratio), **kwargs)
    return LambdaLR(optimizer, schedule)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The plain torch optimizer under Accelerate's ``AcceleratedOptimizer`` wrappers (None stays None).

    The trainer's hot path and everything that reads or edits optimizer state use it:
    ``AcceleratedOptimizer.step`` searches the file system for optional packages on every call.
    """
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_scheduler(scheduler: Any) -> Any:
    """The plain LR scheduler under Accelerate's ``AcceleratedScheduler`` wrappers (None stays None)."""
    while isinstance(scheduler, AcceleratedScheduler):
        scheduler = scheduler.scheduler
    return scheduler


def _unwrap(target: Any) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
    """(optimizer, scheduler or None) from an optimizer, a scheduler, Accelerate wrappers or a trainer."""
    if hasattr(target, "lr_scheduler") and hasattr(target, "optimizer"):  # a BaseTrainer
        target = target.lr_scheduler if target.lr_scheduler is not None else target.optimizer
    target = unwrap_scheduler(target)
    if isinstance(target, LRScheduler):
        return unwrap_optimizer(target.optimizer), target
    while not isinstance(target, torch.optim.Optimizer) and hasattr(target, "optimizer"):
        target = target.optimizer  # e.g. a scheduler that is not a torch LRScheduler
    target = unwrap_optimizer(target)
    if isinstance(target, torch.optim.Optimizer):
        return target, None
    raise TypeError(f"expected an optimizer, an LR scheduler or a trainer, got {type(target).__name__}")


def _our_schedules(scheduler: LRScheduler) -> list[Schedule] | None:
    """The distinct :class:`Schedule` objects of a LambdaLR made only of them, else None."""
    lambdas = getattr(scheduler, "lr_lambdas", [])
    ours = {id(f): f for f in lambdas if isinstance(f, Schedule)}  # one object may serve every group
    return list(ours.values()) if ours and len(ours) == len({id(f) for f in lambdas}) else None


def base_lr(target: Any) -> float:
    """The first param group's LR before the schedule's factor: what :func:`scale_lr` multiplies
    (``base_lrs[0]`` times the :class:`Schedule` multiplier; without a scheduler, the group's LR).

    Example:
        >>> scale_lr(trainer, 1e-3 / base_lr(trainer))  # group 0's base LR becomes 1e-3
    """
    optimizer, scheduler = _unwrap(target)
    if scheduler is None or not hasattr(scheduler, "base_lrs"):
        return float(optimizer.param_groups[0]["lr"])
    ours = _our_schedules(scheduler)
    return float(scheduler.base_lrs[0] * (scheduler.lr_lambdas[0].multiplier if ours else 1.0))


def scale_lr(target: Any, factor: float) -> float:
    """Multiply the LR by ``factor`` now and for the rest of the run; returns the first group's new LR.

    With a schedule from :func:`build_schedule` the factor goes into its ``multiplier`` (saved in
    the scheduler's ``state_dict``). Another torch scheduler gets its ``base_lrs`` scaled (also in
    its ``state_dict``; exact for closed-form schedulers such as ``LambdaLR``, and for chainable
    ones, which build on the current LR scaled here too). Without a scheduler the param groups'
    LRs are scaled (saved in the optimizer's ``state_dict``).

    Args:
        target: An optimizer, an LR scheduler (Accelerate wrappers are unwrapped), or a
            ``BaseTrainer`` (its scheduler if it has one, else its optimizer).
        factor: A number > 0.

    Example:
        >>> scale_lr(trainer, 0.5)
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    optimizer, scheduler = _unwrap(target)
    base_lrs = False  # the scheduler's base_lrs (and the groups' initial_lr they came from) scale
    if scheduler is not None:
        ours = _our_schedules(scheduler)
        if ours:
            for schedule in ours:
                schedule.multiplier *= factor
        elif hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            base_lrs = True
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor  # the next update already uses the new LR
        if base_lrs and "initial_lr" in group:  # what a scheduler built again later starts from
            group["initial_lr"] = group["initial_lr"] * factor
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return float(optimizer.param_groups[0]["lr"])


def reduce_lr(target: Any, factor: float = 0.5) -> float:
    """Lower the LR persistently (``factor`` < 1): see :func:`scale_lr`.

    Example:
        >>> reduce_lr(trainer.lr_scheduler, 0.5)
    """
    if not 0 < factor < 1:
        raise ValueError(f"reduce_lr factor must be in (0, 1), got {factor!r}")
    return scale_lr(target, factor)


def surge_lr(target: Any, factor: float = 3.0) -> float:
    """Raise the LR persistently (``factor`` > 1), e.g. SELGIS's final surge: see :func:`scale_lr`.

    Example:
        >>> surge_lr(trainer, 3.0)
    """
    if not factor > 1:
        raise ValueError(f"surge_lr factor must be > 1, got {factor!r}")
    return scale_lr(target, factor)
