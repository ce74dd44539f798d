"""The one-call Trainer's config: the canonical fields and the seeds' aliases for them."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from .checkpoint_names import BEST

__all__ = ["TrainerConfig", "is_config_key", "make_config"]


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainerConfig:
    """Settings of a one-call run; a dict with these keys (or the seeds' aliases) works too.

    The field names are canonical (Hugging Face ``TrainingArguments``' ``learning_rate`` and
    ``max_grad_norm``); the recipes' and ``BaseTrainer``'s ``lr`` and ``grad_clip`` are accepted
    for them, and two keys for one setting are an error naming both. ``output_dir`` is the
    trainer's ``workspace`` (also accepted under that name).
    """

    max_steps: int | None = _f(None, "Optimizer updates to train for (or give epochs)")
    epochs: float | None = _f(None, "Passes over train_dataloader, turned into max_steps (or give max_steps)")
    learning_rate: float = _f(1e-3, "Peak LR of the default AdamW and of the schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (not on biases or norm gains)")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update")
    mixed_precision: str | None = _f(None, "'bf16', 'fp16' (GPU) or None")
    max_grad_norm: float | None = _f(None, "Clip the global gradient norm to this (None: no clipping)")
    scheduler: str = _f("linear", "LR schedule: constant, linear, cosine, cosine_restarts, polynomial, wsd")
    warmup_steps: int = _f(0, "Linear warmup in updates (or warmup_ratio)")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of max_steps")
    min_lr_ratio: float = _f(0.0, "LR floor as a fraction of the peak LR")
    scheduler_kwargs: dict = _f({}, "Extra schedule arguments (t_0, t_mult, power, decay_ratio, decay_type)")
    output_dir: str | None = _f(None, "Workspace: checkpoints (resumed from automatically), TensorBoard, metrics.jsonl")
    log_interval: int = _f(10, "Updates between progress lines and logged averages")
    eval_interval: int | None = _f(None, "Updates between evaluations (default: every epoch with epochs, else at the end)")
    save_interval: int | None = _f(None, "Updates between checkpoints (default: only at the end)")
    keep_checkpoints: int = _f(2, "Newest checkpoints kept")
    keep_best: int | None = _f(None, f"Also keep the N checkpoints with the best eval/loss ({BEST}); needs eval data")
    resume_from_checkpoint: str | None = _f(None, "Load this checkpoint folder first (default: the output_dir's latest)")
    early_stopping_patience: int | None = _f(None, "Stop after this many evaluations without a better eval/loss")
    early_stopping_min_delta: float = _f(0.0, "Improvement needed to reset the patience")
    seed: int | None = _f(None, "Seed Python, NumPy and torch, and the data order")


_FIELDS = {f.name for f in dataclasses.fields(TrainerConfig)}
# The seeds' names (SELGIS, Transformer Builder, HF TrainingArguments) for the same settings.
_ALIASES = {
    "max_epochs": "epochs", "num_train_epochs": "epochs", "lr": "learning_rate",
    "accumulate_grad_batches": "gradient_accumulation_steps", "grad_clip": "max_grad_norm",
    "grad_clip_norm": "max_grad_norm", "gradient_clip_val": "max_grad_norm", "scheduler_type": "scheduler",
    "lr_scheduler_type": "scheduler", "workspace": "output_dir", "logging_steps": "log_interval",
    "eval_steps": "eval_interval", "save_steps": "save_interval", "save_total_limit": "keep_checkpoints",
    "patience": "early_stopping_patience", "min_delta": "early_stopping_min_delta", "save_top_k": "keep_best",
}
_SCHEDULE_KEYS = ("t_0", "t_mult", "power", "decay_ratio", "decay_type")
_SPECIAL = {"precision", "fp16", "bf16", "min_lr", *_SCHEDULE_KEYS}
_PRECISION = {"32": None, "fp32": None, "no": None, "16": "fp16", "16-mixed": "fp16", "fp16": "fp16",
              "bf16": "bf16", "bf16-mixed": "bf16"}


def is_config_key(key: str) -> bool:
    return key in _FIELDS or key in _ALIASES or key in _SPECIAL


def _canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    """The seeds' names and encodings -> TrainerConfig fields (``_min_lr`` waits for the LR)."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # field -> the key that set it
    for key, value in values.items():
        name = key if key in _FIELDS else _ALIASES.get(key)
        if key in _SCHEDULE_KEYS:
            out.setdefault("scheduler_kwargs", {})[key] = value
            continue
        if key == "precision":
            if str(value) not in _PRECISION:
                raise ValueError(f"config: precision must be one of {list(_PRECISION)}, got {value!r}")
            name, value = "mixed_precision", _PRECISION[str(value)]
        elif key in ("fp16", "bf16"):
            if not value:
                continue
            name, value = "mixed_precision", key
        elif key == "min_lr":
            name = "_min_lr"
        elif name is None:
            close = difflib.get_close_matches(key, [*_FIELDS, *_ALIASES, *_SPECIAL], n=1)
            raise ValueError(f"config: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if name in out and name != "scheduler_kwargs":
            raise ValueError(f"config: {key!r} sets {name}, which {given[name]!r} already sets; give one")
        given[name] = key
        out[name] = {**out.get(name, {}), **value} if name == "scheduler_kwargs" else value
    return out


def make_config(config: TrainerConfig | Mapping[str, Any] | Any = None, **overrides: Any) -> TrainerConfig:
    """A :class:`TrainerConfig` from a TrainerConfig, a dict or another dataclass; ``overrides`` win.

    Raises:
        ValueError: an unknown key (naming it, with the closest known key), two keys for one
            setting, both ``max_steps`` and ``epochs`` or neither, or a bad value.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        base = dataclasses.asdict(config)
    elif config is None or isinstance(config, Mapping):
        base = dict(config or {})
    else:
        raise TypeError(f"config must be a TrainerConfig, a dict or a dataclass, got {type(config).__name__}")
    first, second = _canonical(base), _canonical(overrides)
    merged = {**first, **second, "scheduler_kwargs": {**first.get("scheduler_kwargs", {}),
                                                      **second.get("scheduler_kwargs", {})}}
    min_lr = merged.pop("_min_lr", None)
    cfg = TrainerConfig(**merged)
    if min_lr is not None:  # SELGIS's absolute floor
        cfg.min_lr_ratio = float(min_lr) / cfg.learning_rate
    if cfg.scheduler == "cosine_restart":  # SELGIS's spelling
        cfg.scheduler = "cosine_restarts"
    if cfg.max_grad_norm == 0:  # SELGIS: 0 = no clipping
        cfg.max_grad_norm = None
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise ValueError("config: give exactly one of max_steps and epochs")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise ValueError(f"config: epochs must be > 0, got {cfg.epochs!r}")
    if not (isinstance(cfg.learning_rate, (int, float)) and cfg.learning_rate > 0):
        raise ValueError(f"config: learning_rate must be a number > 0, got {cfg.learning_rate!r}")
    return cfg


