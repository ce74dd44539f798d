"""SELGIS's ``SelgisConfig`` / ``TransformerConfig``, field for field, and how each maps onto acceltrain.

Every field either takes effect (see :func:`acceltrain.compat.selgis.Trainer`) or is refused
with a message saying why; the table in the README ("Coming from SELGIS") lists the mapping.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, UserError

__all__ = ["SelgisConfig", "TransformerConfig", "load_selgis_config", "SCHEDULER_NAMES"]

#: SELGIS scheduler names -> acceltrain's :func:`acceltrain.schedules.build_schedule` names.
SCHEDULER_NAMES = {"cosine": "cosine", "cosine_restart": "cosine_restarts", "linear": "linear",
                   "constant": "constant", "polynomial": "polynomial"}


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class SelgisConfig:
    """SELGIS's base training configuration (same names, types and defaults).

    Validation (as SELGIS): ``fp16`` and ``bf16`` not both; ``warmup_epochs`` or
    ``warmup_ratio``, not both. Plus acceltrain's own: values in range, known names.
    """

    batch_size: int = _f(32, "Batch size of the loaders the CLI builds; with a given loader it must match it")
    eval_batch_size: int = _f(64, "Evaluation batch size of the loaders the CLI builds (same rule)")
    max_epochs: int = _f(100, "Epochs, turned into max_steps from the loader's length (logged)")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update")
    patience: int = _f(5, "EarlyStoppingHook patience, in evaluations (one per epoch unless eval_steps)")
    min_delta: float = _f(1e-4, "EarlyStoppingHook min_delta")
    grad_clip_norm: float = _f(1.0, "Clip the global gradient norm (0: measure only)")
    grad_clip_value: float | None = _f(None, "Then clamp every gradient entry to [-v, v]")
    spike_threshold: float = _f(3.0, "GuardHook: a loss above threshold x the recent mean is a spike")
    min_history_len: int = _f(10, "GuardHook: good losses needed before spikes are looked for")
    nan_recovery: bool = _f(True, "Add a GuardHook (skip, roll back, lower the LR; bounded)")
    lr_finder_enabled: bool = _f(True, "Run the LR range test before training and start from its suggestion")
    lr_finder_trainable_only: bool = _f(False, "LR finder saves/restores trainable parameters only")
    lr_finder_start: float = _f(1e-7, "LR finder start LR")
    lr_finder_end: float = _f(1.0, "LR finder end LR")
    lr_finder_steps: int = _f(100, "LR finder steps")
    warmup_epochs: int = _f(0, "Warmup in epochs, turned into steps (logged)")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of all steps")
    min_lr: float = _f(1e-7, "LR floor (absolute; a ratio of the starting LR in acceltrain)")
    scheduler_type: str = _f("cosine_restart", "cosine, cosine_restart, linear, constant, polynomial")
    t_0: int = _f(10, "First restart period in epochs (cosine_restart), turned into steps (logged)")
    t_mult: int = _f(2, "Period multiplier after each restart")
    label_smoothing: float = _f(0.1, "Label smoothing of the default CrossEntropyLoss (tuple batches, no criterion)")
    weight_decay: float = _f(0.01, "Weight decay of the default AdamW (not on biases / norm gains)")
    sparsity_enabled: bool = _f(False, "Add a SparsityHook")
    sparsity_target: float = _f(0.0, "SparsityHook target sparsity")
    sparsity_start_epoch: int = _f(0, "SparsityHook start, in epochs (turned into steps)")
    sparsity_frequency: int = _f(1, "SparsityHook frequency, in epochs (turned into steps)")
    fp16: bool = _f(False, "fp16 mixed precision (GPU only: refused on the CPU)")
    bf16: bool = _f(False, "bf16 mixed precision")
    logging_steps: int = _f(10, "Steps between progress lines and logged averages (TensorBoard, metrics.jsonl)")
    eval_steps: int | None = _f(None, "Steps between evaluations (None: every epoch)")
    save_steps: int | None = _f(None, "Steps between checkpoints (None: every epoch)")
    output_dir: str = _f("./output", "Workspace: checkpoints (resumed from automatically), logs")
    save_total_limit: int = _f(3, "Newest checkpoints kept (when save_best_only is False)")
    save_best_only: bool = _f(True, "Keep only the best checkpoint (plus the newest, for exact resume)")
    state_storage: str = _f("disk", "'disk': checkpoints on disk; 'memory': no checkpoint files, state in RAM")
    state_dir: str | None = _f(None, "Checkpoint folder (default: output_dir/checkpoints)")
    state_update_interval: int = _f(100, "GuardHook: steps between rollback snapshots")
    device: str = _f("auto", "auto, cuda, cpu, mps")
    seed: int = _f(42, "Seed Python, NumPy, torch and the data order")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad field."""
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16: at most one can be True")
        if self.warmup_epochs and self.warmup_ratio:
            raise ConfigError("warmup_epochs and warmup_ratio: give one of them, not both")
        if self.scheduler_type not in SCHEDULER_NAMES:
            raise ConfigError(f"scheduler_type must be one of {list(SCHEDULER_NAMES)}, got {self.scheduler_type!r}")
        if self.state_storage not in ("disk", "memory"):
            raise ConfigError(f"state_storage must be 'disk' or 'memory', got {self.state_storage!r}")
        if self.device not in ("auto", "cuda", "cpu", "mps"):
            raise ConfigError(f"device must be one of auto, cuda, cpu, mps, got {self.device!r}")
        for name in ("batch_size", "eval_batch_size", "max_epochs", "gradient_accumulation_steps", "patience",
                     "lr_finder_steps", "logging_steps", "save_total_limit", "state_update_interval",
                     "sparsity_frequency", "t_0", "t_mult", "min_history_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1 or None, got {value!r}")
        if not 0.0 <= self.sparsity_target < 1.0:
            raise ConfigError(f"sparsity_target must be in [0, 1), got {self.sparsity_target!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.nan_recovery and not self.spike_threshold > 1.0:
            raise ConfigError(f"spike_threshold must be > 1, got {self.spike_threshold!r}")
        if self.grad_clip_value is not None and not self.grad_clip_value > 0:
            raise ConfigError(f"grad_clip_value must be > 0 or None, got {self.grad_clip_value!r}")


@dataclasses.dataclass
class TransformerConfig(SelgisConfig):
    """``SelgisConfig`` plus the Hugging Face fields (see :class:`acceltrain.compat.selgis.TransformerTrainer`)."""

    model_name_or_path: str = _f("", "Model folder or Hub id loaded when TransformerTrainer gets a string")
    num_labels: int = _f(2, "Labels of a classification head (passed to from_pretrained)")
    problem_type: str = _f("single_label_classification", "Which Auto class loads the model")
    max_length: int = _f(512, "TransformerTrainer.tokenize: max length")
    padding: str = _f("max_length", "TransformerTrainer.tokenize: max_length, longest, do_not_pad")
    truncation: bool = _f(True, "TransformerTrainer.tokenize: truncate to max_length")
    optimizer_type: str = _f("adamw", "adamw, adam, sgd, adafactor")
    learning_rate: float = _f(2e-5, "Learning rate (the LR finder's suggestion replaces it when enabled)")
    adam_beta1: float = _f(0.9, "Adam/AdamW beta1")
    adam_beta2: float = _f(0.999, "Adam/AdamW beta2")
    adam_epsilon: float = _f(1e-8, "Adam/AdamW epsilon")
    use_peft: bool = _f(False, "Wrap the model with peft.get_peft_model(LoraConfig(**peft_config))")
    peft_config: dict = _f({}, "LoraConfig keyword arguments")
    gradient_checkpointing: bool = _f(False, "model.gradient_checkpointing_enable()")
    deepspeed_config: str | None = _f(None, "Refused: DeepSpeed is chosen by the launch (accelerate launch --config_file)")

    def validate(self) -> None:
        super().validate()
        problems = ("single_label_classification", "multi_label_classification", "regression", "seq2seq",
                    "causal_lm", "masked_lm")
        if self.problem_type not in problems:
            raise ConfigError(f"problem_type must be one of {list(problems)}, got {self.problem_type!r}")
        if self.padding not in ("max_length", "longest", "do_not_pad"):
            raise ConfigError(f"padding must be max_length, longest or do_not_pad, got {self.padding!r}")
        if self.optimizer_type not in ("adamw", "adam", "sgd", "adafactor"):
            raise ConfigError(f"optimizer_type must be adamw, adam, sgd or adafactor, got {self.optimizer_type!r}")
        if self.deepspeed_config is not None:
            raise ConfigError("deepspeed_config: acceltrain takes DeepSpeed from the launch, not from the trainer: "
                              "accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml your_script.py")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")


def load_selgis_config(path: str | Path, cls: type[SelgisConfig] | None = None) -> SelgisConfig:
    """A ``SelgisConfig`` (or ``TransformerConfig`` when the file has its fields) from YAML or JSON.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown (named), or a value is bad.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of SelgisConfig fields")
    base = {f.name for f in dataclasses.fields(SelgisConfig)}
    cls = cls or (TransformerConfig if set(data) - base else SelgisConfig)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
    try:
        return cls(**data)
    except UserError as e:
        raise ConfigError(f"{path}: {e}") from None
