"""SELGIS's ``TransformerTrainer``: a Hugging Face model (or its folder / Hub id) on the SELGIS Trainer."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .selgis import Trainer
from .selgis_config import TransformerConfig
from .selgis_parts import get_optimizer_grouped_params

__all__ = ["TransformerTrainer", "load_transformer"]

logger = logging.getLogger("acceltrain")

_AUTO = {"single_label_classification": "AutoModelForSequenceClassification",
         "multi_label_classification": "AutoModelForSequenceClassification",
         "regression": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
         "masked_lm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM"}


def load_transformer(name_or_path: str, config: TransformerConfig) -> torch.nn.Module:
    """The model for ``config.problem_type`` from a folder or Hub id (remote code is not trusted)."""
    import transformers

    auto = getattr(transformers, _AUTO[config.problem_type])
    kwargs: dict[str, Any] = {}
    if auto is transformers.AutoModelForSequenceClassification:
        kwargs = {"num_labels": 1 if config.problem_type == "regression" else config.num_labels,
                  "problem_type": config.problem_type, "ignore_mismatched_sizes": True}  # a new head
    try:
        return auto.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path {name_or_path!r}: cannot load a {_AUTO[config.problem_type]} "
                          f"({str(e).splitlines()[0]})") from None


class TransformerTrainer(Trainer):
    """``TransformerTrainer(model_or_path, config, train_dataloader, eval_dataloader=None, tokenizer=None, **kwargs)``.

    A string (or ``None`` with ``config.model_name_or_path``) is loaded with the Auto class of
    ``config.problem_type`` (``num_labels`` for classification heads). Then, as SELGIS:
    ``gradient_checkpointing``, PEFT (``use_peft`` with ``peft_config`` as ``LoraConfig``
    arguments), and an optimizer by ``optimizer_type`` over decay / no-decay groups with
    ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` (the LR finder's
    suggestion replaces ``learning_rate`` when ``lr_finder_enabled``). ``max_length``,
    ``padding`` and ``truncation`` are what :meth:`tokenize` uses. ``deepspeed_config`` is
    refused: DeepSpeed comes from the launch (``accelerate launch --config_file ...``).

    Example:
        >>> trainer = TransformerTrainer("runs/pretrain/final", TransformerConfig(problem_type="causal_lm"), dl)
    """

    def __init__(self, model_or_path: torch.nn.Module | str | None, config: TransformerConfig | None = None,
                 train_dataloader: Iterable | None = None, eval_dataloader: Any = None, tokenizer: Any = None,
                 **kwargs: Any) -> None:
        cfg = config if config is not None else TransformerConfig()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(cfg).__name__}")
        cfg.validate()
        model = model_or_path or cfg.model_name_or_path
        if not model:
            raise ConfigError("model_or_path: give a model, a folder or Hub id, or config.model_name_or_path")
        if isinstance(model, (str, Path)):
            model = load_transformer(str(model), cfg)
        if cfg.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ConfigError("gradient_checkpointing: the model has no gradient_checkpointing_enable()")
            model.gradient_checkpointing_enable()
        if cfg.use_peft:
            from peft import LoraConfig, get_peft_model

            try:
                model = get_peft_model(model, LoraConfig(**cfg.peft_config))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"peft_config: {str(e).splitlines()[0]}") from None
        elif cfg.peft_config:
            raise ConfigError("peft_config: given but use_peft is False")
        self.tokenizer = tokenizer
        super().__init__(model, cfg, train_dataloader, eval_dataloader, **kwargs)

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self._user_optimizer:
            return super().build_optimizer()
        cfg = self.config
        groups = get_optimizer_grouped_params(self.model, cfg.weight_decay)
        lr, betas = cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2)
        if cfg.optimizer_type == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon)
        if cfg.optimizer_type == "adam":
            return torch.optim.Adam(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon)
        if cfg.optimizer_type == "sgd":
            return torch.optim.SGD(groups, lr=lr)
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)

    def tokenize(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        """``tokenizer(texts, max_length=, padding=, truncation=, return_tensors="pt")`` from the config."""
        if self.tokenizer is None:
            raise ValueError("tokenize: no tokenizer was given to TransformerTrainer")
        cfg = self.config
        padding = False if cfg.padding == "do_not_pad" else cfg.padding
        return self.tokenizer(texts, max_length=cfg.max_length, padding=padding, truncation=cfg.truncation,
                              return_tensors=kwargs.pop("return_tensors", "pt"), **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:  # type: ignore[override]
        """A Hugging Face folder (a PEFT model: its adapter only), with the tokenizer when given."""
        if not self._built:
            self.build()
        return super().save_pretrained(path, tokenizer=self.tokenizer, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> None:
        """``model.push_to_hub`` and ``tokenizer.push_to_hub`` (network; untested here)."""
        model = self.unwrapped_model if self._built else self._model
        model.push_to_hub(repo_id, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.push_to_hub(repo_id, **kwargs)
