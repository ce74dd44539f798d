"""One-call training: ``Trainer(model, train_dataloader=...)`` and ``train_model(...)``, no subclass.

The forward pass is inferred from the batch (see :class:`Trainer`); everything else is the
``BaseTrainer`` loop, so accumulation, mixed precision, exact resume and every hook work as
they do for a subclass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from accelerate.utils import send_to_device

from .evaluation import EvaluationHook, _select
from .hooks import BaseHook, CheckpointingHook, LoggingHook, ProgressHook
from .hooks.early_stopping import EarlyStoppingHook
from .one_call_config import TrainerConfig, is_config_key, make_config
from .schedules import build_schedule
from .trainer import BaseTrainer
from .utils import seed_everything, to_float

__all__ = ["Trainer", "TrainerConfig", "train_model"]


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        loss = outputs  # a model that returns its loss
    return loss


def _logits_of(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


class Trainer(BaseTrainer):
    """A ready ``BaseTrainer``: give it a model and data, call :meth:`train`.

    Forward pass, inferred from each batch unless ``forward_fn(model, batch)`` returns the loss
    (or ``(loss, predictions)``):

    - a dict: with a ``criterion`` and a ``"labels"`` key, ``criterion(logits, labels)`` on
      ``model(**inputs)``; otherwise ``model(**batch)`` must return a ``loss`` (Hugging Face models
      given ``labels`` do);
    - a tuple or list: with a ``criterion``, ``(*inputs, labels)`` gives
      ``criterion(model(*inputs), labels)``; without, ``model(*batch)`` must return a loss;
    - a tensor: ``model(batch)`` must return a loss.

    ``logits`` is ``outputs.logits`` if the model returns an object with one, else the output.

    ``compute_metrics(predictions, labels) -> dict`` is called on every evaluation with the
    logits and labels of the whole evaluation set, in dataset order, as CPU tensors (fp32
    logits). On several processes each rank's share is gathered and put back in order, so every
    rank passes the same full set and gets the same metrics (predictions must then have the same
    shape after the batch dimension on every rank: pad token-level outputs to a fixed length).

    Default hooks: ``ProgressHook`` and ``LoggingHook`` (every ``log_interval``), then
    ``EvaluationHook`` (with an ``eval_dataloader``), ``callbacks``, ``CheckpointingHook`` (with an
    ``output_dir``: resumes from its latest checkpoint) and ``EarlyStoppingHook`` (with
    ``early_stopping_patience``).

    Args:
        model: An ``nn.Module`` (e.g. a Hugging Face model).
        train_dataloader: Training batches (a shuffled ``DataLoader`` is reshuffled per epoch and
            resumed exactly).
        config: A :class:`TrainerConfig`, a dict of its keys (or the seeds' aliases:
            ``max_epochs``, ``lr``, ``grad_clip_norm``, ``fp16``, ``min_lr``, ...), or a dataclass.
        eval_dataloader: A ``DataLoader`` over a map-style dataset.
        criterion: ``criterion(logits, labels)``; not needed when the model returns a loss.
        optimizer: An optimizer over the model's parameters, a factory ``params -> optimizer``
            (given the trainable parameters), or None for AdamW with ``learning_rate`` and
            ``weight_decay`` (no decay on 1-D parameters).
        callbacks: Extra hooks.
        forward_fn: ``forward_fn(model, batch) -> loss | (loss, predictions)``.
        compute_metrics: ``compute_metrics(predictions, labels) -> dict[str, float]``.
        **kwargs: Config keys (override ``config``) and ``BaseTrainer`` arguments (``device``,
            ``logger``, ``accelerator``, ...).

    Example:
        >>> trainer = Trainer(model, train_dataloader=loader, criterion=nn.CrossEntropyLoss(),
        ...                   config={"epochs": 3, "learning_rate": 1e-3, "scheduler": "cosine"})
        >>> metrics = trainer.train()
    """

    def __init__(self, model: torch.nn.Module, *, train_dataloader: Iterable, config: Any = None,
                 eval_dataloader: torch.utils.data.DataLoader | None = None, criterion: Callable | None = None,
                 optimizer: torch.optim.Optimizer | Callable | None = None, callbacks: list[BaseHook] | None = None,
                 forward_fn: Callable | None = None, compute_metrics: Callable | None = None, **kwargs: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        allowed = set(inspect.signature(BaseTrainer.__init__).parameters) - {"self", "max_steps", "grad_clip",
                                                                             "mixed_precision", "workspace",
                                                                             "gradient_accumulation_steps"}
        for key in kwargs:
            if not is_config_key(key) and key not in allowed:
                raise ValueError(f"{key}: not a Trainer argument nor a config key")
        cfg = make_config(config, **{k: v for k, v in kwargs.items() if is_config_key(k)})
        if cfg.early_stopping_patience is not None and eval_dataloader is None:
            raise ValueError("early_stopping_patience: needs an eval_dataloader to watch eval/loss")
        if cfg.keep_best is not None and (eval_dataloader is None or cfg.output_dir is None):
            raise ValueError("keep_best: needs an eval_dataloader (it ranks by eval/loss) and an output_dir")
        if cfg.seed is not None:
            seed_everything(cfg.seed)
        rest = {k: v for k, v in kwargs.items() if not is_config_key(k)}
        rest.setdefault("data_seed", cfg.seed)
        super().__init__(max_steps=cfg.max_steps or 0, grad_clip=cfg.max_grad_norm, mixed_precision=cfg.mixed_precision,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps, workspace=cfg.output_dir, **rest)
        self.config = cfg
        self.steps_per_epoch: int | None = None
        if cfg.epochs is not None:
            batches = _batches_per_epoch(train_dataloader, self.accelerator.num_processes)
            self.steps_per_epoch = max(1, math.ceil(batches / self.gradient_accumulation_steps))
            self.max_steps = max(1, math.ceil(cfg.epochs * batches / self.gradient_accumulation_steps))
            self.logger.info("epochs %g -> max_steps %d (%d per epoch)", cfg.epochs, self.max_steps, self.steps_per_epoch)
        if cfg.warmup_ratio and math.ceil(cfg.warmup_ratio * self.max_steps) >= self.max_steps > 1:
            # A ratio rounds up (as transformers does): on a run of a few steps it would swallow them all.
            cfg.warmup_steps, cfg.warmup_ratio = self.max_steps - 1, 0.0
            self.logger.info("warmup_ratio covers all %d steps: warmup_steps %d", self.max_steps, cfg.warmup_steps)
        elif cfg.warmup_ratio and self.max_steps <= 1:
            cfg.warmup_ratio = 0.0
        # Check the schedule now, so a bad name or argument fails here and not after building.
        build_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg.scheduler,
                       max(1, self.max_steps), warmup_steps=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio,
                       min_lr_ratio=cfg.min_lr_ratio, **cfg.scheduler_kwargs)
        self._model, self._train_loader, self._eval_loader = model, train_dataloader, eval_dataloader
        self.criterion, self.forward_fn, self.compute_metrics = criterion, forward_fn, compute_metrics
        self._optimizer_arg, self._callbacks = optimizer, list(callbacks or [])

    # ------------------------------------------------------------------ build contract
    def build_data_loader(self) -> Iterable:
        return self._train_loader

    def build_eval_data_loader(self) -> torch.utils.data.DataLoader | None:
        return self._eval_loader

    def build_model(self) -> torch.nn.Module:
        return self._model

    def build_optimizer(self) -> torch.optim.Optimizer:
        opt, cfg = self._optimizer_arg, self.config
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if opt is None:
            groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)
        if not isinstance(opt, torch.optim.Optimizer):
            if not callable(opt):
                raise ValueError(f"optimizer: expected an Optimizer, a callable params -> Optimizer or None, got {opt!r}")
            opt = opt(trainable)
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(f"optimizer: the factory returned {type(opt).__name__}, not a torch Optimizer")
        mine = {id(p) for p in self.model.parameters()}
        if any(id(p) not in mine for g in opt.param_groups for p in g["params"]):
            raise ValueError("optimizer: it holds parameters that are not the model's")
        return opt

    def build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        cfg = self.config
        return build_schedule(self.optimizer, cfg.scheduler, max(1, self.max_steps), warmup_steps=cfg.warmup_steps,
                              warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio, **cfg.scheduler_kwargs)

    def build_hooks(self) -> list[BaseHook]:
        cfg = self.config
        hooks: list[BaseHook] = [ProgressHook(interval=cfg.log_interval), LoggingHook(interval=cfg.log_interval)]
        if self._eval_loader is not None:
            hooks.append(EvaluationHook(interval=cfg.eval_interval or self.steps_per_epoch or max(1, self.max_steps)))
        hooks += self._callbacks
        if self.workspace is not None:
            best = {"keep_best": cfg.keep_best, "metric": "eval/loss"} if cfg.keep_best else {}
            hooks.append(CheckpointingHook(interval=cfg.save_interval or max(1, self.max_steps),
                                           keep_previous=cfg.keep_checkpoints,
                                           load=cfg.resume_from_checkpoint or "latest", **best))
        if cfg.early_stopping_patience is not None:
            hooks.append(EarlyStoppingHook(cfg.early_stopping_patience, min_delta=cfg.early_stopping_min_delta))
        return hooks

    # ------------------------------------------------------------------ forward and evaluation
    def forward(self, input: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
        loss, _, _ = self.run_batch(input)
        return loss, {}

    def run_batch(self, batch: Any) -> tuple[torch.Tensor | None, Any, Any]:
        """``(loss, predictions, labels)`` of one batch, by the rules in the class docstring."""
        model = self.model
        if self.forward_fn is not None:
            out = self.forward_fn(model, batch)
            loss, preds = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, (tuple, list)) else (out, None)
            labels = batch.get("labels") if isinstance(batch, Mapping) else (
                batch[-1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None)
            return loss, preds, labels
        if isinstance(batch, Mapping):
            labels = batch.get("labels")
            if self.criterion is not None and labels is not None:
                logits = _logits_of(model(**{k: v for k, v in batch.items() if k != "labels"}))
                return self.criterion(logits, labels), logits, labels
            outputs = model(**batch)
            why = "" if labels is not None else " (the batch has no 'labels' key)"
            return self._require_loss(outputs, why), _logits_of(outputs), labels
        if isinstance(batch, (tuple, list)):
            if self.criterion is not None and len(batch) >= 2:
                *inputs, labels = batch
                logits = _logits_of(model(*inputs))
                return self.criterion(logits, labels), logits, labels
            takes = inspect.signature(self.unwrap(model).forward).parameters.values()
            if not any(p.kind == p.VAR_POSITIONAL for p in takes) and len(batch) > len(list(takes)):
                raise ValueError(f"criterion: batches of {len(batch)} items need a criterion (inputs..., labels) "
                                 "unless the model takes them all and returns a loss")
            outputs = model(*batch)
            return self._require_loss(outputs, ""), _logits_of(outputs), batch[-1] if len(batch) > 1 else None
        outputs = model(batch)
        return self._require_loss(outputs, ""), _logits_of(outputs), None

    @staticmethod
    def _require_loss(outputs: Any, why: str) -> torch.Tensor:
        loss = _loss_of(outputs)
        if loss is None:
            raise ValueError(f"criterion: the model returned no loss{why}; pass criterion=... or forward_fn=...")
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The mean loss over the evaluation set, plus ``compute_metrics`` on all of it (exact
        across ranks); without ``compute_metrics``, ``BaseTrainer.evaluate``."""
        if self.compute_metrics is None:
            return super().evaluate()
        self._require_built("evaluate()")
        model, was_training = self.model, self.model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of loss * samples, samples)
        preds, labels = [], []
        try:
            for valid, batch in self.eval_data_loader:
                batch = send_to_device(batch, self.device)
                n_valid = int(valid.sum())
                if 0 < n_valid < valid.shape[0]:
                    batch = _select(batch, valid)
                with self._autocast():
                    loss, p, y = self.run_batch(batch)  # a batch of padding only still runs: FSDP forwards are collective
                if n_valid == 0:
                    continue
                if p is None or y is None:
                    raise ValueError("compute_metrics: the evaluation batches gave no predictions or labels")
                total[0] += loss.detach().double() * n_valid
                total[1] += n_valid
                preds.append(p.detach().float())
                labels.append(y.detach())
        finally:
            model.train(was_training)
        predictions, targets = torch.cat(preds), torch.cat(labels)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(total)
            predictions, targets = self._gather_in_order(predictions), self._gather_in_order(targets)
        loss_sum, count = total.tolist()
        extra = self.compute_metrics(predictions.cpu(), targets.cpu())
        return {"loss": loss_sum / count, **{k: to_float(v) for k, v in extra.items()}}

    def _gather_in_order(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, back in dataset order: rank r's j-th sample is sample r + j * world."""
        acc, world = self.accelerator, self.accelerator.num_processes
        counts = acc.gather(torch.tensor([local.shape[0]], device=self.device)).tolist()
        rows = acc.gather(acc.pad_across_processes(local.contiguous(), dim=0))  # (world * max_n, ...)
        width = rows.shape[0] // world
        out = rows.new_empty((sum(counts), *rows.shape[1:]))
        for rank, n in enumerate(counts):
            out[torch.arange(n, device=out.device) * world + rank] = rows[rank * width: rank * width + n]
        return out

    def train(self) -> dict[str, Any]:  # type: ignore[override]
        """Train; returns ``{"step", "loss"}`` of the last update plus the last ``eval/...`` metrics."""
        super().train()
        out: dict[str, Any] = {"step": self.step}
        if self.step_info.get("loss") is not None:
            out["loss"] = to_float(self.step_info["loss"])
        for hook in self.hooks:
            if isinstance(hook, EvaluationHook) and hook.last:
                out.update({f"{hook.prefix}/{k}": v for k, v in hook.last.items()})
        return out


def _batches_per_epoch(loader: Iterable, world: int) -> int:
    from .data_stream import can_rebuild

    if can_rebuild(loader):  # the trainer re-shards it: each rank gets len // world samples
        per_rank = len(loader.dataset) // world
        return per_rank // loader.batch_size if loader.drop_last else math.ceil(per_rank / loader.batch_size)
    if not hasattr(loader, "__len__"):
        raise ValueError("epochs: train_dataloader has no length; give max_steps instead")
    return math.ceil(len(loader) / world)


def train_model(model: torch.nn.Module, train_dataloader: Iterable | None = None, **kwargs: Any) -> Any:
    """Train ``model`` in one call.

    Two forms:

    - ``train_model(model, loader, **config)``: build a :class:`Trainer` on the loader, train it,
      return it (``trainer.model`` is trained).
    - ``train_model(model=..., dataset=... | dataset_path=..., vocab_size=..., max_epochs=...)``:
      a causal LM on text. The loaders are built here (see
      :func:`acceltrain.one_call_data.train_on_text` for every argument: tokenizer strategy,
      ``batch_size``, ``val_split``, ``max_length``, ``save_top_k``, ``resume_from_checkpoint``,
      ``use_gpu``, ...) and the result is Transformer Builder's dict: ``best_model_path``,
      ``final_metrics``, ``trainer``, ``model``, ``tokenizer``.

    Example:
        >>> trainer = train_model(model, loader, criterion=nn.MSELoss(), max_epochs=3, learning_rate=1e-3)
        >>> results = train_model(model=gpt2, dataset="notes.txt", vocab_size=512, max_epochs=1, batch_size=8)
        >>> results["best_model_path"]
    """
    if train_dataloader is None:
        if "dataset" not in kwargs and "dataset_path" not in kwargs:
            raise ValueError("train_model: give a train_dataloader, or dataset= (a file, folder, Hub name or "
                             "Dataset) / dataset_path=")
        from .one_call_data import train_on_text

        return train_on_text(model, **kwargs)
    trainer = Trainer(model, train_dataloader=train_dataloader, **kwargs)
    trainer.train()
    return trainer
