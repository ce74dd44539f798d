"""Pieces the recipes share, under one name: output-folder safety, caches, precision, optimizer
groups, model cards, the common config fields, model loading checks, LoRA, exact gathered
evaluation and samples, ``RecipeTrainer`` (the base class of the shipped recipes) and
``run_recipe`` (their ``main()``).

Each job lives in its own module of :mod:`acceltrain.recipe` (``config``, ``run_folder``,
``models``, ``optim``, ``evaluation``, ``export``, ``trainer``); this module re-exports them, so
``from acceltrain.recipe_kit import ...`` is all a recipe needs.
"""

from __future__ import annotations

from typing import Any

import torch

from .console import configure_output, quiet_progress_bars
from .hooks.base import BaseHook
from .recipe.config import LoraFields, TrackingFields, TrainingConfig, check_eval_source, choose_precision
from .recipe.evaluation import gather_eval_outputs, load_checkpoint_weights, split_indices
from .recipe.export import model_card
from .recipe.models import apply_lora, enable_gradient_checkpointing, resolve_model, trainable_summary
from .recipe.optim import adamw_with_decay_groups, warmup_cosine
from .recipe.run_folder import cache_root, check_resume, guard_output_dir, write_run_config
from .recipe.trainer import RecipeTrainer, run_recipe
from .trainer import BaseTrainer

__all__ = [
    "cache_root", "guard_output_dir", "check_resume", "choose_precision", "adamw_with_decay_groups", "model_card", "split_indices",
    "TrackingFields", "TrainingConfig", "LoraFields", "configure_output", "check_eval_source", "warmup_cosine", "quiet_progress_bars", "write_run_config", "resolve_model", "apply_lora",
    "enable_gradient_checkpointing", "trainable_summary", "gather_eval_outputs", "load_checkpoint_weights",
    "generate_sample", "SampleHook", "RecipeTrainer", "run_recipe",
]


# ---------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_sample(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (new text only). Greedy keeps ranks in lockstep, so
    every rank can call it when forwards are collective (FSDP)."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class SampleHook(BaseHook):
    """Print a short greedy continuation of ``prompt`` every ``interval`` steps and after the last.

    Every rank generates (FSDP forwards are collective); only the main process prints.

    Example:
        >>> SampleHook(tokenizer, "def add(a, b):", max_new_tokens=32, interval=100)
    """

    def __init__(self, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32, interval: int = 100):
        self.tokenizer, self.prompt, self.max_new_tokens, self.interval = tokenizer, prompt, max_new_tokens, interval

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.interval and trainer.step != trainer.max_steps:
            return
        text = generate_sample(trainer.unwrapped_model, self.tokenizer, self.prompt, self.max_new_tokens)
        if trainer.is_main_process:
            print(f"Sample {trainer.step}/{trainer.max_steps}: {self.prompt!r} -> {text!r}", flush=True)
