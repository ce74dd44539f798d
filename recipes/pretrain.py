"""Pretrain a Transformer language model from scratch.

    accelerate launch recipes/pretrain.py                       # the Python stdlib, tiny model, CPU-sized
    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_124m.yaml --dataset data/
    python recipes/pretrain.py --help                           # every field, with its default

Reads text (a local file or folder, a Hub dataset, or by default the standard library of the
Python running it), trains a byte-level BPE tokenizer (cached), packs the tokens into a memmap
(cached), trains a Llama- or GPT-2-style model with warmup + cosine AdamW, evaluates loss and
perplexity on a held-out split, and writes a Hugging Face folder to ``output_dir/final``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from acceltrain import (
    ThroughputHook,
    count_parameters,
    format_params,
    seed_everything,
)
from acceltrain.config import ConfigError
from acceltrain.data import STDLIB_SOURCE, DataError, load_tokenizer, train_bpe_tokenizer
from acceltrain.data.mixture import build_mixture
from acceltrain.data.shards import ShardedCorpus, default_workers, ingest
from acceltrain.data.sources import SourceSpec, TextSource, parse_sources
from acceltrain.models import (
    PRESETS,
    ModelConfig,
    build_model,
    compile_blocks,
    device_peak_flops,
    flops_per_token,
    preset,
)
from acceltrain.recipe_kit import RecipeTrainer, TrainingConfig, cache_root, run_recipe

_MIN_BPE_VOCAB = 256 + 2  # a byte-level BPE: every byte value, then EOS and padding


@dataclass
class PretrainConfig(TrainingConfig):
    """Pretrain a Transformer language model from scratch."""

    # TrainingConfig's fields, with this recipe's defaults.
    output_dir: str = field(default="runs/pretrain", metadata={"help": "Run folder: checkpoints, logs, final/"})
    batch_size: int = field(default=16, metadata={"help": "Windows per micro-batch per process"})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (also --learning_rate)"})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not biases/norms)"})
    eval_interval: int = field(default=100, metadata={"help": "Steps between evaluations (and at the end)"})
    save_interval: int = field(default=100, metadata={"help": "Steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "Seed for weights, data order and dropout"})
    # This recipe's own.
    dataset: str | None = field(default=None, metadata={
        "help": "A local .txt/.jsonl/.json/.csv/.parquet file (also .gz/.zst), folder or glob, or a Hub dataset "
                "(streamed); a weighted mixture as 'code/:0.7,prose.jsonl:0.3' (in YAML also a list of "
                "{path, weight, text_column}); unset: the standard library of this Python (offline)"})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "A named validation source (same forms as dataset); unset: the last val_fraction of every source"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (jsonl/csv/parquet/Hub)"})
    max_corpus_bytes: int = field(default=3_000_000, metadata={"help": "Read at most this much text per source (0: all)"})
    tokenize_workers: int | None = field(default=None, metadata={
        "help": "Tokenizer processes; unset: the cores this process may use (len(os.sched_getaffinity(0)))"})
    tokenizer_sample_bytes: int = field(default=100_000_000, metadata={
        "help": "Train the BPE tokenizer on the first this many bytes of text (split over sources by weight)"})
    tokenizer: str | None = field(default=None, metadata={"help": "An existing tokenizer (name or folder); unset: train a BPE"})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the trained BPE tokenizer"})
    cache_dir: str | None = field(default=None, metadata={"help": "Tokenizer/packing cache (default ~/.cache/acceltrain)"})
    model_size: str = field(default="tiny", metadata={"help": f"Preset: one of {', '.join(PRESETS)}"})
    arch: Literal["llama", "gpt2"] = field(default="llama", metadata={"help": "llama (RoPE, RMSNorm, SwiGLU) or gpt2"})
    d_model: int | None = field(default=None, metadata={"help": "Override the preset's width"})
    n_heads: int | None = field(default=None, metadata={"help": "Override the preset's attention heads"})
    n_layers: int | None = field(default=None, metadata={"help": "Override the preset's depth"})
    d_ff: int | None = field(default=None, metadata={"help": "Override the preset's MLP width"})
    n_kv_heads: int | None = field(default=None, metadata={
        "help": "Override the preset's key/value heads (llama; grouped-query attention)"})
    activation: str | None = field(default=None, metadata={
        "help": "MLP activation; unset: swiglu (llama) or gelu_new (gpt2); see acceltrain.models.ACTIVATIONS"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout (gpt2: residual/embedding; llama: attention)"})
    seq_len: int = field(default=128, metadata={"help": "Training window in tokens"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each transformer block (regional compilation)"})
    val_fraction: float = field(default=0.02, metadata={"help": "Share of the token stream held out (its end)"})
    sample_prompt: str = field(default="def ", metadata={"help": "Prompt for the sample printed at the end"})
    sample_tokens: int = field(default=64, metadata={"help": "Tokens to generate for the sample (0: none)"})

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {self.seq_len}")
        self.validate_training()  # the counts, lr and min_lr_ratio, warmup_steps and num_workers
        for name in ("sample_tokens", "max_corpus_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tokenize_workers", "tokenizer_sample_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            parse_sources(self.dataset or STDLIB_SOURCE)
        except DataError as e:
            raise ConfigError(str(e)) from None
        if self.tokenizer is None and self.vocab_size < _MIN_BPE_VOCAB:
            raise ConfigError(f"vocab_size must be >= {_MIN_BPE_VOCAB} (256 byte tokens + EOS and padding), "
                              f"got {self.vocab_size}")
        if self.grad_clip <= 0 or self.weight_decay < 0:
            raise ConfigError(f"grad_clip must be > 0 and weight_decay >= 0, got {self.grad_clip} and {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.model_size not in PRESETS:
            raise ConfigError(f"model_size {self.model_size!r} is not a preset; choose one of {', '.join(PRESETS)}")
        # The architecture is checked now (with a stand-in vocabulary), not after the tokenizer
        # was trained and the data packed.
        self.model_config(self.vocab_size if self.tokenizer is None else _MIN_BPE_VOCAB)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with this config's overrides, for a tokenizer of ``vocab_size`` tokens."""
        overrides = {k: v for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "activation")
                     if (v := getattr(self, k)) is not None}
        try:
            return preset(self.model_size, arch=self.arch, vocab_size=vocab_size,
                          max_seq_len=max(self.seq_len, PRESETS[self.model_size].max_seq_len),
                          dropout=self.dropout if self.arch == "gpt2" else 0.0,
                          attention_dropout=self.dropout if self.arch == "llama" else 0.0,
                          gradient_checkpointing=self.gradient_checkpointing, **overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None


class PretrainTrainer(RecipeTrainer):
    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg, **cfg.trainer_kwargs())
        acc = self.accelerator
        seed_everything(cfg.seed)
        # Tokenizer training and packing happen once, on the main process; the others then
        # find them in the cache.
        with acc.main_process_first():
            self.tokenizer, self.train_set, self.val_set, self.corpus = self._prepare_data()
        self.model_cfg = cfg.model_config(len(self.tokenizer))

    def _prepare_data(self):
        cfg = self.cfg
        cache = cache_root(cfg.cache_dir)
        specs = parse_sources(cfg.dataset or STDLIB_SOURCE, text_column=cfg.text_column)
        opts = {"max_bytes": cfg.max_corpus_bytes or None, "config_name": cfg.dataset_config,
                "hash_cache": cache / "filehash"}
        sources = [TextSource(spec, **opts) for spec in specs]
        eval_source = TextSource(SourceSpec(cfg.eval_dataset, 1.0, cfg.text_column), **opts) if cfg.eval_dataset else None
        trained: Path | None = None
        built: list[ShardedCorpus] = []
        try:
            keys = [source.key() for source in sources]
            if cfg.tokenizer:
                tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
            else:
                # Keyed by the sources' content and the budget, so a cache hit reads no text at all.
                blob = json.dumps({"sources": keys, "weights": [s.weight for s in specs],
                                   "bytes": cfg.tokenizer_sample_bytes})
                fingerprint = hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
                folder = cache / "tokenizers" / f"{fingerprint[:16]}-{cfg.vocab_size}"
                tokenizer = train_bpe_tokenizer(_tokenizer_sample(sources, cfg.tokenizer_sample_bytes), cfg.vocab_size,
                                                folder, fingerprint=fingerprint, model_max_length=cfg.seq_len,
                                                sample_bytes=cfg.tokenizer_sample_bytes)
                trained = None if tokenizer.acceltrain_cache_hit else folder
            workers = cfg.tokenize_workers or default_workers()
            for src, key in [*zip(sources, keys, strict=True), *([(eval_source, eval_source.key())] if eval_source else [])]:
                built.append(ingest(src.documents(), tokenizer, cache / "shards", key=key, workers=workers))
            corpora, eval_corpus = built[:len(sources)], (built[-1] if eval_source else None)
            train, val = build_mixture(corpora, seq_len=cfg.seq_len, weights=[s.weight for s in specs],
                                       names=[s.path for s in specs], seed=cfg.seed, val_fraction=cfg.val_fraction,
                                       eval_corpus=eval_corpus)
        except DataError:
            # Bad input, wherever it was found: what this run cached goes too, so a run that failed
            # leaves no cache entry (the tokenizer trained on the sample, other sources' shards).
            if trained is not None:
                shutil.rmtree(trained, ignore_errors=True)
            for corpus in built:
                if not corpus.from_cache:
                    shutil.rmtree(corpus.root, ignore_errors=True)
            for source in [*sources, eval_source]:
                if source is not None:
                    source.forget_hashes()
            raise
        return tokenizer, train, val, _Corpus(corpora)

    def build_data_loader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                                           drop_last=True, num_workers=self.cfg.num_workers,
                                           pin_memory=self.device.type == "cuda")  # copied non-blocking

    def build_eval_data_loader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg.batch_size)

    def build_model(self):
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.model_cfg, eos_token_id=self.tokenizer.eos_token_id,
                            bos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        self.n_params = count_parameters(model)
        self.flops_per_token = flops_per_token(model, self.model_cfg.n_layers, self.model_cfg.d_model, self.cfg.seq_len)
        model = model.to(self.device)
        if self.cfg.compile and self.accelerator.is_main_process:
            print(f"pretrain: compiled {compile_blocks(model)} transformer blocks (regional torch.compile)", flush=True)
        elif self.cfg.compile:
            compile_blocks(model)
        return model

    def build_hooks(self):
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32
        # First: the figures it adds to step_info are what progress and logs show.
        return self.standard_hooks(
            first=[ThroughputHook(tokens_per_step, self.flops_per_token, device_peak_flops(self.device, dtype))])

    def forward(self, input):
        out = self.model(input_ids=input["input_ids"], labels=input["labels"])
        return out.loss, {}

    def evaluation_step(self, batch):
        loss, _ = self.forward(batch)
        return {"loss": loss}

    def evaluate(self) -> dict[str, float]:
        # Every window has seq_len - 1 predicted tokens, so the window mean is the token mean.
        metrics = super().evaluate()
        loss = metrics["loss"]
        return {**metrics, "perplexity": math.exp(loss) if loss < 700 else math.inf}

    def finish(self) -> Path:
        """Export ``output_dir/final`` with a model card, then print a sample from it."""
        cfg, final = self.cfg, self.workspace / "final"
        metrics = self.eval_hook.last or self.evaluate()
        facts = {
            "architecture": f"{self.model_cfg.arch}: {self.model_cfg.n_layers} layers, d_model {self.model_cfg.d_model}, "
                            f"{self.model_cfg.n_heads} heads, d_ff {self.model_cfg.ffn_dim}",
            "parameters": f"{format_params(self.n_params)} ({self.n_params:,})",
            "data": f"{cfg.dataset or 'Python standard library source'}: {self.corpus.num_tokens:,} tokens, "
                    f"{self.corpus.num_documents:,} documents in {self.corpus.num_shards:,} shards",
            "tokenizer": f"{'byte-level BPE, ' + str(len(self.tokenizer)) + ' tokens' if not cfg.tokenizer else cfg.tokenizer}",
            "training": f"{self.step} steps x {cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes}"
                        f" windows of {cfg.seq_len} tokens, AdamW lr {cfg.lr} warmup+cosine",
            "final validation loss": f"{metrics['loss']:.4f}",
            "final validation perplexity": f"{metrics['perplexity']:.2f}",
        }
        self.export(title=f"acceltrain pretrain: {cfg.model_size} {cfg.arch}",
                    summary="A causal language model trained from scratch with `recipes/pretrain.py`.",
                    facts=facts, usage=f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{final}")
model = AutoModelForCausalLM.from_pretrained("{final}")
ids = tok({cfg.sample_prompt!r}, return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=True, top_k=40)[0]))""")
        if self.is_main_process:
            _write_generation_config(final, self.tokenizer)
            print(f"Saved {final} (validation loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f})")
            if cfg.sample_tokens:
                print("Sample:", _sample(final, cfg.sample_prompt, cfg.sample_tokens, cfg.seed))
        return final


class _Corpus:
    """What the run's sources hold, for the summary line and the model card."""

    def __init__(self, corpora: list[ShardedCorpus]) -> None:
        self.corpora = corpora
        self.num_tokens = sum(c.num_tokens for c in corpora)
        self.num_documents = sum(c.num_documents for c in corpora)
        self.num_shards = sum(len(c.shards) for c in corpora)
        self.from_cache = all(c.from_cache for c in corpora)


def _tokenizer_sample(sources: list[TextSource], budget: int) -> Iterator[str]:
    """The head of every source, ``budget`` bytes in all, split by weight (read lazily)."""
    from acceltrain.data.sources import take_bytes

    total = sum(s.spec.weight for s in sources)
    for source in sources:
        yield from take_bytes(source.documents(), max(1, int(budget * source.spec.weight / total)))


def build_model_meta(trainer: PretrainTrainer) -> torch.nn.Module:
    """The model on the meta device: its size without allocating it."""
    with torch.device("meta"):
        return build_model(trainer.model_cfg)


def _write_generation_config(folder: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, temperature=0.8, top_k=40, max_new_tokens=128,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.eos_token_id).save_pretrained(folder)


def _sample(folder: Path, prompt: str, tokens: int, seed: int) -> str:
    """Generate from the exported folder itself: it proves the export loads and works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    config = model.generation_config
    config.max_new_tokens = tokens
    with torch.no_grad():
        out = model.generate(ids, generation_config=config)
    return tok.decode(out[0], skip_special_tokens=True)


RECIPE = (PretrainConfig, PretrainTrainer)  # for `acceltrain lr-find --config`


def _announce(trainer: PretrainTrainer) -> None:
    """The summary line (main process): model size, tokenizer, corpus, windows, mixture shares."""
    cfg = trainer.cfg
    cached = lambda hit: " (cached)" if hit else ""  # noqa: E731
    print(f"pretrain: {cfg.model_size} {cfg.arch}, {format_params(count_parameters(build_model_meta(trainer)))} "
          f"parameters; tokenizer {len(trainer.tokenizer)} tokens"
          f"{cached(getattr(trainer.tokenizer, 'acceltrain_cache_hit', False))}; "
          f"{trainer.corpus.num_tokens:,} tokens packed{cached(trainer.corpus.from_cache)}; "
          f"{len(trainer.train_set):,} training windows of {cfg.seq_len}, {len(trainer.val_set):,} held out"
          f"{f' (from {cfg.eval_dataset})' if cfg.eval_dataset else ''}")
    if len(trainer.train_set.names) > 1:
        print("mixture (realised share of the training windows): " + ", ".join(
            f"{name} {share:.3f}" for name, share in zip(trainer.train_set.names, trainer.train_set.proportions(),
                                                         strict=True)))


def main(argv: list[str] | None = None) -> Path:
    return run_recipe(PretrainConfig, PretrainTrainer, argv, prog="recipes/pretrain.py", announce=_announce)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
