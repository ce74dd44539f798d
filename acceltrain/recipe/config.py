"""The config fields the recipes share (``TrainingConfig``, ``LoraFields``, ``TrackingFields``)
and their checks; a recipe's config subclasses them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..config import ConfigError

__all__ = ["TrackingFields", "TrainingConfig", "LoraFields", "check_eval_source", "choose_precision"]


def choose_precision(requested: str) -> str | None:
    """``"auto"`` is bf16 on a GPU that supports it and fp32 elsewhere (bf16 matmuls are slower
    than fp32 on most CPUs); ``"no"`` is fp32; ``"bf16"`` / ``"fp16"`` as asked."""
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return None if requested == "no" else requested


@dataclass
class TrackingFields:
    """Where a run reports and how much it prints; every recipe has these fields.

    ``report_to`` takes HF Trainer's names: ``--report_to wandb mlflow`` (or ``wandb,mlflow``),
    ``all`` (every installed tracker) or ``none``; the run's identity in each tracker is kept in
    its checkpoints, so a resumed run continues the same tracker run.
    """

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "Experiment trackers: tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive (several: "
                "space- or comma-separated), all (every installed one) or none"})
    run_name: str | None = field(default=None, metadata={
        "help": "The run's name in the trackers (default: the output_dir folder's name)"})
    tracker_project: str = field(default="acceltrain", metadata={
        "help": "The trackers' project (W&B project, MLflow experiment, Comet/ClearML project)"})
    log_level: str = field(default="warning", metadata={
        "help": "Python logging level: debug, info, warning, error or critical; debug also shows third-party "
                "progress bars and import-time messages"})


@dataclass
class TrainingConfig(TrackingFields):
    """The fields every fine-tuning recipe shares: run folder, step loop, schedule, logs, checkpoints.

    A recipe's config subclasses it (and :class:`LoraFields`) and redefines a field to change its
    default, so every recipe spells the same setting the same way on the command line and in YAML.

    ``output_dir`` is the trainer's ``workspace`` (``BaseTrainer(workspace=cfg.output_dir)``): the
    one run folder, under two names. ``lr`` and ``grad_clip`` are canonical (``BaseTrainer``'s
    names); the one-call ``TrainerConfig``'s and Hugging Face's ``learning_rate`` and
    ``max_grad_norm`` are accepted for them (:attr:`config_aliases`), and giving both spellings
    is an error naming the two.
    """

    #: Other spellings of a field, accepted on the command line and in YAML by :func:`acceltrain.config.parse_config`.
    config_aliases: ClassVar[dict[str, str]] = {"learning_rate": "lr", "max_grad_norm": "grad_clip"}

    output_dir: str = field(default="runs/run", metadata={
        "help": "Run folder (the trainer's workspace): checkpoints, logs, final/"})
    batch_size: int = field(default=16, metadata={"help": "Examples per micro-batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step"})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (also --learning_rate)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final LR as a fraction of the peak (cosine floor)"})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay on matrices (not biases/norms)"})
    grad_clip: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (also --max_grad_norm)"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "auto: bf16 on GPUs that support it, fp32 on CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward"})
    eval_interval: int = field(default=50, metadata={"help": "Steps between evaluations (and at the end)"})
    log_interval: int = field(default=10, metadata={"help": "Steps between progress lines and log records"})
    save_interval: int = field(default=50, metadata={"help": "Steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints to keep"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    seed: int = field(default=0, metadata={"help": "Seed for new weights, data order and dropout"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run Python code shipped with a Hub model"})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "Delete an earlier run's checkpoints in output_dir first"})
    allow_global_batch_change: bool = field(default=False, metadata={
        "help": "Resuming on another number of processes: continue even when no accumulation keeps the "
                "samples per step (default: refuse)"})
    collective_timeout: float = field(default=60.0, metadata={
        "help": "Seconds a collective in the step loop waits for its peers before the rank exits "
                "(a dead node ends the job instead of hanging it)"})

    def validate_training(self) -> None:
        """Raise ConfigError for a count below 1 or a learning rate out of range."""
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_interval", "log_interval",
                     "save_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        for name in ("warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.collective_timeout < math.inf:
            raise ConfigError(f"collective_timeout must be a number of seconds > 0, got {self.collective_timeout}")

    def trainer_kwargs(self) -> dict[str, Any]:
        """The ``BaseTrainer`` arguments these fields decide."""
        return dict(max_steps=self.max_steps, grad_clip=self.grad_clip, max_non_finite_grad_retries=3,
                    mixed_precision=choose_precision(self.mixed_precision),
                    gradient_accumulation_steps=self.gradient_accumulation_steps, workspace=self.output_dir,
                    data_seed=self.seed, allow_global_batch_change=self.allow_global_batch_change,
                    collective_timeout=self.collective_timeout)


@dataclass
class LoraFields:
    """LoRA through ``peft``: off while ``lora_r`` is 0."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight instead"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (the update is alpha/r * BA)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names (q_proj,v_proj; GPT-2: c_attn) or all-linear (every linear "
                "layer but the output head)"})
    merge_lora: bool = field(default=False, metadata={
        "help": "Also export the base with the adapter merged in, as a plain model in output_dir/merged"})

    def validate_lora(self) -> None:
        """Raise ConfigError for a negative rank or dropout outside [0, 1)."""
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.merge_lora and not self.lora_r:
            raise ConfigError("merge_lora needs LoRA (lora_r >= 1): a full fine-tune is already a plain model")


def check_eval_source(dataset: str | None, eval_dataset: str | None, eval_split: str | None) -> None:
    """Refuse evaluation settings that would not mean what they say.

    Raises:
        ConfigError: ``eval_dataset``/``eval_split`` without ``dataset`` (the built-in tasks hold
            out their own evaluation set), or ``eval_split`` for a local ``dataset`` (local files
            have no splits: that would evaluate on the training file itself).
    """
    if dataset is None and (eval_dataset or eval_split):
        raise ConfigError("eval_dataset and eval_split need --dataset: the built-in task holds out its own evaluation set")
    if eval_split and not eval_dataset and Path(dataset).expanduser().exists():
        raise ConfigError(f"eval_split {eval_split!r} names a Hub split, but --dataset {dataset} is a local path "
                          "(no splits): pass --eval_dataset FILE")
