"""The BaseTrainer behind ``acceltrain.compat.llm_trainer.Trainer``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..hooks import CheckpointingHook, LoggingHook, ProgressHook
from ..hooks.base import BaseHook
from ..hooks.evaluation import EvaluationHook
from ..metrics import perplexity
from ..recipe_kit import choose_precision
from ..trainer import BaseTrainer
from ..utils import to_float

if TYPE_CHECKING:
    from .llm_trainer import Trainer

__all__ = ["LMTrainer"]


class _Losses(BaseHook):
    def __init__(self, out: list[dict[str, Any]]):
        self.out = out

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % trainer.log_every == 0 or trainer.step == trainer.max_steps:
            self.out.append({"step": trainer.step, "loss": to_float(trainer.step_info["loss"])})


class LMTrainer(BaseTrainer):
    """Next-token training of ``front.model`` on ``front.train_dataset`` with ``front.config``."""

    def __init__(self, front: Trainer):
        from .llm_trainer import create_dataloader

        cfg = front.config
        self.front = front
        loader = create_dataloader(front.train_dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=False)
        steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
        precision = choose_precision("auto" if cfg.use_amp else "no")
        super().__init__(max_steps=max_steps, grad_clip=cfg.max_grad_norm,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                         mixed_precision=precision, workspace=Path(cfg.checkpoint_dir).parent)
        self.loader = loader
        self.log_every = max(1, cfg.logging_steps)
        self.losses: list[dict[str, Any]] = []

    def build_data_loader(self) -> Any:
        return self.loader

    def build_eval_data_loader(self) -> Any:
        from .llm_trainer import create_dataloader

        ds = self.front.eval_dataset
        return create_dataloader(ds, batch_size=self.front.config.batch_size, shuffle=False) if ds is not None else None

    def build_model(self) -> torch.nn.Module:
        return self.front.model.to(self.device)

    def build_optimizer(self) -> torch.optim.Optimizer:
        from .llm_trainer import create_optimizer

        c = self.front.config
        return create_optimizer(self.model, c.optimizer, c.learning_rate, c.weight_decay)

    def build_lr_scheduler(self) -> Any:
        from .llm_trainer import create_scheduler

        c = self.front.config
        warmup = min(c.warmup_steps, self.max_steps) if c.warmup_steps else math.ceil(c.warmup_ratio * self.max_steps)
        return create_scheduler(self.optimizer, c.lr_scheduler, self.max_steps, warmup_steps=warmup,
                                min_lr_ratio=c.min_lr_ratio)

    def build_hooks(self) -> list[BaseHook]:
        c = self.front.config
        hooks: list[BaseHook] = [ProgressHook(interval=self.log_every), LoggingHook(interval=self.log_every),
                                 _Losses(self.losses)]
        if self.front.eval_dataset is not None:
            hooks.append(EvaluationHook(interval=max(1, c.eval_steps)))
        hooks.append(CheckpointingHook(interval=max(1, c.save_steps), path=Path(c.checkpoint_dir).resolve()))
        return hooks

    def forward(self, input: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(input_ids=input["input_ids"], attention_mask=input.get("attention_mask"),
                         labels=input["labels"])
        return out.loss, {}

    def evaluation_step(self, batch: Any) -> dict[str, Any]:
        loss, _ = self.forward(batch)
        return {"loss": loss}

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        return {**metrics, "perplexity": perplexity(metrics["loss"])}
