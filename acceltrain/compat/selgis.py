"""The SELGIS API on acceltrain: ``from acceltrain.compat.selgis import Trainer, SelgisConfig, ...``.

Each name maps onto acceltrain's own machinery, nothing is implemented twice:

- ``Trainer`` / ``TransformerTrainer``: the one-call :class:`acceltrain.one_call.Trainer`
  with SELGIS's positional signature; protection is ``GuardHook``, early stopping
  ``EarlyStoppingHook``, checkpoints ``CheckpointingHook``, pruning ``SparsityHook``, the LR
  finder :func:`acceltrain.lr_finder.find_lr`, schedules :func:`acceltrain.schedules.build_schedule`.
- Epoch settings (``max_epochs``, ``warmup_epochs``, ``t_0``, ``sparsity_*_epoch``) become steps
  from the loader's length; each conversion is logged (logger ``acceltrain``).

Where SELGIS and an acceltrain guarantee differ, the guarantee wins:

- NaN/spike recovery is bounded: after 3 rollbacks ``GuardError`` stops the run (SELGIS retries
  without end); a NaN loss is never back-propagated into the weights.
- The LR follows its schedule per optimizer step (SELGIS's epoch mode changes it in stairs at
  epoch ends); the curve over epochs is the same.
- ``save_best_only`` also keeps the newest checkpoint, so a restart resumes exactly.
- ``load_model`` never unpickles arbitrary objects (``weights_only=False`` is refused).

``SelgisCore`` for a loop of your own is in :mod:`.selgis_core`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__
from ..checkpoint import CheckpointError, find_latest_checkpoint, restore_tied
from ..checkpoint_names import CHECKPOINTS_SUBDIR
from ..config import ConfigError
from ..hooks import CheckpointingHook, GuardHook, LoggingHook
from ..hooks.base import BaseHook
from ..hooks.early_stopping import EarlyStoppingHook
from ..hooks.evaluation import EvaluationHook
from ..hooks.sparsity import SparsityHook
from ..lr_finder import LRFinder, find_lr
from ..one_call import Trainer as _OneCallTrainer
from ..one_call import _logits_of, _loss_of
from ..schedules import build_schedule
from ..utils import dedupe_tensors, seed_everything
from .selgis_config import SCHEDULER_NAMES, SelgisConfig, TransformerConfig, load_selgis_config
from .selgis_core import SelgisCore
from .selgis_parts import (
    Callback,
    CheckpointCallback,
    EarlyStoppingCallback,
    LoggingCallback,
    SmartScheduler,
    SparsityCallback,
    WandBCallback,
    count_parameters,
    format_params,
    get_device,
    get_optimizer_grouped_params,
    get_transformer_scheduler,
    is_dict_like,
    move_to_device,
    to_dict,
    unpack_batch,
)

__all__ = [
    "__version__", "SelgisConfig", "TransformerConfig", "SelgisCore", "LRFinder", "SmartScheduler",
    "get_transformer_scheduler", "Trainer", "TransformerTrainer", "Callback", "EarlyStoppingCallback",
    "CheckpointCallback", "LoggingCallback", "WandBCallback", "SparsityCallback", "get_device", "seed_everything",
    "count_parameters", "format_params", "move_to_device", "unpack_batch", "get_optimizer_grouped_params",
    "is_dict_like", "to_dict", "load_selgis_config",
]

logger = logging.getLogger("acceltrain")
_MAX_ROLLBACKS = 3  # acceltrain's bound on recoveries (SELGIS has none)


class _ClipValueHook(BaseHook):
    """``grad_clip_value``: clamp every gradient entry after the norm clip (Accelerate's clip_grad_value_)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def on_before_optimizer_step(self, trainer: Any) -> None:
        trainer.accelerator.clip_grad_value_(trainer.trainable_parameters, self.value)


def _loader_batch_size(loader: Any) -> int | None:
    return getattr(loader, "batch_size", None) if isinstance(loader, torch.utils.data.DataLoader) else None


class Trainer(_OneCallTrainer):
    """SELGIS's ``Trainer(model, config, train_dataloader, eval_dataloader=None, criterion=None,
    optimizer=None, callbacks=None, forward_fn=None, compute_metrics=None)``.

    How each ``SelgisConfig`` field acts is in its help text (:mod:`.selgis_config`); in short:
    ``max_epochs`` -> max_steps; ``nan_recovery`` -> ``GuardHook(spike_threshold,
    min_history_len, state_update_interval, max_rollbacks=3)``; ``patience``/``min_delta`` ->
    ``EarlyStoppingHook`` on ``eval/loss`` (with an eval loader); ``lr_finder_*`` -> the LR range
    test before training, applied to the default optimizer (not run when you pass an optimizer,
    nor when resuming from a checkpoint); ``sparsity_*`` -> ``SparsityCallback``;
    ``state_storage="disk"`` -> ``CheckpointingHook`` under ``state_dir`` (default
    ``output_dir/checkpoints``), ``"memory"`` -> no checkpoint files.

    Without ``criterion``, ``(inputs, labels)`` batches use the model's own loss if it returns
    one, else ``cross_entropy(logits, labels, label_smoothing=config.label_smoothing)``.
    Evaluation reports ``loss`` and, for ``(N, C)`` logits with integer labels, ``accuracy``.

    Example:
        >>> trainer = Trainer(model, SelgisConfig(max_epochs=3, device="cpu"), train_dl, eval_dl)
        >>> metrics = trainer.train()
    """

    def __init__(self, model: torch.nn.Module, config: SelgisConfig | Mapping[str, Any] | None = None,
                 train_dataloader: Iterable | None = None, eval_dataloader: Any = None,
                 criterion: Callable | None = None, optimizer: torch.optim.Optimizer | None = None,
                 callbacks: list[BaseHook] | None = None, forward_fn: Callable | None = None,
                 compute_metrics: Callable | None = None, **kwargs: Any) -> None:
        cfg = self._selgis_config(config)
        if train_dataloader is None:
            raise ValueError("train_dataloader: required (a DataLoader of training batches)")
        for name, loader, default in (("batch_size", train_dataloader, 32), ("eval_batch_size", eval_dataloader, 64)):
            size, wanted = _loader_batch_size(loader), getattr(cfg, name)
            if size is not None and wanted != default and wanted != size:
                raise ConfigError(f"{name}: {wanted} differs from the given loader's batch_size {size}; "
                                  "the loader decides (build it with the batch size you want)")
        self._user_optimizer = optimizer is not None
        callbacks = [LoggingCallback(log_every=cfg.logging_steps)] if callbacks is None else list(callbacks)
        if cfg.sparsity_enabled and not any(isinstance(c, SparsityHook) for c in callbacks):
            callbacks.insert(0, SparsityCallback(cfg.sparsity_target, start_epoch=cfg.sparsity_start_epoch,
                                              frequency=cfg.sparsity_frequency))
        scheduler = SCHEDULER_NAMES[cfg.scheduler_type]
        lr = float(getattr(cfg, "learning_rate", 1e-3))
        tc: dict[str, Any] = {
            "epochs": cfg.max_epochs, "learning_rate": lr, "weight_decay": cfg.weight_decay,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "max_grad_norm": cfg.grad_clip_norm or None, "scheduler": scheduler, "warmup_ratio": cfg.warmup_ratio,
            "min_lr_ratio": min(1.0, cfg.min_lr / lr), "log_interval": cfg.logging_steps,
            "eval_interval": cfg.eval_steps, "save_interval": cfg.save_steps, "keep_checkpoints": cfg.save_total_limit,
            "output_dir": cfg.output_dir, "seed": cfg.seed,
            "mixed_precision": "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else None,
        }
        if scheduler == "cosine_restarts":
            tc["scheduler_kwargs"] = {"t_0": cfg.t_0, "t_mult": cfg.t_mult}
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda', but no CUDA GPU is available here (use 'auto' or 'cpu')")
        if cfg.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device: 'mps', but MPS is not available here (use 'auto' or 'cpu')")
        kwargs.setdefault("device", None if cfg.device == "auto" else cfg.device)
        super().__init__(model, train_dataloader=train_dataloader, config=tc, eval_dataloader=eval_dataloader,
                         criterion=criterion, optimizer=optimizer, callbacks=callbacks, forward_fn=forward_fn,
                         compute_metrics=compute_metrics, **kwargs)
        self._tc, self.config = self.config, cfg
        spe = self.steps_per_epoch
        logger.info("max_epochs %d -> max_steps %d (%d steps per epoch)", cfg.max_epochs, self.max_steps, spe)
        if cfg.warmup_epochs:
            self._tc.warmup_steps = cfg.warmup_epochs * spe
            if self._tc.warmup_steps >= self.max_steps and scheduler != "constant":
                raise ConfigError(f"warmup_epochs: {cfg.warmup_epochs} epoch(s) = {self._tc.warmup_steps} steps, "
                                  f"not fewer than all {self.max_steps} steps")
            logger.info("warmup_epochs %d -> warmup_steps %d", cfg.warmup_epochs, self._tc.warmup_steps)
        if scheduler == "cosine_restarts":
            self._tc.scheduler_kwargs["t_0"] = cfg.t_0 * spe
            logger.info("t_0 %d epoch(s) -> %d steps (cosine_restarts)", cfg.t_0, cfg.t_0 * spe)
        if (cfg.patience or cfg.min_delta) and eval_dataloader is None:
            logger.info("patience/min_delta: no eval_dataloader, so no early stopping (as SELGIS)")
        self.lr_finder_lr: float | None = None
        self.selgis = SelgisCore(self)

    @staticmethod
    def _selgis_config(config: Any) -> SelgisConfig:
        if config is None:
            return SelgisConfig()
        if isinstance(config, Mapping):
            base = set(SelgisConfig.__dataclass_fields__)
            cls = TransformerConfig if set(config) - base else SelgisConfig
            unknown = set(config) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"config: unknown key {sorted(unknown)[0]!r} (not a SelgisConfig field)")
            return cls(**config)
        if not isinstance(config, SelgisConfig):
            raise TypeError(f"config must be a SelgisConfig (or a dict of its fields), got {type(config).__name__}")
        config.validate()
        return config

    # ------------------------------------------------------------------ build contract
    def build_optimizer(self) -> torch.optim.Optimizer:
        if self._user_optimizer:
            return super().build_optimizer()
        groups = get_optimizer_grouped_params(self.model, self.config.weight_decay)
        return torch.optim.AdamW(groups, lr=self._tc.learning_rate)

    def build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        tc = self._tc
        return build_schedule(self.optimizer, tc.scheduler, max(1, self.max_steps), warmup_steps=tc.warmup_steps,
                              warmup_ratio=tc.warmup_ratio, min_lr_ratio=tc.min_lr_ratio, **tc.scheduler_kwargs)

    def _checkpoint_root(self) -> Path | None:
        cfg = self.config
        if cfg.state_storage == "memory" or any(isinstance(h, CheckpointingHook) for h in self._callbacks):
            return None
        # CheckpointingHook puts a relative path inside the workspace (output_dir); state_dir is the user's own.
        return Path(cfg.state_dir).resolve() if cfg.state_dir else Path(cfg.output_dir).resolve() / CHECKPOINTS_SUBDIR

    def build_hooks(self) -> list[BaseHook]:
        cfg, spe, has_eval = self.config, self.steps_per_epoch, self._eval_loader is not None
        hooks: list[BaseHook] = [LoggingHook(interval=cfg.logging_steps)]
        if has_eval:
            hooks.append(EvaluationHook(interval=cfg.eval_steps or spe))
        if cfg.nan_recovery:
            hooks.append(_guard_hook(cfg))
        if cfg.grad_clip_value is not None:
            hooks.append(_ClipValueHook(cfg.grad_clip_value))
        stoppers = [c for c in self._callbacks if isinstance(c, EarlyStoppingHook)]
        hooks += [c for c in self._callbacks if not isinstance(c, EarlyStoppingHook)]
        root = self._checkpoint_root()
        if root is not None:
            best = {"keep_best": 1, "metric": "eval/loss"} if has_eval else {}
            hooks.append(CheckpointingHook(interval=cfg.save_steps or spe, path=root,
                                           keep_previous=1 if cfg.save_best_only else cfg.save_total_limit, **best))
        if has_eval:
            hooks.append(EarlyStoppingHook(cfg.patience, min_delta=cfg.min_delta))
        return hooks + stoppers  # stoppers after checkpointing: the last checkpoint holds the last state

    # ------------------------------------------------------------------ forward
    def run_batch(self, batch: Any) -> tuple[torch.Tensor | None, Any, Any]:
        if self.criterion is None and self.forward_fn is None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            *inputs, labels = batch
            outputs = self.model(*inputs)
            loss = _loss_of(outputs)
            logits = _logits_of(outputs)
            if loss is None:
                loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
            return loss, logits, labels
        return super().run_batch(batch)

    def forward(self, input: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
        loss, preds, labels = self.run_batch(input)
        records: dict[str, Any] = {}
        if not self.model.training and _classification(preds, labels):  # evaluation only: no cost in training
            records["accuracy"] = (preds.argmax(-1) == labels).float().mean()
        return loss, records

    # ------------------------------------------------------------------ SELGIS's attribute names
    @property
    def callbacks(self) -> list[BaseHook]:
        """The callbacks given (or the default ``[LoggingCallback()]``), as hooks of this trainer."""
        return self._callbacks

    @property
    def train_dataloader(self) -> Iterable:
        return self._train_loader

    @property
    def eval_dataloader(self) -> Any:
        return self._eval_loader

    # ------------------------------------------------------------------ public API
    def train(self) -> dict[str, Any]:  # type: ignore[override]
        """Run training (the LR finder first, if enabled); returns the last step, loss and eval metrics."""
        cfg = self.config
        root = self._checkpoint_root()
        resuming = root is not None and find_latest_checkpoint(root, clean=False) is not None
        if cfg.lr_finder_enabled and not self._user_optimizer and not resuming:
            self.build()
            self.lr_finder_lr = find_lr(self, apply=True, start_lr=cfg.lr_finder_start, end_lr=cfg.lr_finder_end,
                                        num_steps=cfg.lr_finder_steps, trainable_only=cfg.lr_finder_trainable_only)
            logger.info("LR finder: starting from lr %.3g", self.lr_finder_lr)
        return super().train()

    def evaluate(self) -> dict[str, float]:
        """Evaluation metrics (``loss``, ``accuracy`` when it applies); ``{}`` without an eval loader."""
        if self._eval_loader is None:
            return {}
        if not self._built:
            self.build()
        return super().evaluate()

    def save_model(self, path: str | Path) -> Path:
        """The model's ``state_dict`` as a safetensors file at ``path`` (no pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.unwrapped_model if self._built else self._model
        state = {k: v.cpu() for k, v in dedupe_tensors(model.state_dict()).items()}
        save_file(state, str(path), metadata={"format": "pt"})
        return path

    def load_model(self, path: str | Path, weights_only: bool = True) -> None:
        """Load a ``state_dict`` written by :meth:`save_model` (or a tensors-only ``torch.save`` file).

        Raises:
            ValueError: ``weights_only=False`` (acceltrain never unpickles arbitrary objects), or
                the file is not a state dict of this model.
        """
        if not weights_only:
            raise ValueError("load_model: weights_only=False is refused: acceltrain loads tensors only "
                             "(no arbitrary code runs on load)")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file")
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception:  # not safetensors: a torch.save file, loaded without unpickling code
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = self.unwrapped_model if self._built else self._model
        try:
            restore_tied(model, state)  # safetensors keeps tied tensors once
            model.load_state_dict(state, strict=True)
        except (RuntimeError, CheckpointError) as e:
            raise ValueError(f"{path}: not a state dict of this model ({str(e).splitlines()[0]})") from None


def _guard_hook(cfg: SelgisConfig) -> GuardHook:
    """``nan_recovery``'s guard, the same for the Trainer and a manual-loop SelgisCore."""
    return GuardHook(spike_threshold=cfg.spike_threshold, min_history_len=cfg.min_history_len,
                     state_update_interval=cfg.state_update_interval, max_rollbacks=_MAX_ROLLBACKS)


class _CoreTrainer(Trainer):
    """The trainer under a manual-loop ``SelgisCore``: the user's model, optimizer and scheduler,
    prepared; no data, no step loop (the core's methods are its pieces); the Trainer's forward
    rules and evaluation for ``SelgisCore.evaluate``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: SelgisConfig, device: Any) -> None:
        self._user_optimizer, self._scheduler_arg = True, scheduler
        tc = {"max_steps": 0, "max_grad_norm": cfg.grad_clip_norm or None,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "mixed_precision": "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else None}
        _OneCallTrainer.__init__(self, model, train_dataloader=[], config=tc, optimizer=optimizer, device=device)
        self._tc, self.config = self.config, cfg

    def build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        return self._scheduler_arg

    def build_hooks(self) -> list[BaseHook]:
        return [_guard_hook(self.config)] if self.config.nan_recovery else []


def _classification(preds: Any, labels: Any) -> bool:
    return (isinstance(preds, torch.Tensor) and isinstance(labels, torch.Tensor) and preds.dim() == 2
            and labels.dim() == 1 and not labels.is_floating_point() and preds.shape[0] == labels.shape[0])


from .selgis_transformer import TransformerTrainer  # noqa: E402  (it subclasses Trainer)
