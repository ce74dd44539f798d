"""Coming from LLM Trainer: its documented classes and functions over acceltrain.

Change ``from llm_trainer[.config|.models|.tokenizer|.training|.data|.utils...] import X`` to
``from acceltrain.compat.llm_trainer import X``. The model is a transformers causal LM built by
:mod:`acceltrain.models` (GPT-2-shaped by default, see :mod:`.llm_trainer_config`), the
tokenizer acceltrain's byte-level BPE (:func:`acceltrain.data.train_bpe_tokenizer`), packing
:func:`acceltrain.data.pack_texts`, training a :class:`~acceltrain.BaseTrainer`, generation
:mod:`acceltrain.generation` (transformers' ``generate``), metrics :mod:`acceltrain.metrics`.

Example:
    >>> from acceltrain.compat.llm_trainer import ModelConfig, TransformerLM
    >>> model = TransformerLM(ModelConfig(vocab_size=300, d_model=64, n_heads=4, n_layers=2, d_ff=256))
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import UserError
from ..generation import GenerationSettings, generate_texts, prompt_loop
from ..metrics import bleu_score, diversity_metrics, generation_quality, perplexity_of, repetition_metrics
from ..utils import seed_everything
from .llm_trainer_config import (
    DataConfig,
    GenerationError,
    ModelConfig,
    ModelConfigurationError,
    TokenizerNotTrainedException,
    TrainingConfig,
    TrainingError,
)

__all__ = [
    "BPETokenizer", "DataConfig", "GenerationConfig", "GenerationError", "InferenceEngine", "LanguageModelingDataset",
    "ModelConfig", "ModelConfigurationError", "TextGenerator", "TokenizerNotTrainedException", "Trainer",
    "TrainingConfig", "TrainingError", "TransformerLM", "apply_repetition_penalty", "compute_bleu_score",
    "compute_diversity_metrics", "compute_perplexity", "compute_repetition_metrics", "create_causal_mask",
    "create_dataloader", "create_optimizer", "create_scheduler", "evaluate_generation_quality", "get_device",
    "get_memory_usage", "load_checkpoint", "sample_top_k", "sample_top_p", "save_checkpoint", "set_seed",
    "setup_logging",
]

_CONFIG_FILE = "llm_trainer_config.json"


# ---------------------------------------------------------------------- model
class TransformerLM(nn.Module):
    """A decoder-only LM from a :class:`ModelConfig`: ``self.model`` is a transformers model, so
    ``save_pretrained`` writes a folder ``AutoModelForCausalLM`` loads without acceltrain."""

    def __init__(self, config: ModelConfig, *, hf_model: Any = None, **token_ids: Any):
        super().__init__()
        from ..models import build_model

        self.model_config = config
        self.model = hf_model if hf_model is not None else build_model(config.to_arch_config(), **token_ids)

    @property
    def config(self) -> Any:  # transformers' generation utilities look here
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        """transformers' output: ``.logits`` ``(B, T, vocab)`` and, with ``labels``, ``.loss``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def generate(self, input_ids: torch.Tensor, max_length: int = 100, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` (``temperature``, ``top_k``, ``top_p``, ``do_sample``,
        ``num_beams``, ``repetition_penalty``); ``max_length`` counts the prompt."""
        kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        kwargs.setdefault("pad_token_id", self.model.config.pad_token_id if self.model.config.pad_token_id
                          is not None else self.model.config.eos_token_id)
        return self.model.generate(input_ids, max_length=max_length, **kwargs)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_model_size_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.parameters()) / 2**20

    def save_pretrained(self, save_directory: str | Path) -> None:
        folder = Path(save_directory)
        self.model.save_pretrained(folder)
        self.model_config.save(folder / _CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, load_directory: str | Path) -> TransformerLM:
        from transformers import AutoModelForCausalLM

        folder = Path(load_directory)
        if not (folder / "config.json").is_file():
            raise ModelConfigurationError(f"{folder}: not a saved model (no config.json)")
        config = ModelConfig.load(folder / _CONFIG_FILE) if (folder / _CONFIG_FILE).is_file() else None
        hf = AutoModelForCausalLM.from_pretrained(folder)
        if config is None:  # a plain transformers folder (e.g. recipes/pretrain.py's final/)
            c = hf.config
            config = ModelConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                                 n_layers=c.num_hidden_layers, d_ff=getattr(c, "n_inner", None) or
                                 getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                                 max_seq_len=getattr(c, "n_positions", None) or c.max_position_embeddings,
                                 dropout=0.0, attention_dropout=0.0,
                                 arch="gpt2" if c.model_type == "gpt2" else "llama",
                                 activation="gelu_new" if c.model_type == "gpt2" else "swiglu")
        return cls(config, hf_model=hf)


# ---------------------------------------------------------------------- tokenizer
class BPETokenizer:
    """Byte-level BPE (acceltrain's, trained with the ``tokenizers`` library and cached);
    ``self.tokenizer`` is the transformers fast tokenizer."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def _need(self) -> Any:
        if self.tokenizer is None:
            raise TokenizerNotTrainedException("BPETokenizer: call train(), train_from_dataset() or from_pretrained() "
                                               "first")
        return self.tokenizer

    def train(self, texts: Sequence[str], vocab_size: int = 50000, **kwargs: Any) -> BPETokenizer:
        from ..data import texts_fingerprint, train_bpe_tokenizer
        from ..recipe_kit import cache_root

        texts = list(texts)
        if not any(t.strip() for t in texts):
            raise TokenizerNotTrainedException("BPETokenizer.train: no text to train on")
        fingerprint = texts_fingerprint(texts)
        folder = cache_root(kwargs.pop("cache_dir", None)) / "tokenizers" / f"{fingerprint[:16]}-{vocab_size}"
        self.tokenizer = train_bpe_tokenizer(texts, vocab_size, folder, fingerprint=fingerprint, **kwargs)
        return self

    def train_from_dataset(self, dataset_name: str, vocab_size: int = 50000, **kwargs: Any) -> BPETokenizer:
        """Train on a dataset :func:`acceltrain.data.load_texts` reads (a local file or folder,
        or a Hub name); ``dataset_config``, ``text_column``, ``max_bytes`` pass through."""
        from ..data import load_texts

        texts = load_texts(dataset_name, text_column=kwargs.pop("text_column", "text"),
                           config_name=kwargs.pop("dataset_config", None), max_bytes=kwargs.pop("max_bytes", None))
        return self.train(texts, vocab_size, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._need().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self._need().decode(token_ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._need()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._need())

    def save_pretrained(self, save_directory: str | Path) -> None:
        self._need().save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, load_directory: str | Path) -> BPETokenizer:
        from ..data import load_tokenizer

        return cls(load_tokenizer(str(load_directory)))

    @property
    def vocab_size(self) -> int:
        return len(self._need())

    @property
    def vocab(self) -> dict[str, int]:
        return self._need().get_vocab()

    @property
    def special_tokens(self) -> list[str]:
        return list(self._need().all_special_tokens)

    @property
    def pad_token_id(self) -> int | None:
        return self._need().pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._need().eos_token_id

    def get_vocab_stats(self) -> dict[str, Any]:
        vocab = self.vocab
        lengths = [len(t) for t in vocab]
        return {"vocab_size": len(vocab), "special_tokens": self.special_tokens,
                "mean_token_length": sum(lengths) / len(lengths), "max_token_length": max(lengths)}


def _hf_tokenizer(tokenizer: Any) -> Any:
    return tokenizer._need() if isinstance(tokenizer, BPETokenizer) else tokenizer


def _hf_model(model: Any) -> Any:
    return model.model if isinstance(model, TransformerLM) else model


# ---------------------------------------------------------------------- data
class LanguageModelingDataset(torch.utils.data.Dataset):
    """Token windows of ``max_length`` for a causal LM: packed (documents joined with EOS, cut
    into windows; :func:`acceltrain.data.pack_texts`) or one truncated document per item."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int = 1024, pack_sequences: bool = True):
        from ..data import PackedTokens, pack_texts, texts_fingerprint
        from ..recipe_kit import cache_root

        if max_length < 2:
            raise UserError(f"max_length must be >= 2 (a window predicts max_length - 1 tokens), got {max_length}")
        tok = _hf_tokenizer(tokenizer)
        texts = [t for t in texts if t]
        self.max_length, self.packed = max_length, pack_sequences
        if pack_sequences:
            corpus = pack_texts(texts, tok, cache_root() / "packed", fingerprint=texts_fingerprint(texts))
            self.windows = PackedTokens(corpus, max_length)
            self.num_tokens = corpus.num_tokens
            if len(self.windows) == 0:
                raise UserError(f"LanguageModelingDataset: {corpus.num_tokens} tokens, fewer than one window of "
                                f"max_length {max_length}")
        else:
            self.items = [torch.tensor(tok(t).input_ids[:max_length]) for t in texts]
            self.items = [x for x in self.items if len(x) >= 2]
            self.num_tokens = sum(len(x) for x in self.items)
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return len(self.windows) if self.packed else len(self.items)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.packed:
            return self.windows[idx]
        x = self.items[idx]
        return {"input_ids": x, "labels": x}

    def get_stats(self) -> dict[str, Any]:
        return {"num_sequences": len(self), "num_tokens": self.num_tokens, "max_length": self.max_length,
                "packed": self.packed}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest item (labels -100 and attention 0 on padding)."""
        width = max(len(i["input_ids"]) for i in items)
        pad = getattr(self, "pad_id", 0) or 0
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def create_dataloader(dataset: Any, batch_size: int = 32, shuffle: bool = True, num_workers: int = 0,
                      pin_memory: bool = False, drop_last: bool = False) -> torch.utils.data.DataLoader:
    collate = dataset.collate if isinstance(dataset, LanguageModelingDataset) else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate)


# ---------------------------------------------------------------------- optimisation
def create_optimizer(model: nn.Module, optimizer_type: str = "adamw", learning_rate: float = 1e-4,
                     weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``adamw`` (decay on matrices only, as acceltrain's recipes), ``adam`` or ``sgd`` (momentum)."""
    from ..recipe_kit import adamw_with_decay_groups

    if optimizer_type == "adamw":
        return adamw_with_decay_groups(model, lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    if optimizer_type == "adam":
        return torch.optim.Adam(model.parameters(), lr=learning_rate, betas=tuple(betas), eps=eps,
                                weight_decay=weight_decay)
    if optimizer_type == "sgd":
        return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    raise UserError(f"optimizer_type {optimizer_type!r}: expected adamw, adam or sgd")


def create_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str = "cosine", num_training_steps: int = 1000,
                     warmup_steps: int = 0, min_lr_ratio: float = 0.0, **kwargs: Any) -> Any:
    """:func:`acceltrain.build_schedule`: ``cosine``, ``linear``, ``constant``, ``polynomial`` (and more)."""
    from ..schedules import build_schedule

    return build_schedule(optimizer, scheduler_type, num_training_steps, warmup_steps=warmup_steps,
                          min_lr_ratio=min_lr_ratio, **kwargs)


# ---------------------------------------------------------------------- trainer
class Trainer:
    """LLM Trainer's ``Trainer``: a thin front of a :class:`~acceltrain.BaseTrainer` run
    (:class:`_LMTrainer`: AdamW + the configured schedule, evaluation every ``eval_steps``,
    checkpoints every ``save_steps`` in ``checkpoint_dir`` with exact resume)."""

    def __init__(self, model: TransformerLM, tokenizer: BPETokenizer, config: TrainingConfig,
                 train_dataset: Any = None, eval_dataset: Any = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.engine: Any = None
        self.history: list[dict[str, Any]] = []

    def _engine(self) -> Any:
        from .llm_trainer_engine import LMTrainer

        if self.train_dataset is None:
            raise TrainingError("Trainer: no train_dataset (give one, or call train_from_config)")
        if self.engine is None:
            self.engine = LMTrainer(self)
        return self.engine

    def train(self) -> None:
        engine = self._engine()
        engine.train()
        self.history = engine.losses

    def train_from_config(self, model_config: ModelConfig, data_config: DataConfig) -> None:
        """Read ``data_config``'s text (``train_file`` or ``dataset_name``), pack it into
        ``max_length`` windows and train; ``validation_file`` becomes the evaluation set."""
        from ..data import load_texts

        source = data_config.train_file or data_config.dataset_name
        texts = load_texts(source, text_column=data_config.text_column, config_name=data_config.dataset_config)
        self.train_dataset = LanguageModelingDataset(texts, self.tokenizer, data_config.max_length,
                                                     data_config.pack_sequences)
        if data_config.validation_file:
            val = load_texts(data_config.validation_file, text_column=data_config.text_column)
            self.eval_dataset = LanguageModelingDataset(val, self.tokenizer, data_config.max_length,
                                                        data_config.pack_sequences)
        self.train()

    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity on ``eval_dataset``."""
        if self.eval_dataset is None:
            raise TrainingError("Trainer.evaluate: no eval_dataset")
        loader = create_dataloader(self.eval_dataset, batch_size=self.config.batch_size, shuffle=False)
        return perplexity_of(_hf_model(self.model), loader)

    def generate_text(self, prompt: str, max_length: int = 100, **kwargs: Any) -> str:
        return TextGenerator(self.model, self.tokenizer).generate(prompt, GenerationConfig(max_length=max_length,
                                                                                            **kwargs))

    def save_model(self, save_path: str | Path) -> None:
        """A transformers folder: weights, config and tokenizer (loads without acceltrain)."""
        model = self.engine.unwrapped_model if self.engine is not None and self.engine._built else self.model
        model.save_pretrained(save_path)
        self.tokenizer.save_pretrained(save_path)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, tokenizer_path: str | Path | None = None,
                        config: TrainingConfig | None = None) -> Trainer:
        return cls(TransformerLM.from_pretrained(model_path), BPETokenizer.from_pretrained(tokenizer_path or model_path),
                   config or TrainingConfig())


# ---------------------------------------------------------------------- generation
@dataclass
class GenerationConfig:
    """Decoding settings (LLM Trainer's names): ``max_length`` counts the prompt too."""

    max_length: int = 100
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    do_sample: bool = True
    num_beams: int = 1
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    seed: int | None = None

    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens,
                                  max_length=None if self.max_new_tokens else self.max_length,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  repetition_penalty=self.repetition_penalty, num_beams=self.num_beams,
                                  do_sample=self.do_sample, seed=self.seed)


class TextGenerator:
    """Generate text from a model and tokenizer (transformers' ``generate``)."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str | None = None):
        self.model = _hf_model(model)
        if device is not None:
            self.model = self.model.to(device)
        self.tokenizer = _hf_tokenizer(tokenizer)

    def _run(self, prompts: Sequence[str], config: GenerationConfig | None) -> list[str]:
        try:
            return generate_texts(self.model, self.tokenizer, prompts, (config or GenerationConfig()).settings())
        except UserError as e:
            raise GenerationError(str(e)) from None

    def generate(self, prompt: str, config: GenerationConfig | None = None) -> str:
        return self._run([prompt], config)[0]

    def batch_generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        return self._run(prompts, config)

    def interactive_generate(self, config: GenerationConfig | None = None, **io: Any) -> int:
        """A prompt loop until EOF, ``quit`` or ``exit``; returns how many prompts it answered."""
        return prompt_loop(lambda p: self.generate(p, config), **io)


class InferenceEngine:
    """Inference with a KV cache, optional compilation (GPU) and int8 dynamic quantization (CPU)."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str | None = None):
        self.generator = TextGenerator(model, tokenizer, device)
        self.use_cache = True

    def optimize(self, enable_kv_cache: bool = True, compile_model: bool = False, quantize: bool = False) -> None:
        self.use_cache = enable_kv_cache
        model = self.generator.model
        if quantize:
            if next(model.parameters()).device.type != "cpu":
                raise GenerationError("quantize=True: int8 dynamic quantization runs on the CPU only")
            self.generator.model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        if compile_model:
            if next(model.parameters()).device.type == "cpu":
                # Generation recompiles per sequence length; on the CPU that costs more than it saves.
                logging.getLogger("acceltrain").warning("compile_model=True skipped on the CPU")
            else:
                self.generator.model.forward = torch.compile(self.generator.model.forward, dynamic=True)

    def _settings(self, kwargs: dict[str, Any]) -> GenerationConfig:
        return GenerationConfig(**{"do_sample": False, **kwargs})

    def infer(self, prompt: str, **kwargs: Any) -> str:
        """Greedy unless ``do_sample=True``; keyword arguments are :class:`GenerationConfig`'s."""
        return self.batch_infer([prompt], **kwargs)[0]

    def batch_infer(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        g = self.generator
        try:
            return generate_texts(g.model, g.tokenizer, prompts, self._settings(kwargs).settings(),
                                  use_cache=self.use_cache)
        except UserError as e:
            raise GenerationError(str(e)) from None

    def benchmark(self, prompts: Sequence[str], num_runs: int = 10, **kwargs: Any) -> dict[str, float]:
        """Mean seconds per run over ``prompts`` and generated tokens per second."""
        g = self.generator
        settings = self._settings({"max_length": 50, **kwargs}).settings()
        start, tokens = time.perf_counter(), 0
        for _ in range(num_runs):
            for text in generate_texts(g.model, g.tokenizer, prompts, settings, use_cache=self.use_cache,
                                       new_text_only=True):
                tokens += len(g.tokenizer(text).input_ids)
        seconds = time.perf_counter() - start
        return {"runs": num_runs, "mean_latency_s": seconds / max(1, num_runs * len(prompts)),
                "tokens_per_s": tokens / seconds if seconds else math.inf}


# ---------------------------------------------------------------------- sampling helpers
def sample_top_k(logits: torch.Tensor, k: int = 50) -> torch.Tensor:
    """``logits`` with everything but the ``k`` largest per row set to -inf (transformers' warper)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    return TopKLogitsWarper(top_k=k)(None, logits.clone())


def sample_top_p(logits: torch.Tensor, p: float = 0.9) -> torch.Tensor:
    """``logits`` outside the smallest set whose probability reaches ``p`` set to -inf."""
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(top_p=p)(None, logits.clone())


def apply_repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float = 1.1) -> torch.Tensor:
    """CTRL's penalty on the tokens of ``input_ids``: positive logits / penalty, negative x penalty."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    return RepetitionPenaltyLogitsProcessor(penalty=penalty)(ids, logits.clone())


def create_causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(seq_len, seq_len)`` bool: True where position i may attend to j (j <= i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


# ---------------------------------------------------------------------- metrics (acceltrain.metrics)
def compute_perplexity(model: Any, dataloader: Any, device: torch.device | str | None = None,
                       max_batches: int | None = None) -> float:
    return perplexity_of(_hf_model(model), dataloader, device, max_batches)["perplexity"]


def compute_bleu_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    return bleu_score(predictions, references)


def compute_diversity_metrics(texts: Sequence[str]) -> dict[str, float]:
    return diversity_metrics(texts)


def compute_repetition_metrics(texts: Sequence[str]) -> dict[str, float]:
    return repetition_metrics(texts)


def evaluate_generation_quality(generated_texts: Sequence[str],
                                reference_texts: Sequence[str] | None = None) -> dict[str, float]:
    return generation_quality(generated_texts, reference_texts)


# ---------------------------------------------------------------------- training utils
def set_seed(seed: int) -> None:
    seed_everything(seed)


def get_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_logging(level: str = "info", log_file: str | Path | None = None) -> None:
    from .mtf import setup_logging as _setup

    _setup(level, log_file)


def get_memory_usage() -> dict[str, float]:
    """Resident memory of this process (MiB) and, with a GPU, allocated CUDA memory."""
    import resource

    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            out["rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    if torch.cuda.is_available():
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
    return out


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path, *, step: int = 0,
                    scheduler: Any = None) -> Path:
    """A folder with ``model.safetensors`` and ``training_state.pt`` (optimizer, scheduler, step),
    both loadable without unpickling code. For exact resume of a whole run use ``Trainer``."""
    from safetensors.torch import save_model

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None}, folder / "training_state.pt")
    return folder


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"step": ...}``."""
    from safetensors.torch import load_model

    folder = Path(path)
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: not a checkpoint (no model.safetensors)")
    load_model(model, str(folder / "model.safetensors"))
    state = torch.load(folder / "training_state.pt", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {"step": state["step"]}
