"""Creating the trainer's ``Accelerator`` and ending its process group.

Accelerate keeps its state in process-wide singletons; this module is the one place that resets
them (:func:`reset_accelerate_state`), so several trainers in one process each get the settings
they ask for. :func:`make_accelerator` adds what the trainer needs on top of Accelerate's
defaults (the scheduler stepped once per update, gloo on CPU-only multi-process launches, a
loud refusal when DeepSpeed was asked for but dropped), and :func:`destroy_process_group` ends
a multi-process run without gloo aborting the interpreter.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from .watchdog import start_launcher_watchdog

__all__ = ["reset_accelerate_state", "make_accelerator", "check_collective_timeout", "destroy_process_group",
           "max_over_ranks"]

_EXIT_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)


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


def make_accelerator(mixed_precision: str | None, device: Any, kwargs: dict[str, Any] | None) -> Accelerator:
    """The ``Accelerator`` for a trainer that was given none (see ``BaseTrainer``'s arguments)."""
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


def check_collective_timeout(collective_timeout: float | None, accelerator: Accelerator) -> float | None:
    """Validate ``collective_timeout``; in a multi-process run, start the launcher watchdog
    (a rank whose launcher died stops, then exits, instead of sleeping in a collective)."""
    if collective_timeout is not None and (
        isinstance(collective_timeout, bool) or not isinstance(collective_timeout, int | float)
        or not 0 < collective_timeout < math.inf
    ):
        raise ValueError(f"collective_timeout must be a number of seconds > 0 or None, got {collective_timeout!r}")
    if accelerator.num_processes > 1:
        start_launcher_watchdog()
    return None if collective_timeout is None else float(collective_timeout)


def max_over_ranks(value: int, device: torch.device | str) -> int:
    """The largest of every rank's ``value`` (one small all-reduce; ``value`` itself on one
    process). Every rank must call it: for decisions the ranks must take together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() == 1:
        return int(value)
    flag = torch.tensor([int(value)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def destroy_process_group(meet: bool = True) -> None:
    """Tear the process group down (if any), after a barrier unless ``meet`` is False."""
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
