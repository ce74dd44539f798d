"""SELGIS's callbacks, scheduler and utilities, as thin names over acceltrain's hooks and functions.

Each ``*Callback`` *is* the acceltrain hook it names (a subclass that converts epochs to steps
when training starts), so it checkpoints, resumes and agrees across ranks as the hook does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import send_to_device

from ..hooks import CheckpointingHook, ProgressHook
from ..hooks.base import BaseHook
from ..hooks.early_stopping import EarlyStoppingHook
from ..hooks.sparsity import SparsityHook
from ..schedules import build_schedule, reduce_lr, surge_lr
from ..utils import count_parameters as _count_parameters
from .selgis_config import SCHEDULER_NAMES, SelgisConfig

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

__all__ = [
    "Callback", "CheckpointCallback", "EarlyStoppingCallback", "LoggingCallback", "SparsityCallback",
    "WandBCallback", "SmartScheduler", "get_transformer_scheduler", "get_device", "count_parameters", "format_params",
    "move_to_device", "unpack_batch", "get_optimizer_grouped_params", "is_dict_like", "to_dict",
    "steps_per_epoch",
]

logger = logging.getLogger("acceltrain")


def steps_per_epoch(trainer: BaseTrainer) -> int:
    """Optimizer updates per pass over the training data (the SELGIS Trainer sets it; 1 otherwise)."""
    return int(getattr(trainer, "steps_per_epoch", None) or 1)


# ---------------------------------------------------------------------- callbacks
class Callback(BaseHook):
    """SELGIS's callback base: override ``on_train_begin``, ``on_epoch_end``, ... as in SELGIS.

    The events come from the acceltrain loop: ``on_step_begin(trainer, step)`` /
    ``on_step_end(trainer, step, loss)`` around each optimizer update (``loss`` is the step's
    loss tensor: reading it with ``.item()`` syncs the device), ``on_epoch_begin(trainer,
    epoch)`` / ``on_epoch_end(trainer, epoch, metrics)`` every ``steps_per_epoch`` updates
    (``metrics``: the evaluation just run, or ``{}``), ``on_evaluate(trainer, metrics)`` after
    each evaluation, ``on_train_begin`` / ``on_train_end(trainer)``.
    """

    def on_train_begin(self, trainer: BaseTrainer) -> None: ...
    def on_train_end(self, trainer: BaseTrainer) -> None: ...
    def on_epoch_begin(self, trainer: BaseTrainer, epoch: int) -> None: ...
    def on_epoch_end(self, trainer: BaseTrainer, epoch: int, metrics: dict[str, float]) -> None: ...
    def on_step_begin(self, trainer: BaseTrainer, step: int) -> None: ...
    def on_step_end(self, trainer: BaseTrainer, step: int, loss: Any) -> None: ...
    def on_evaluate(self, trainer: BaseTrainer, metrics: dict[str, float]) -> None: ...

    # acceltrain events -> SELGIS events
    def on_before_train(self, trainer: BaseTrainer) -> None:
        self.on_train_begin(trainer)

    def on_before_step(self, trainer: BaseTrainer) -> None:
        spe = steps_per_epoch(trainer)
        if trainer.step % spe == 0:
            self.on_epoch_begin(trainer, trainer.step // spe)
        self.on_step_begin(trainer, trainer.step)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self.on_step_end(trainer, trainer.step, trainer.step_info.get("loss"))
        spe = steps_per_epoch(trainer)
        if trainer.step % spe == 0:
            metrics = trainer.step_info.get("eval") or {}
            self.on_epoch_end(trainer, trainer.step // spe - 1, dict(metrics))

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], dry_run: bool = False) -> None:
        if isinstance(records.get("eval"), Mapping):
            self.on_evaluate(trainer, dict(records["eval"]))

    def on_after_train(self, trainer: BaseTrainer) -> None:
        self.on_train_end(trainer)


class EarlyStoppingCallback(EarlyStoppingHook):
    """``EarlyStoppingHook`` on ``eval/<metric>``; patience counts evaluations (one per epoch by default)."""

    def __init__(self, patience: int = 5, min_delta: float = 1e-4, metric: str = "loss", mode: str = "min") -> None:
        super().__init__(patience, min_delta=min_delta, metric=f"eval/{metric}", mode=mode)

    @property
    def should_stop(self) -> bool:
        """True once this callback has stopped the run."""
        return self.stopped_step is not None


class CheckpointCallback(CheckpointingHook):
    """``CheckpointingHook`` saving every epoch into ``output_dir`` (resumed from on the next start).

    ``save_best_only`` keeps the best checkpoint by ``eval/<metric>`` (``checkpoint_best``) and
    also the newest one: acceltrain keeps the newest so that a restart resumes exactly.
    Otherwise the ``save_total_limit`` newest are kept, and the best one too.
    """

    def __init__(self, output_dir: str, save_best_only: bool = True, save_total_limit: int = 3,
                 metric: str = "loss", mode: str = "min") -> None:
        super().__init__(interval=1, path=output_dir, keep_previous=1 if save_best_only else save_total_limit,
                         keep_best=1, metric=f"eval/{metric}", mode=mode)
        self._epochs = True

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if self._epochs:
            self.interval = steps_per_epoch(trainer)
        super().on_before_train(trainer)


class LoggingCallback(ProgressHook):
    """``ProgressHook``: a line with loss, LR, step time, ... every ``log_every`` updates."""

    def __init__(self, log_every: int = 10) -> None:
        super().__init__(interval=log_every)


def WandBCallback(project: str, name: str | None = None, config: dict | None = None) -> BaseHook:  # noqa: N802
    """``WandbHook(project=..., name=..., config=...)`` (needs ``pip install 'acceltrain[wandb]'``)."""
    from ..hooks import WandbHook

    return WandbHook(project=project, name=name, config=config)


class SparsityCallback(SparsityHook):
    """``SparsityHook`` with SELGIS's epoch units: prune every ``frequency`` epochs from ``start_epoch``.

    Converted to steps when training starts (``steps_per_epoch`` of the trainer; logged). The
    sparsity ramps up (cubic) to ``target_sparsity`` at the end of training, as acceltrain's hook does.
    """

    def __init__(self, target_sparsity: float = 0.5, start_epoch: int = 0, frequency: int = 1, skip_lora: bool = True,
                 min_params_to_prune: int = 1000, log_details: bool = False) -> None:
        super().__init__(target_sparsity, start_step=0, frequency=1, skip_lora=skip_lora,
                         min_params_to_prune=min_params_to_prune)
        self.start_epoch, self.frequency_epochs, self.log_details = start_epoch, frequency, log_details

    def on_before_train(self, trainer: BaseTrainer) -> None:
        spe = steps_per_epoch(trainer)
        self.start_step, self.frequency = self.start_epoch * spe, self.frequency_epochs * spe
        if self.start_step >= trainer.max_steps:
            raise ValueError(f"sparsity_start_epoch: epoch {self.start_epoch} (step {self.start_step}) is not "
                             f"before the end of training (step {trainer.max_steps})")
        logger.info("SparsityCallback: start_epoch %d -> step %d, frequency %d epoch(s) -> %d steps",
                    self.start_epoch, self.start_step, self.frequency_epochs, self.frequency)
        super().on_before_train(trainer)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        super().on_after_step(trainer)
        if self.log_details and trainer.step % self.frequency == 0 and trainer.is_main_process:
            logger.info("sparsity per layer at step %d: %s", trainer.step, self.layer_sparsity)

    @staticmethod
    def get_layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
        """Fraction of exactly-zero weights of every Linear / Conv layer, by module name."""
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                weight = module.weight.detach()
                out[name] = float((weight == 0).sum()) / weight.numel()
        return out


# ---------------------------------------------------------------------- scheduler
class SmartScheduler:
    """SELGIS's scheduler over :func:`acceltrain.schedules.build_schedule`.

    Epoch-based (``step_epoch(epoch)``) when ``num_training_steps`` is None or ``warmup_ratio``
    is 0: the schedule is laid over ``config.max_epochs`` epochs with ``warmup_epochs`` and
    ``t_0`` in epochs. Step-based (``step()``) otherwise, over ``num_training_steps``, with
    ``t_0`` epochs turned into steps (``num_training_steps / max_epochs`` each; logged). The LR
    floor is ``config.min_lr``; ``reduce_lr`` / ``surge_lr`` scale every later LR (persistently).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, config: SelgisConfig,
                 num_training_steps: int | None = None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = initial_lr
            group.pop("initial_lr", None)
        self.optimizer, self.config = optimizer, config
        self.by_step = num_training_steps is not None and config.warmup_ratio > 0
        total = num_training_steps if self.by_step else config.max_epochs
        name = SCHEDULER_NAMES[config.scheduler_type]
        extra = {"t_0": config.t_0, "t_mult": config.t_mult} if name == "cosine_restarts" else {}
        if extra and self.by_step:  # t_0 is in epochs (SELGIS): in steps, an epoch is total / max_epochs
            per_epoch = max(1, int(total) // config.max_epochs)
            extra["t_0"] = config.t_0 * per_epoch
            logger.info("SmartScheduler: t_0 %d epoch(s) -> %d steps (%d per epoch)", config.t_0, extra["t_0"],
                        per_epoch)
        self.scheduler = build_schedule(
            optimizer, name, max(1, int(total)), warmup_steps=0 if self.by_step else config.warmup_epochs,
            warmup_ratio=config.warmup_ratio if self.by_step else 0.0,
            min_lr_ratio=min(1.0, config.min_lr / initial_lr), **extra)

    def step(self) -> float:
        """Advance one optimizer step; returns the new LR."""
        self.scheduler.step()
        return self.get_lr()

    def step_epoch(self, epoch: int) -> float:
        """Set the LR for the end of ``epoch`` (0-based: after it, ``epoch + 1`` epochs are done)."""
        while self.scheduler.last_epoch < epoch + 1:
            self.scheduler.step()
        return self.get_lr()

    def reduce_lr(self, factor: float = 0.5) -> float:
        reduce_lr(self.scheduler, factor)
        return self.get_lr()

    def surge_lr(self, factor: float = 3.0) -> float:
        surge_lr(self.scheduler, factor)
        return self.get_lr()

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def get_transformer_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str, num_warmup_steps: int,
                              num_training_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler`` (the Hugging Face schedules, by their names)."""
    from transformers import get_scheduler

    return get_scheduler(scheduler_type, optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps)


# ---------------------------------------------------------------------- utils
def get_device(preference: str = "auto") -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cuda``, ``cpu`` or ``mps``; prints the device.

    Raises:
        ValueError: an unknown name, or a device this machine does not have.
    """
    if preference not in ("auto", "cuda", "cpu", "mps"):
        raise ValueError(f"device must be one of auto, cuda, cpu, mps, got {preference!r}")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA GPU is available on this machine")
    if preference == "mps" and not mps:
        raise ValueError("device 'mps': MPS is not available on this machine")
    device = torch.device(preference)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"Device: cuda ({props.name}, {props.total_memory / 2**30:.1f} GiB)")
    else:
        print(f"Device: {device.type}")
    return device


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Parameters of ``model`` (SELGIS's default counts trainable ones only)."""
    return _count_parameters(model, trainable_only=trainable_only)


def format_params(num: int | float) -> str:
    """SELGIS's short form: ``"1.2M"``, ``"3.4B"``, ``"12.3K"``, ``"999"``."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= size:
            return f"{num / size:.1f}{unit}"
    return str(int(num))


def move_to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Every tensor in a nested batch moved to ``device`` (Accelerate's ``send_to_device``)."""
    return send_to_device(batch, device, non_blocking=non_blocking)


def is_dict_like(obj: Any) -> bool:
    """True for mappings (dicts, ``BatchEncoding``)."""
    return isinstance(obj, Mapping)


def to_dict(obj: Any) -> dict:
    """A plain dict of a dict-like object."""
    if not is_dict_like(obj):
        raise TypeError(f"to_dict: expected a dict-like object, got {type(obj).__name__}")
    return dict(obj.items())


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)``: a dict's ``labels`` / ``label`` key (inputs: the other keys), an
    ``(inputs, labels)`` pair, or ``(batch, None)`` for a single tensor."""
    if is_dict_like(batch):
        key = "labels" if "labels" in batch else "label" if "label" in batch else None
        return {k: v for k, v in batch.items() if k != key}, batch[key] if key else None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        return tuple(batch[:-1]), batch[-1]
    return batch, None


def get_optimizer_grouped_params(model: torch.nn.Module, weight_decay: float,
                                 no_decay_keywords: Sequence[str] = ("bias", "LayerNorm", "layer_norm")) -> list[dict]:
    """Two param groups of the trainable parameters: with ``weight_decay``, and without it for
    names containing one of ``no_decay_keywords`` (empty groups are left out)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in no_decay_keywords) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

