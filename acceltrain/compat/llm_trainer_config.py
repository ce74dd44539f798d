"""LLM Trainer's config classes and nested config files, mapped onto acceltrain.

``ModelConfig`` / ``TrainingConfig`` / ``DataConfig`` take the document's keywords. A nested
config file (``model:`` / ``training:`` / ``data:`` sections, YAML or JSON) becomes the flags of
``recipes/pretrain.py`` (:func:`pretrain_flags`), which is how ``acceltrain train --config`` runs
it. Import these names from :mod:`acceltrain.compat.llm_trainer`.

What differs from LLM Trainer's own model, and why: the model is GPT-2-shaped (pre-norm blocks,
a GELU MLP of ``d_ff``, dropout; transformers' ``GPT2LMHeadModel``) with *learned* position
embeddings, so ``use_learned_pos_emb=False`` (sinusoidal) has no exact counterpart;
``arch="llama"`` picks RoPE, RMSNorm and a gated MLP instead (no residual dropout there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import UserError
from ..models.presets import ModelConfig as _ArchConfig

__all__ = ["DataConfig", "GenerationError", "ModelConfig", "ModelConfigurationError", "TokenizerNotTrainedException",
           "TrainingConfig", "TrainingError", "is_nested_config", "load_nested_config", "pretrain_flags"]


class ModelConfigurationError(UserError, AssertionError):
    """A model configuration is inconsistent (an AssertionError too, as the document promises)."""


class TokenizerNotTrainedException(UserError):
    """The tokenizer was used before it was trained or loaded."""


class TrainingError(RuntimeError):
    """Training could not run (the message says why)."""


class GenerationError(UserError):
    """Generation was asked for something it cannot do (empty prompt, bad length)."""


class _Saveable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ModelConfigurationError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**config_dict)

    def save(self, path: str | Path) -> None:
        """Write the fields as JSON (``.json``) or YAML (anything else)."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict())
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path):
        from .mtf_config import load_mapping

        return cls.from_dict(load_mapping(path))


@dataclass
class ModelConfig(_Saveable):
    """The Transformer's shape (LLM Trainer's names and defaults)."""

    vocab_size: int = 50000
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072
    max_seq_len: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    pre_norm: bool = True
    use_learned_pos_emb: bool = False
    gradient_checkpointing: bool = False
    arch: str = "gpt2"  # acceltrain's addition: "gpt2" (dropout, GELU MLP) or "llama"

    def __post_init__(self) -> None:
        if not self.pre_norm:
            raise ModelConfigurationError("pre_norm=False: acceltrain's models (GPT-2, Llama) are pre-norm only")
        if self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ModelConfigurationError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        try:
            self.to_arch_config()
        except ValueError as e:
            raise ModelConfigurationError(str(e).replace("ModelConfig.", "")) from None

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_arch_config(self) -> _ArchConfig:
        """acceltrain's architecture config (:class:`acceltrain.models.ModelConfig`)."""
        if self.arch == "llama" and self.dropout:
            raise ModelConfigurationError(
                f"dropout={self.dropout} with arch='llama': transformers' Llama has no residual dropout; "
                "use arch='gpt2' (the default) or dropout=0")
        return _ArchConfig(arch=self.arch, vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
                           n_layers=self.n_layers, d_ff=self.d_ff, max_seq_len=self.max_seq_len,
                           dropout=self.dropout, attention_dropout=self.attention_dropout,
                           activation=self.activation, gradient_checkpointing=self.gradient_checkpointing)


@dataclass
class TrainingConfig(_Saveable):
    """How to train (LLM Trainer's names and defaults)."""

    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_epochs: int = 10
    max_steps: int | None = None
    lr_scheduler: str = "cosine"
    warmup_steps: int = 1000
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    use_amp: bool = True
    amp_dtype: str = "float16"
    save_steps: int = 1000
    checkpoint_dir: str = "./checkpoints"
    eval_steps: int = 500
    eval_strategy: str = "steps"
    logging_steps: int = 100
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    world_size: int = 1
    local_rank: int = -1
    compile_model: bool = False
    dataloader_num_workers: int = 0

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * max(1, self.world_size)


@dataclass
class DataConfig(_Saveable):
    """Where the text comes from and how it is cut (LLM Trainer's names and defaults)."""

    dataset_name: str = "wikitext"
    dataset_config: str | None = "wikitext-103-raw-v1"
    dataset_split: str = "train"
    validation_split: str = "validation"
    text_column: str = "text"
    max_length: int = 1024
    min_length: int = 10
    vocab_size: int = 50000
    pack_sequences: bool = True
    preprocessing_num_workers: int = 4
    dataloader_num_workers: int = 4
    train_file: str | None = None
    validation_file: str | None = None


# ---------------------------------------------------------------------- nested config files
_SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig}
# Keys that do not change what recipes/pretrain.py does: accepted, and a note says so.
_IGNORED = {
    "training.checkpoint_dir": "checkpoints go to OUTPUT_DIR/checkpoints",
    "training.world_size": "the launcher (accelerate launch / torchrun) decides the processes",
    "training.local_rank": "the launcher decides the ranks",
    "training.report_to": "metrics go to TensorBoard and OUTPUT_DIR/metrics.jsonl",
    "training.eval_strategy": "evaluation runs every eval_steps steps",
    "data.validation_split": "the held-out set is the end of the token stream (val_fraction)",
    "data.validation_file": "the held-out set is the end of the token stream (val_fraction)",
    "data.min_length": "documents are packed into windows: short ones are not dropped",
    "data.preprocessing_num_workers": "tokenization runs in the tokenizers library's own threads",
    "model.use_learned_pos_emb": "GPT-2 positions are learned; llama's are rotary",
    "model.pre_norm": "the blocks are pre-norm",
}


def is_nested_config(path: str | Path) -> bool:
    """A YAML or JSON file with ``model:``, ``training:`` or ``data:`` sections (a flat recipe
    config, JSON included, is not)."""
    from .mtf_config import load_mapping

    try:
        data = load_mapping(path)
    except UserError:
        return False
    return any(isinstance(data.get(k), dict) for k in _SECTIONS)


def load_nested_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """The file's sections, every key checked against the config classes' fields."""
    from .mtf_config import load_mapping

    data = load_mapping(path)
    for key, section in data.items():
        if key not in _SECTIONS:
            raise UserError(f"{path}: {key}: unknown section; expected model, training and data")
        if not isinstance(section, dict):
            raise UserError(f"{path}: {key}: expected a mapping, got {section!r}")
        known = [f.name for f in dataclasses.fields(_SECTIONS[key])]
        for name in section:
            if name not in known:
                raise UserError(f"{path}: {key}.{name}: unknown key; known keys: {', '.join(known)}")
    return data


def _flag(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def pretrain_flags(path: str | Path, *, note: Any = None) -> tuple[list[str], int | None]:
    """``recipes/pretrain.py`` flags for a nested config file, and its ``training.num_epochs``
    (when it, not ``max_steps``, decides the length: steps then depend on the packed data).

    Keys that do not change the run print a note (``note``: a callable taking a line; default
    stderr). Values the recipe cannot honour are a UserError naming the key.
    """
    say = note or (lambda line: print(line, file=sys.stderr))
    data = load_nested_config(path)
    model, training, data_ = data.get("model", {}), data.get("training", {}), data.get("data", {})
    flags: dict[str, Any] = {}

    def bad(key: str, why: str) -> UserError:
        return UserError(f"{path}: {key}: {why}")

    for section, values in data.items():
        for key in values:
            if f"{section}.{key}" in _IGNORED:
                say(f"note: {path}: {section}.{key} is ignored: {_IGNORED[f'{section}.{key}']}")
    if model.get("pre_norm") is False:
        raise bad("model.pre_norm", "false is not supported: acceltrain's models are pre-norm")
    arch = model.get("arch", "gpt2")
    flags["arch"] = arch
    for key in ("d_model", "n_heads", "n_layers", "d_ff", "activation", "dropout", "gradient_checkpointing"):
        if key in model:
            flags[key] = model[key]
    attention = model.get("attention_dropout")
    if arch == "gpt2" and attention:
        raise bad("model.attention_dropout", "recipes/pretrain.py gives GPT-2 no attention dropout (model.dropout "
                  "is its residual dropout); set it to 0 or remove it")
    if arch == "llama":
        if model.get("dropout"):
            raise bad("model.dropout", "transformers' Llama has no residual dropout; use model.attention_dropout")
        flags.pop("dropout", None)
        if attention is not None:
            flags["dropout"] = attention  # the recipe's dropout is Llama's attention dropout
    if model.get("n_heads") and model.get("d_model") and model["d_model"] % model["n_heads"]:
        raise bad("model.n_heads", f"d_model ({model['d_model']}) must be divisible by n_heads ({model['n_heads']})")
    seq_len = data_.get("max_length", model.get("max_seq_len"))
    if seq_len is not None:
        if model.get("max_seq_len") is not None and seq_len > model["max_seq_len"]:
            raise bad("data.max_length", f"{seq_len} is longer than model.max_seq_len {model['max_seq_len']}")
        flags["seq_len"] = seq_len
    vocab = data_.get("vocab_size", model.get("vocab_size"))
    if vocab is not None:
        flags["vocab_size"] = vocab
    if data_.get("train_file") or data_.get("dataset_name"):
        flags["dataset"] = data_.get("train_file") or data_["dataset_name"]
    for src, dst in (("dataset_config", "dataset_config"), ("text_column", "text_column")):
        if data_.get(src) is not None:
            flags[dst] = data_[src]
    if data_.get("dataset_split", "train") != "train":
        raise bad("data.dataset_split", "recipes/pretrain.py reads the train split (and holds out its end)")
    if data_.get("pack_sequences") is False:
        raise bad("data.pack_sequences", "false is not supported: recipes/pretrain.py always packs")
    for src, dst in (("batch_size", "batch_size"), ("learning_rate", "lr"), ("weight_decay", "weight_decay"),
                     ("max_steps", "max_steps"), ("warmup_steps", "warmup_steps"), ("min_lr_ratio", "min_lr_ratio"),
                     ("max_grad_norm", "grad_clip"), ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                     ("save_steps", "save_interval"), ("eval_steps", "eval_interval"),
                     ("logging_steps", "log_interval"), ("compile_model", "compile"),
                     ("dataloader_num_workers", "num_workers")):
        if training.get(src) is not None:
            flags[dst] = training[src]
    if "dataloader_num_workers" in data_ and "num_workers" not in flags:
        flags["num_workers"] = data_["dataloader_num_workers"]
    if training.get("lr_scheduler", "cosine") != "cosine":
        raise bad("training.lr_scheduler", f"{training['lr_scheduler']!r}: recipes/pretrain.py uses warmup + cosine")
    if training.get("optimizer", "adamw") != "adamw":
        raise bad("training.optimizer", f"{training['optimizer']!r}: recipes/pretrain.py uses AdamW")
    if "use_amp" in training or "amp_dtype" in training:
        dtype = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}.get(
            str(training.get("amp_dtype", "auto")), "auto")
        if not training.get("use_amp", True):
            flags["mixed_precision"] = "no"
        else:  # use_amp without amp_dtype: bf16 where the device has it, else fp32 ("auto")
            flags["mixed_precision"] = dtype if "amp_dtype" in training else "auto"
    epochs = None
    if "max_steps" not in flags:
        epochs = training.get("num_epochs", 10 if training else None)
        if epochs is not None and (not isinstance(epochs, int | float) or epochs <= 0):
            raise bad("training.num_epochs", f"expected a number > 0, got {epochs!r}")
    if "warmup_ratio" in training and "warmup_steps" not in training and "max_steps" in flags:
        flags["warmup_steps"] = math.ceil(training["warmup_ratio"] * flags["max_steps"])
    argv: list[str] = []
    for key, value in flags.items():
        argv += [f"--{key}", _flag(value)]
    return argv, epochs
