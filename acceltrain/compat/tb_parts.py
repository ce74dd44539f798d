"""Transformer Builder's adapters, data module and model card (see :mod:`acceltrain.compat.transformer_builder`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..schedules import build_schedule
from ..utils import count_parameters, format_params

__all__ = ["ModelSignatureInspector", "ComputationalGraphExecutor", "UniversalModelAdapter",
           "AdaptiveTokenizerDataModule", "ModelCardGenerator"]

#: forward() arguments a standard transformer takes; any other required one is an intermediate output.
_STANDARD = {"input_ids", "attention_mask", "labels", "token_type_ids", "position_ids", "inputs_embeds",
             "past_key_values", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
             "head_mask", "cache_position", "kwargs", "args"}


class ModelSignatureInspector:
    """What a model's ``forward`` takes: its parameter names and whether it needs intermediate outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.signature = inspect.signature(model.forward)

    def get_parameters(self) -> list[str]:
        return list(self.signature.parameters)

    def requires_intermediate_outputs(self) -> bool:
        """True when ``forward`` has a required argument that is not a standard transformer input."""
        return any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in _STANDARD
                   for name, p in self.signature.parameters.items())

    def get_signature_info(self) -> dict[str, Any]:
        params = self.signature.parameters
        return {"parameters": list(params), "required": [n for n, p in params.items() if p.default is p.empty
                                                         and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)],
                "requires_intermediate_outputs": self.requires_intermediate_outputs(),
                "model_class": type(self.model).__name__}


class ComputationalGraphExecutor:
    """Run a model from ``input_ids`` (and ``attention_mask``).

    Models whose ``forward`` asks for other layers' outputs (``mhsa_0_output``, ...) are
    refused: which layer feeds which argument is known only to the generator that wrote them.
    """

    def __init__(self, model: torch.nn.Module, inspector: ModelSignatureInspector | None = None) -> None:
        self.model, self.inspector = model, inspector or ModelSignatureInspector(model)
        if self.inspector.requires_intermediate_outputs():
            missing = [n for n in self.inspector.get_signature_info()["required"] if n not in _STANDARD]
            raise ValueError(f"ComputationalGraphExecutor: forward() needs intermediate outputs {missing}; "
                             "acceltrain cannot tell which layer produces them: give the model a forward(input_ids, "
                             "attention_mask) that wires its layers itself")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        params = self.inspector.get_parameters()
        out = self.model(input_ids, attention_mask=attention_mask) if "attention_mask" in params else self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out

    __call__ = forward

    def get_layer_map(self) -> dict[str, torch.nn.Module]:
        return dict(self.model.named_modules())


class UniversalModelAdapter(torch.nn.Module):
    """A causal LM with a uniform ``forward(input_ids, attention_mask, labels) -> {"loss", "logits"}``.

    The seed wraps it for PyTorch Lightning; here acceltrain's trainers train it directly
    (``train_model`` returns one: ``adapter.model`` is the trained model). ``training_step`` /
    ``validation_step`` / ``configure_optimizers`` keep the seed's names for hand-written loops;
    for ``pl.Trainer(...).fit(adapter, ...)`` import it from :mod:`acceltrain.compat.tb_lightning`.
    """

    def __init__(self, model: torch.nn.Module, learning_rate: float = 1e-4, vocab_size: int = 0,
                 warmup_steps: int = 0, weight_decay: float = 0.01, total_steps: int = 10_000) -> None:
        super().__init__()
        self.model = model
        self.learning_rate, self.vocab_size, self.warmup_steps = learning_rate, vocab_size, warmup_steps
        self.weight_decay, self.total_steps = weight_decay, total_steps

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, Any]:
        if hasattr(self.model, "config"):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return {"loss": out.loss, "logits": out.logits}
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # (B, T, V) predicts the next token
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_length: int = 100, temperature: float = 1.0,
                 **kwargs: Any) -> torch.Tensor:
        """``model.generate`` (sampling at ``temperature``; 0 means greedy), ``max_length`` tokens in all."""
        if not hasattr(self.model, "generate"):
            raise ValueError("generate: the model has no generate(); wrap a transformers causal LM")
        sample = temperature > 0
        args = {"do_sample": sample, **({"temperature": temperature} if sample else {}), **kwargs}
        return self.model.generate(input_ids, max_length=max_length, **args)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch)["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            return self(**batch)["loss"]

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW (no decay on 1-D parameters) and linear warmup then cosine over ``total_steps``."""
        opt = self._adamw()
        return opt, build_schedule(opt, "cosine", self.total_steps, warmup_steps=self.warmup_steps)

    def _adamw(self) -> torch.optim.AdamW:
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.learning_rate)


class AdaptiveTokenizerDataModule:
    """Text -> packed token windows -> ``train_dataloader()`` / ``val_dataloader()`` (the held-out end).

    Args:
        dataset: A ``datasets.Dataset`` with a ``text`` column, a list of texts, or a path.
        tokenizer: A Hugging Face tokenizer with an EOS token (or one of this package's wrappers).
        batch_size: Windows per batch.
        max_length: Tokens per window.
        val_split: Fraction held out (0: no validation loader).
        num_workers: DataLoader workers.
        cache_dir: Where the packed tokens are cached (default ``~/.cache/acceltrain/datamodule``).
    """

    def __init__(self, dataset: Any, tokenizer: Any, batch_size: int = 16, max_length: int = 512,
                 val_split: float = 0.1, num_workers: int = 0, cache_dir: str | Path | None = None) -> None:
        from ..data.packing import PackedTokens, pack_texts, train_val_split
        from ..one_call_data import load_dataset_texts

        self.tokenizer = getattr(tokenizer, "hf", tokenizer)
        self.batch_size, self.max_length, self.val_split, self.num_workers = batch_size, max_length, val_split, num_workers
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "acceltrain" / "datamodule"
        corpus = pack_texts(load_dataset_texts(dataset), self.tokenizer, cache)
        if val_split > 0:
            self.train_set, self.val_set = train_val_split(corpus, max_length, val_fraction=val_split)
        else:
            self.train_set, self.val_set = PackedTokens(corpus, max_length), None

    def setup(self, stage: str | None = None) -> None:
        """Nothing left to do (the data is packed at construction); kept for the seed's call order."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                                           num_workers=self.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader | None:
        if self.val_set is None:
            return None
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class ModelCardGenerator:
    """A Hugging Face style model card (``README.md`` front matter + sections) from a training run."""

    SECTIONS = ("Model details", "Training data", "Performance", "Usage", "Limitations", "Citation")

    def generate(self, model_name: str, model: torch.nn.Module, training_results: dict[str, Any] | None = None,
                 dataset_name: str | None = None, vocab_size: int | None = None, description: str = "",
                 output_path: str | Path | None = None) -> str:
        """The card's markdown; written to ``output_path`` when given."""
        inner = getattr(model, "model", model)
        results = training_results or {}
        config = getattr(inner, "config", None)
        vocab = vocab_size or getattr(config, "vocab_size", None)
        metrics = results.get("final_metrics") or {}
        lines = ["---", "library_name: transformers" if config is not None else "library_name: pytorch",
                 "tags:", "- acceltrain", *([f"datasets:\n- {dataset_name}"] if dataset_name else []), "---", "",
                 f"# {model_name}", "", description or f"{type(inner).__name__} trained with acceltrain.", "",
                 "## Model details", "", f"- Architecture: {type(inner).__name__}",
                 f"- Parameters: {format_params(count_parameters(inner))} ({count_parameters(inner):,})",
                 f"- Vocabulary size: {vocab if vocab is not None else 'unknown'}", "",
                 "## Training data", "", f"- Dataset: {dataset_name or 'not recorded'}", "",
                 "## Performance", ""]
        lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()] or [
            "- no evaluation metrics recorded"]
        if results.get("best_model_path"):
            lines.append(f"- Best checkpoint: `{results['best_model_path']}`")
        lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{model_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")', "```", "",
                  "## Limitations", "", "Trained on the data above only; outputs can be wrong, biased or unsafe. "
                  "Evaluate on your own task before use.", "",
                  "## Citation", "", "```bibtex", f"@misc{{{model_name.replace('-', '_')},",
                  f"  title = {{{model_name}}},", "  note = {Trained with acceltrain}", "}", "```", ""]
        card = "\n".join(lines)
        if output_path is not None:
            Path(output_path).write_text(card)
        return card


