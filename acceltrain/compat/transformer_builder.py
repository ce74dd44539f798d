"""Transformer Builder Colab's API on acceltrain: ``from acceltrain.compat.transformer_builder import ...``.

Its ``utils.adapters``, ``utils.tokenization``, ``utils.training`` and ``utils.ui`` names in one
module, each over acceltrain's own parts (nothing is implemented twice):

- training: ``train_model`` / ``TrainingCoordinator`` -> :func:`acceltrain.one_call.train_model`
  (the text form: :func:`acceltrain.one_call_data.train_on_text`): the loop is acceltrain's, and
  ``results["trainer"]`` is an :class:`acceltrain.Trainer`. For ``pl.Trainer(...).fit(adapter,
  datamodule)`` the same adapter and data module are Lightning classes in :mod:`.tb_lightning`.
- test tiers 1-3: :mod:`.tb_checks`, :mod:`.tb_tier3`.
- data: ``DatasetLoader`` (:mod:`acceltrain.data.dataset_loader`), ``AdaptiveTokenizerDataModule``
  (packing + :func:`acceltrain.data.packing.train_val_split`).
- tokenizers: ``AdaptiveTokenizer`` / ``FastBPETrainer`` / ``CharacterLevelTokenizer`` /
  ``TokenizerValidator`` -> :mod:`acceltrain.data.tokenizer_check`, ``train_bpe_tokenizer``,
  :mod:`acceltrain.data.char_tokenizer`.
- checkpoints: ``CheckpointManager`` (:mod:`acceltrain.checkpoint_manager`).
- export: ``ONNXExporter`` / ``TorchScriptExporter`` (:mod:`acceltrain.export_formats`),
  ``ModelCardGenerator`` (a README.md model card).
- ui: ``ConfigPresets`` / ``PRESETS`` (:mod:`acceltrain.presets`), ``SetupWizard``.

Where acceltrain's guarantees differ: ``precision="16"`` without a GPU trains in fp32 and
says so (acceltrain never runs fp16 silently as fp32); ``ONNXExporter(opset_version=14)``
writes opset 18 (the dynamo exporter's minimum), logged.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_manager import CheckpointManager as _CheckpointManager
from ..checkpoint_names import CHECKPOINTS_SUBDIR
from ..data.char_tokenizer import CharacterLevelTokenizer
from ..data.dataset_loader import DatasetLoader
from ..data.tokenizer_check import detect_strategy, tokenizer_for, validate_tokenizer
from ..export_formats import export_onnx, export_torchscript
from ..one_call import train_model as _train_model
from ..presets import PRESETS, ConfigPresets, TrainingPreset
from .tb_checks import run_all_tests, run_all_tier1_tests, run_all_tier2_tests, run_all_tier3_tests
from .tb_parts import (
    AdaptiveTokenizerDataModule,
    ComputationalGraphExecutor,
    ModelCardGenerator,
    ModelSignatureInspector,
    UniversalModelAdapter,
)

__all__ = [
    "ModelSignatureInspector", "ComputationalGraphExecutor", "UniversalModelAdapter", "AdaptiveTokenizer",
    "FastBPETrainer", "BPETrainerConfig", "CharacterLevelTokenizer", "TokenizerValidator",
    "AdaptiveTokenizerDataModule", "train_model", "TrainingCoordinator", "DatasetLoader", "CheckpointManager",
    "ONNXExporter", "TorchScriptExporter", "ModelCardGenerator", "SetupWizard", "ConfigPresets", "PRESETS",
    "run_all_tier1_tests", "run_all_tier2_tests", "run_all_tier3_tests", "run_all_tests",
]

logger = logging.getLogger("acceltrain")


class CheckpointManager(_CheckpointManager):
    """:class:`acceltrain.checkpoint_manager.CheckpointManager`; ``load_model_from_checkpoint(UniversalModelAdapter)``
    also works as in the seed: the model is built from the run's Hugging Face config
    (``<run>/final/config.json``, which ``train_model`` writes) and wrapped in the adapter."""

    def load_model_from_checkpoint(self, model_class: Any, checkpoint_path: str | Path | None = None) -> torch.nn.Module:
        if model_class is UniversalModelAdapter:
            config = self.checkpoint_dir.parent / "final" / "config.json"
            if not config.is_file():
                raise FileNotFoundError(f"{config}: no Hugging Face config to build the model from; pass a model "
                                        "instance (load_model_from_checkpoint(UniversalModelAdapter(model=...)))")
            from transformers import AutoConfig, AutoModelForCausalLM

            model_class = UniversalModelAdapter(model=AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                config.parent)))
        return super().load_model_from_checkpoint(model_class, checkpoint_path)


# ---------------------------------------------------------------------- tokenization
class _Encoding:
    """A Hugging Face tokenizer whose ``encode`` returns a dict (``encoded["input_ids"]``), as the seed's do."""

    def __init__(self, tokenizer: Any, strategy: str) -> None:
        self.hf, self.strategy = getattr(tokenizer, "hf", tokenizer), strategy

    def encode(self, text: str, max_length: int | None = None, padding: bool | str = False,
               truncation: bool | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("add_special_tokens", False)
        return self.hf(text, max_length=max_length, padding=padding,
                       truncation=max_length is not None if truncation is None else truncation, **kwargs)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)


def _texts(dataset: Any) -> list[str]:
    from ..one_call_data import load_dataset_texts

    return load_dataset_texts(dataset)


class AdaptiveTokenizer:
    """The four tiers: a pretrained tokenizer of that size, else BPE trained on the data, else characters
    (:func:`acceltrain.data.tokenizer_check.tokenizer_for` with ``"auto"``; a user tokenizer is tier 4)."""

    @staticmethod
    def detect_strategy(vocab_size: int, dataset_size: int) -> str:
        return detect_strategy(vocab_size, dataset_size)

    @classmethod
    def load_or_create(cls, vocab_size: int, dataset: Any, cache_dir: str | Path = "./tokenizers",
                       strategy: str = "auto") -> _Encoding:
        texts = _texts(dataset)
        tok = tokenizer_for(strategy, vocab_size=vocab_size, texts=texts, cache_dir=cache_dir)
        return _Encoding(tok, strategy)


@dataclasses.dataclass
class BPETrainerConfig:
    """``vocab_size``, ``min_frequency`` and ``special_tokens`` of a BPE training run."""

    vocab_size: int = 25_000
    min_frequency: int = 2
    special_tokens: Sequence[str] = ("<pad>", "<unk>", "<s>", "</s>")


class FastBPETrainer:
    """Byte-level BPE through :func:`acceltrain.data.tokenizer.train_bpe_tokenizer`; ``</s>`` is EOS,
    ``<pad>`` padding, the others extra special tokens. ``train_on_dataset`` returns the
    ``tokenizers.Tokenizer`` (``.save("tok.json")``); ``.hf`` holds the Hugging Face tokenizer."""

    def __init__(self, config: BPETrainerConfig | None = None) -> None:
        self.config = config or BPETrainerConfig()
        self.hf: Any = None

    def train_on_dataset(self, texts: Sequence[str], show_progress: bool = False, save_dir: str | Path | None = None) -> Any:
        from ..data.tokenizer import train_bpe_tokenizer

        special = list(self.config.special_tokens)
        eos = "</s>" if "</s>" in special else "<|endoftext|>"
        pad = "<pad>" if "<pad>" in special else "<|pad|>"
        extra = [t for t in special if t not in (eos, pad)]
        folder = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="acceltrain_bpe_"))
        self.hf = train_bpe_tokenizer(list(texts), self.config.vocab_size, folder, eos_token=eos, pad_token=pad,
                                      extra_special_tokens=extra, min_frequency=self.config.min_frequency)
        return self.hf.backend_tokenizer


class TokenizerValidator:
    """:func:`acceltrain.data.tokenizer_check.validate_tokenizer` under the seed's name."""

    @staticmethod
    def validate(tokenizer: Any, expected_vocab_size: int | None = None, strict: bool = True) -> bool:
        return validate_tokenizer(getattr(tokenizer, "hf", tokenizer), expected_vocab_size, strict=strict)


# ---------------------------------------------------------------------- training
def _adapt(results: dict[str, Any], learning_rate: float, vocab_size: int | None) -> dict[str, Any]:
    results["model"] = UniversalModelAdapter(model=results["model"], learning_rate=learning_rate,
                                             vocab_size=vocab_size or 0)
    return results


def train_model(model: torch.nn.Module, dataset: Any = None, vocab_size: int | None = None, max_epochs: float = 3,
                batch_size: int = 16, learning_rate: float = 1e-4, **kwargs: Any) -> dict[str, Any]:
    """The seed's one-function training (see :func:`acceltrain.one_call_data.train_on_text` for ``**kwargs``).

    Returns ``{"best_model_path", "final_metrics", "trainer", "model" (a UniversalModelAdapter:
    ``.model`` is the trained model), "tokenizer"}``.
    """
    if isinstance(model, UniversalModelAdapter):
        model = model.model
    if dataset is None and "dataset_path" not in kwargs:
        raise ValueError("dataset: give a file, folder, Hub dataset name or Dataset (or dataset_path=)")
    args = {"dataset": dataset} if dataset is not None else {}
    results = _train_model(model, **args, vocab_size=vocab_size, max_epochs=max_epochs, batch_size=batch_size,
                           learning_rate=learning_rate, **kwargs)
    return _adapt(results, learning_rate, vocab_size)


_PRECISION = {"32": None, "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16"}


class TrainingCoordinator:
    """The seed's advanced API: ``TrainingCoordinator(output_dir, use_gpu, precision, gradient_clip_val).train(...)``.

    ``precision``: ``'32'``, ``'16'`` (fp16: GPU only; without a GPU the run is fp32 and a warning
    says so) or ``'bf16'``.
    """

    def __init__(self, output_dir: str | Path = "./training_output", use_gpu: bool = True, precision: str = "32",
                 gradient_clip_val: float | None = 1.0) -> None:
        if str(precision) not in _PRECISION:
            raise ValueError(f"precision must be one of {list(_PRECISION)}, got {precision!r}")
        self.output_dir, self.use_gpu, self.gradient_clip_val = Path(output_dir), use_gpu, gradient_clip_val
        mp = _PRECISION[str(precision)]
        if mp == "fp16" and not (use_gpu and torch.cuda.is_available()):
            logger.warning("precision='16': no GPU in use, training in fp32 (fp16 needs a GPU)")
            mp = None
        self.precision = mp

    def train(self, model: torch.nn.Module, dataset: Any = None, dataset_path: str | Path | None = None,
              config_name: str | None = None, vocab_size: int | None = None, batch_size: int = 16,
              max_length: int = 512, learning_rate: float = 1e-4, max_epochs: float = 3, val_split: float = 0.1,
              accumulate_grad_batches: int = 1, early_stopping_patience: int | None = 3, save_top_k: int = 3,
              tokenizer: Any = "auto", datamodule: AdaptiveTokenizerDataModule | None = None,
              resume_from_checkpoint: str | None = None, seed: int | None = 42, **kwargs: Any) -> dict[str, Any]:
        """Train; the results dict of :func:`train_model`."""
        if isinstance(model, UniversalModelAdapter):
            model = model.model
        common = {"learning_rate": learning_rate, "max_epochs": max_epochs, "accumulate_grad_batches":
                  accumulate_grad_batches, "seed": seed, "resume_from_checkpoint": resume_from_checkpoint,
                  "mixed_precision": self.precision, "gradient_clip_val": self.gradient_clip_val or None, **kwargs}
        if datamodule is not None:
            return self._train_datamodule(model, datamodule, early_stopping_patience, save_top_k, vocab_size, common)
        if early_stopping_patience is not None and val_split > 0:
            common["early_stopping_patience"] = early_stopping_patience
        data = {"dataset": dataset} if dataset is not None else {"dataset_path": dataset_path}
        if dataset is None and dataset_path is None:
            raise ValueError("dataset / dataset_path: give one (a file, folder, Hub dataset name or Dataset)")
        results = _train_model(model, **data, config_name=config_name, vocab_size=vocab_size, batch_size=batch_size,
                               max_length=max_length, val_split=val_split,
                               save_top_k=save_top_k if val_split > 0 else None, tokenizer=tokenizer,
                               use_gpu=self.use_gpu, output_dir=str(self.output_dir), **common)
        return _adapt(results, learning_rate, vocab_size)

    def _train_datamodule(self, model: torch.nn.Module, dm: AdaptiveTokenizerDataModule, patience: int | None,
                          save_top_k: int, vocab_size: int | None, common: dict[str, Any]) -> dict[str, Any]:
        from ..one_call import Trainer

        eval_dl = dm.val_dataloader()
        extra = {"early_stopping_patience": patience, "save_top_k": save_top_k} if eval_dl is not None else {}
        trainer = Trainer(model, train_dataloader=dm.train_dataloader(), eval_dataloader=eval_dl,
                          output_dir=str(self.output_dir), device=None if self.use_gpu else "cpu", **extra, **common)
        if trainer.steps_per_epoch:
            trainer.config.save_interval = trainer.steps_per_epoch
        trainer.tokenizer = dm.tokenizer
        trainer.train()
        best = CheckpointManager(self.output_dir / CHECKPOINTS_SUBDIR, monitor="eval/loss").get_best_checkpoint_path()
        final = next((dict(h.last) for h in trainer.hooks if type(h).__name__ == "EvaluationHook" and h.last), {})
        return _adapt({"best_model_path": best, "final_metrics": final, "trainer": trainer,
                       "model": trainer.unwrapped_model, "tokenizer": dm.tokenizer}, common["learning_rate"], vocab_size)

    def quick_train(self, model: torch.nn.Module, dataset: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`train` with its defaults (one epoch unless ``max_epochs`` is given)."""
        kwargs.setdefault("max_epochs", 1)
        return self.train(model=model, dataset=dataset, **kwargs)

    def resume_training(self, checkpoint_path: str | Path, model: torch.nn.Module, dataset: Any,
                        **kwargs: Any) -> dict[str, Any]:
        """:meth:`train` from ``checkpoint_path`` (the same settings as the run that wrote it)."""
        return self.train(model=model, dataset=dataset, resume_from_checkpoint=str(checkpoint_path), **kwargs)


# ---------------------------------------------------------------------- export
def _inner(model: Any) -> torch.nn.Module:
    return model.model if isinstance(model, UniversalModelAdapter) else model


class ONNXExporter:
    """:func:`acceltrain.export_formats.export_onnx` with the seed's constructor options."""

    def __init__(self, opset_version: int = 14, optimize: bool = True, validate: bool = True,
                 benchmark: bool = False) -> None:
        self.opset_version, self.optimize, self.validate, self.benchmark = opset_version, optimize, validate, benchmark

    def export(self, model: Any, output_path: str | Path, vocab_size: int | None = None, max_seq_len: int = 512,
               dynamic_axes: bool = True) -> dict[str, Any]:
        return export_onnx(_inner(model), output_path, vocab_size=vocab_size, max_seq_len=max_seq_len,
                           opset_version=self.opset_version, dynamic_axes=dynamic_axes, optimize=self.optimize,
                           validate=self.validate, benchmark=self.benchmark)


class TorchScriptExporter:
    """:func:`acceltrain.export_formats.export_torchscript` with the seed's constructor options."""

    def __init__(self, validate: bool = True, benchmark: bool = False) -> None:
        self.validate, self.benchmark = validate, benchmark

    def export(self, model: Any, output_path: str | Path, vocab_size: int | None = None, mode: str = "auto") -> dict[str, Any]:
        return export_torchscript(_inner(model), output_path, vocab_size=vocab_size, mode=mode, validate=self.validate,
                                  benchmark=self.benchmark)


# ---------------------------------------------------------------------- ui
@dataclasses.dataclass
class WizardConfig:
    """What :class:`SetupWizard` produces: a preset's settings plus the dataset."""

    preset: TrainingPreset
    dataset_name: str | None = None
    config_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.preset.to_dict()
        if self.dataset_name is not None:
            out["dataset"] = self.dataset_name
        if self.config_name is not None:
            out["config_name"] = self.config_name
        return out


class SetupWizard:
    """The 5-step setup over :class:`acceltrain.presets.ConfigPresets`: interactive (``input()``
    prompts; Enter keeps the preset's value) or :meth:`quick_setup`."""

    _ASKED = ("max_epochs", "batch_size", "learning_rate", "max_length")

    def __init__(self) -> None:
        self.presets = ConfigPresets()

    def quick_setup(self, model: torch.nn.Module | None = None, preset: str = "small",
                    dataset_name: str | None = None, config_name: str | None = None) -> WizardConfig:
        return WizardConfig(self.presets.get(preset), dataset_name, config_name)

    def run(self, model: torch.nn.Module | None = None, interactive: bool = True, preset: str = "small") -> WizardConfig:
        config = self.quick_setup(model, preset)
        if not interactive:
            return config
        dataset = input("Dataset (file, folder or Hub name): ").strip() or None
        changes = {}
        for name in self._ASKED:
            current = getattr(config.preset, name)
            answer = input(f"{name} [{current}]: ").strip()
            if answer:
                changes[name] = type(current)(answer)
        return WizardConfig(dataclasses.replace(config.preset, **changes), dataset)

    @staticmethod
    def print_config(config: WizardConfig) -> None:
        for key, value in config.to_dict().items():
            print(f"  {key:<24} {value}")

    @staticmethod
    def validate_config(config: WizardConfig) -> tuple[bool, list[str]]:
        """``(ok, errors)``: positive epochs, batch size, LR and length, and a dataset."""
        p, errors = config.preset, []
        if not p.max_epochs > 0:
            errors.append(f"max_epochs must be > 0, got {p.max_epochs}")
        if p.batch_size < 1:
            errors.append(f"batch_size must be >= 1, got {p.batch_size}")
        if not p.learning_rate > 0:
            errors.append(f"learning_rate must be > 0, got {p.learning_rate}")
        if p.max_length < 2:
            errors.append(f"max_length must be >= 2, got {p.max_length}")
        if not config.dataset_name:
            errors.append("dataset_name: not set")
        return not errors, errors

