"""LLM Trainer's ``scripts/train.py`` command line for ``acceltrain train``.

    acceltrain train --config configs/model_config.yaml --output_dir ./output \\
        --resume_from_checkpoint ./output/checkpoints/checkpoint_step_1000 --force_retrain_tokenizer --log_level info

A nested ``--config`` (``model:`` / ``training:`` / ``data:``, YAML or JSON) becomes
``recipes/pretrain.py``'s flags (:func:`~.llm_trainer_config.pretrain_flags`); later flags on the
command line override them. ``training.num_epochs`` (without ``max_steps``) is turned into steps
from the packed data. ``--resume_from_checkpoint`` names a checkpoint folder (or a run folder): the
run continues in that folder from it. ``--force_retrain_tokenizer`` trains the tokenizer (and packs
the data) again in a fresh cache instead of reusing the cached one. ``--log_level`` sets Python's
and transformers' logging level.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..checkpoint_names import CHECKPOINTS_SUBDIR
from ..config import UserError
from .llm_trainer_config import is_nested_config, pretrain_flags

__all__ = ["train_arguments"]

_LEVELS = ("debug", "info", "warning", "error", "critical")


def _flag_value(argv: list[str], name: str) -> str | None:
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def _checkpoint_run_dir(path: str) -> Path:
    """The run folder a ``--resume_from_checkpoint`` path belongs to, checked."""
    from ..checkpoint import MANIFEST, CheckpointError, find_latest_checkpoint, verify_checkpoint

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"--resume_from_checkpoint {path}: no such folder")
    if (folder / CHECKPOINTS_SUBDIR).is_dir() and not (folder / MANIFEST).exists():
        return folder  # a run folder: continue from its latest checkpoint
    try:
        verify_checkpoint(folder)
    except CheckpointError as e:
        raise UserError(f"--resume_from_checkpoint {path}: {e}") from None
    latest = find_latest_checkpoint(folder.parent, clean=False)
    if latest is None or latest.resolve() != folder.resolve():
        raise UserError(f"--resume_from_checkpoint {path}: the run in {folder.parent.parent} resumes from its newest "
                        f"valid checkpoint, {latest}; give that one (or the run folder)")
    return folder.parent.parent


def _steps_for_epochs(argv: list[str], epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes over the windows the recipe would train on."""
    from ..cli import _load_recipe, recipes_dir
    from ..config import parse_config

    config_cls, trainer_cls = _load_recipe(recipes_dir() / "pretrain.py").RECIPE
    cfg = parse_config(config_cls, argv, prog="acceltrain train")
    cfg.validate()
    trainer = trainer_cls(cfg)  # loads, tokenizes and packs (cached: the run reuses it)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * trainer.accelerator.num_processes
    steps = max(1, math.ceil(epochs * len(trainer.train_set) / per_step))
    if trainer.is_main_process:
        print(f"training.num_epochs {epochs}: {steps} steps ({len(trainer.train_set):,} windows, {per_step} per step)",
              file=sys.stderr, flush=True)
    return steps


def train_arguments(config: str | None, overrides: list[str]) -> tuple[str | None, list[str], Callable[[], None]]:
    """``(config for the recipe lookup, the recipe's argv, cleanup)`` for ``acceltrain train``.

    ``cleanup`` removes what this made (the fresh cache of ``--force_retrain_tokenizer``).
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--resume_from_checkpoint")
    parser.add_argument("--force_retrain_tokenizer", action="store_true")
    parser.add_argument("--log_level", type=str.lower)
    known, rest = parser.parse_known_args(overrides)
    if known.log_level is not None:
        if known.log_level not in _LEVELS:
            raise UserError(f"--log_level {known.log_level!r}: expected one of {', '.join(_LEVELS)}")
        logging.basicConfig(level=known.log_level.upper(), force=True)
        logging.getLogger("acceltrain").setLevel(known.log_level.upper())
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(getattr(hf_logging, known.log_level.upper()))
    epochs = None
    if config and is_nested_config(config):
        flags, epochs = pretrain_flags(config)
        recipe_config, argv = None, [*flags, *rest]
    else:
        recipe_config, argv = config, [*(["--config", config] if config else []), *rest]
    if known.resume_from_checkpoint:
        run = _checkpoint_run_dir(known.resume_from_checkpoint)
        given = _flag_value(argv, "--output_dir")
        if given is not None and Path(given).resolve() != run.resolve():
            raise UserError(f"--resume_from_checkpoint {known.resume_from_checkpoint} belongs to {run}, but "
                            f"--output_dir is {given}")
        argv += ["--output_dir", str(run), "--resume", "true"]
    # Before a fresh cache is named: counting packs the data in the usual cache, and the run
    # below must train its tokenizer itself.
    if epochs is not None and _flag_value(argv, "--max_steps") is None:
        argv += ["--max_steps", str(_steps_for_epochs(argv, epochs))]
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if known.force_retrain_tokenizer:
        if _flag_value(argv, "--tokenizer"):
            raise UserError("--force_retrain_tokenizer with --tokenizer: an existing tokenizer is not trained")
        fresh = tempfile.mkdtemp(prefix="acceltrain-retrain-")
        argv += ["--cache_dir", fresh]
        cleanup = lambda: shutil.rmtree(fresh, ignore_errors=True)  # noqa: E731
    return recipe_config, argv, cleanup


_EVAL_KEYS = ("dataset_name", "dataset_config", "dataset_split", "validation_split", "text_column", "max_length",
              "batch_size", "max_batches", "train_file", "validation_file")


def eval_config_file(args: argparse.Namespace) -> None:
    """``acceltrain evaluate --dataset_config FILE.json``: LLM Trainer's evaluation dataset config
    fills the flags that were not given; then the defaults fill the rest."""
    from .mtf_config import load_mapping

    path = args.dataset_config
    if path and Path(path).suffix.lower() in (".json", ".yaml", ".yml"):
        data = load_mapping(path)
        for key in data:
            if key not in _EVAL_KEYS:
                raise UserError(f"{path}: {key}: unknown key; known keys: {', '.join(_EVAL_KEYS)}")
        source = data.get("validation_file") or data.get("dataset_name") or data.get("train_file")
        args.dataset = args.dataset or source
        args.dataset_config = data.get("dataset_config")
        if data.get("validation_file") is None and data.get("dataset_name"):
            args.split = data.get("validation_split", data.get("dataset_split", args.split))
        for flag, key in (("text_column", "text_column"), ("seq_len", "max_length"), ("batch_size", "batch_size"),
                          ("max_batches", "max_batches")):
            if getattr(args, flag) is None and data.get(key) is not None:
                setattr(args, flag, data[key])
    for flag, default in (("text_column", "text"), ("seq_len", 256), ("batch_size", 8)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
