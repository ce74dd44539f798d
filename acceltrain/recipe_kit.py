"""Pieces the recipes share, under one name: output-folder safety, caches, precision, optimizer
groups, model cards, the common config fields, model loading checks, LoRA, exact gathered
evaluation, ``RecipeTrainer`` (the base class of the shipped recipes) and
``run_recipe`` (their ``main()``).

Each job lives in its own module of :mod:`acceltrain.recipe` (``config``, ``run_folder``,
``models``, ``optim``, ``evaluation``, ``export``, ``trainer``); this module re-exports them, so
``from acceltrain.recipe_kit import ...`` is all a recipe needs (``SampleHook`` lives in
:mod:`acceltrain.hooks.sample`).
"""

from __future__ import annotations

from .console import configure_output, quiet_progress_bars
from .hooks.sample import SampleHook, generate_sample  # moved to hooks/; kept importable from here
from .recipe.config import LoraFields, TrackingFields, TrainingConfig, check_eval_source, choose_precision
from .recipe.evaluation import (
    check_weights_loadable,
    gather_eval_outputs,
    load_checkpoint_weights,
    split_indices,
)
from .recipe.export import model_card
from .recipe.models import apply_lora, enable_gradient_checkpointing, resolve_model, trainable_summary
from .recipe.optim import adamw_with_decay_groups, warmup_cosine
from .recipe.run_folder import cache_root, check_resume, guard_output_dir, write_run_config
from .recipe.trainer import RecipeTrainer, run_recipe

__all__ = [
    "cache_root", "guard_output_dir", "check_resume", "choose_precision", "adamw_with_decay_groups", "model_card", "split_indices",
    "TrackingFields", "TrainingConfig", "LoraFields", "configure_output", "check_eval_source", "warmup_cosine", "quiet_progress_bars", "write_run_config", "resolve_model", "apply_lora",
    "enable_gradient_checkpointing", "trainable_summary", "gather_eval_outputs", "load_checkpoint_weights",
    "check_weights_loadable",
    "generate_sample", "SampleHook", "RecipeTrainer", "run_recipe",
]
