"""``RecipeTrainer``, the base class of the shipped recipes, and ``run_recipe``, their ``main()``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_deepspeed import live_setup
from ..checkpoint_names import CHECKPOINTS_SUBDIR
from ..config import UserError, config_to_dict, exit_on_user_error, parse_config
from ..console import configure_output, quiet_progress_bars
from ..hooks import CheckpointingHook, EvaluationHook, LoggingHook, ProgressHook
from ..hooks.base import BaseHook
from ..plot import curves_section, matplotlib_available, save_curves
from ..trackers import parse_report_to
from ..trainer import BaseTrainer
from ..utils import folder_problem
from .export import model_card
from .optim import adamw_with_decay_groups, warmup_cosine
from .run_folder import check_resume, guard_output_dir, write_run_config

__all__ = ["RecipeTrainer", "run_recipe"]


class RecipeTrainer(BaseTrainer):
    """What the shipped recipes have in common, on top of ``BaseTrainer``.

    ``cfg`` carries :class:`TrainingConfig`'s fields. The constructor refuses to train over
    another run's checkpoints (``guard_output_dir``: ``self.resume`` says whether to continue);
    the optimizer is AdamW with decay groups, the schedule warmup + cosine to ``min_lr_ratio``;
    :meth:`standard_hooks` gives progress, logs, evaluation and checkpoints.
    """

    def __init__(self, cfg: Any, **trainer_kwargs: Any):
        self.cfg = cfg
        # Before the Accelerator exists (DeepSpeed may be imported with it) and before the
        # output folder is touched: a bad level or a missing tracker stops here, exit 2.
        configure_output(getattr(cfg, "log_level", "warning"))
        self.report_to = parse_report_to(getattr(cfg, "report_to", ["tensorboard"]))
        problem = folder_problem(cfg.output_dir)
        if problem:
            raise UserError(f"--output_dir {cfg.output_dir}: {problem}")
        super().__init__(**trainer_kwargs)
        self.check_engine()  # before the output folder is looked at or cleared
        # Recipes train tokenizers and pack data in their constructors: a signal there exits cleanly.
        self._early_exit.install()
        if "allow_global_batch_change" not in trainer_kwargs:
            self.allow_global_batch_change = bool(getattr(cfg, "allow_global_batch_change", False))
        is_main = self.accelerator.is_main_process
        self.resume = guard_output_dir(self.workspace, resume=cfg.resume, overwrite=cfg.overwrite,
                                       is_main=is_main, verify=False)
        if self.resume:
            plan = check_resume(self.workspace / CHECKPOINTS_SUBDIR, is_main=is_main, resize=dict(
                world=self.accelerator.num_processes, micro_batch=cfg.batch_size,
                accumulation=cfg.gradient_accumulation_steps,
                allow_global_batch_change=self.allow_global_batch_change), deepspeed=live_setup(self))
            if plan is not None:
                # Set before anything is built, so what the recipe derives from the config (tokens
                # per step, the model card) fits the resized run; load_checkpoint then agrees.
                cfg.gradient_accumulation_steps = self.gradient_accumulation_steps = plan.accumulation
                self._resize_announced = True
                if is_main:
                    self.logger.warning("%s", plan.message)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return adamw_with_decay_groups(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return warmup_cosine(self.optimizer, warmup_steps=self.cfg.warmup_steps, max_steps=self.cfg.max_steps,
                             min_lr_ratio=self.cfg.min_lr_ratio)

    def check_engine(self) -> None:
        """Refuse (``UserError``) an engine this recipe's options cannot run on; the Accelerator
        exists, the output folder is untouched. The default accepts every engine."""

    def standard_hooks(self, *, first: list[BaseHook] | None = None, extra: list[BaseHook] | None = None,
                       **checkpointing: Any) -> list[BaseHook]:
        """``first`` (hooks that put figures into ``step_info``), progress, logging, evaluation
        (``self.eval_hook``), ``extra``, then checkpoints (``checkpointing``: more
        ``CheckpointingHook`` arguments), all at the config's intervals."""
        cfg = self.cfg
        self.eval_hook = EvaluationHook(interval=cfg.eval_interval)
        log_hook = LoggingHook(interval=cfg.log_interval, report_to=self.report_to,
                               project=getattr(cfg, "tracker_project", "acceltrain"),
                               run_name=getattr(cfg, "run_name", None), config=config_to_dict(cfg))
        return [*(first or []), ProgressHook(interval=cfg.log_interval), log_hook, self.eval_hook, *(extra or []),
                CheckpointingHook(interval=cfg.save_interval, keep_previous=cfg.keep_checkpoints,
                                  load="latest" if self.resume else None, requeue=True, **checkpointing)]

    def save_pretrained(self, directory: str | Path, *, model_card: str | None = None, **kwargs: Any) -> Path:
        """Export as :meth:`BaseTrainer.save_pretrained` does; a model card gains the run's
        training curves (``directory/curves.png``, drawn when matplotlib is installed) and a table
        of its final metrics, both from ``metrics.jsonl``. Every rank must call it."""
        directory = Path(directory)
        has_metrics = self.workspace is not None and (self.workspace / "metrics.jsonl").is_file()
        if model_card is not None and has_metrics and self.is_main_process:
            draw = matplotlib_available()
            if draw:
                save_curves([self.workspace], directory / "curves.png", labels=[self.workspace.resolve().name])
            model_card = model_card + curves_section(self.workspace, "curves.png" if draw else None)
        return super().save_pretrained(directory, model_card=model_card, **kwargs)

    def export(self, name: str = "final", *, title: str | None = None, summary: str = "",
               facts: dict[str, Any] | None = None, usage: str = "", adapter_of: str | None = None,
               merge_lora: bool = False) -> Path:
        """The export step every recipe ends with: ``output_dir/name`` (the model, or the LoRA
        adapter of ``adapter_of``, and ``self.tokenizer``) with a model card when a ``title`` is
        given (:func:`~acceltrain.recipe.export.model_card`; :meth:`save_pretrained` adds the
        training curves). ``merge_lora`` writes the base with the adapter merged in instead.
        Every rank must call it; returns the folder."""
        card = None
        if title is not None:
            card = model_card(title=title, summary=summary, facts=facts or {}, usage=usage,
                              library_name="peft" if adapter_of else "transformers", base_model=adapter_of)
        directory = self.workspace / name
        self.save_pretrained(directory, tokenizer=getattr(self, "tokenizer", None), merge_lora=merge_lora,
                             model_card=card)
        return directory


@exit_on_user_error
def run_recipe(config_class: type[Any], trainer_class: type[RecipeTrainer], argv: list[str] | None = None, *,
               prog: str, announce: Callable[[Any], None] | None = None) -> Path:
    """A recipe's ``main()``: parse and validate the config, build the trainer, write
    ``output_dir/config.yaml``, train, export (``trainer.finish()``) and close.

    ``announce(trainer)`` runs on the main process once the trainer is built (a summary line).
    Bad input anywhere is one ``error:`` line and exit status 2 (:func:`exit_on_user_error`).

    Example:
        >>> def main(argv=None):
        ...     return run_recipe(MyConfig, MyTrainer, argv, prog="recipes/my_recipe.py")
    """
    cfg = parse_config(config_class, argv, prog=prog)
    cfg.validate()
    quiet_progress_bars()
    trainer = trainer_class(cfg)
    if trainer.is_main_process:
        if announce is not None:
            announce(trainer)
        write_run_config(trainer.workspace, cfg)
    try:
        trainer.train()
        final = trainer.finish()
    finally:  # trackers closed and the process group torn down on an error too
        trainer.close()
    return final
