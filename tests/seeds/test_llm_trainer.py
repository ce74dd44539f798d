"""Coming from LLM Trainer (seed 004): its documented Python examples through
``acceltrain.compat.llm_trainer`` and its command lines through ``acceltrain train|generate|evaluate``,
as the document writes them (imports changed; sizes, datasets and file paths tiny and local).
"""

from __future__ import annotations

import json
import math
import os
import pty
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from acceltrain.compat.llm_trainer import (
    BPETokenizer,
    DataConfig,
    GenerationConfig,
    GenerationError,
    InferenceEngine,
    LanguageModelingDataset,
    ModelConfig,
    ModelConfigurationError,
    TextGenerator,
    TokenizerNotTrainedException,
    Trainer,
    TrainingConfig,
    TrainingError,
    TransformerLM,
    apply_repetition_penalty,
    compute_bleu_score,
    compute_diversity_metrics,
    compute_perplexity,
    compute_repetition_metrics,
    create_causal_mask,
    create_dataloader,
    create_optimizer,
    create_scheduler,
    evaluate_generation_quality,
    get_device,
    get_memory_usage,
    load_checkpoint,
    sample_top_k,
    sample_top_p,
    save_checkpoint,
    set_seed,
    setup_logging,
)
from acceltrain.compat.llm_trainer_config import pretrain_flags
from tests.conftest import ROOT
from tests.helpers import STEP_GLOB, ckpt_root, cli_error, parse_step, run_step_dir, step_dir

SEED = Path("/work/shared/seeds/004_8cc05e0bf127ac48.txt")
WORDS = ("the future of ai is bright and once upon a time a model learned to write text while the "
         "trainer saved its state every step").split()


def write_corpus(path: Path, docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm")
    write_corpus(root / "data1.txt", 120, 1)
    write_corpus(root / "data2.txt", 120, 2)
    os.environ["ACCELTRAIN_CACHE"] = str(root / "cache")  # this module's own tokenizer/packing cache
    yield root
    os.environ.pop("ACCELTRAIN_CACHE", None)


@pytest.fixture(scope="module")
def tokenizer(data: Path) -> BPETokenizer:
    texts = [(data / name).read_text() for name in ("data1.txt", "data2.txt")]
    tok = BPETokenizer()
    tok.train(texts, vocab_size=300)
    return tok


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=64)


# ---------------------------------------------------------------------- configuration classes
def test_model_config_as_documented(tmp_path: Path):
    config = ModelConfig(
        vocab_size=50000,           # Vocabulary size
        d_model=768,                # Model dimension
        n_heads=12,                 # Number of attention heads
        n_layers=12,                # Number of transformer layers
        d_ff=3072,                  # Feed-forward dimension
        max_seq_len=1024,           # Maximum sequence length
        dropout=0.1,                # Dropout rate
        attention_dropout=0.1,      # Attention dropout rate
        activation="gelu",          # Activation function
        pre_norm=True,              # Use pre-normalization
        use_learned_pos_emb=False,  # Use learned positional embeddings
        gradient_checkpointing=False  # Enable gradient checkpointing
    )
    assert config.d_head == 64
    assert ModelConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "model.json")
    config.save(tmp_path / "model.yaml")
    assert ModelConfig.load(tmp_path / "model.json") == config == ModelConfig.load(tmp_path / "model.yaml")
    arch = config.to_arch_config()
    assert (arch.arch, arch.ffn_dim, arch.dropout, arch.hf_activation) == ("gpt2", 3072, 0.1, "gelu")


def test_model_config_validation_as_documented():
    # "This will raise an assertion error"
    with pytest.raises(AssertionError, match=r"^d_model \(768\) must be divisible by n_heads \(5\)$"):
        ModelConfig(
            d_model=768,
            n_heads=5  # Error: d_model not divisible by n_heads
        )
    with pytest.raises(ModelConfigurationError, match=r"^pre_norm=False: acceltrain's models .* are pre-norm only$"):
        ModelConfig(pre_norm=False)
    with pytest.raises(ModelConfigurationError, match=r"dropout=0.1 with arch='llama'"):
        ModelConfig(arch="llama")
    assert ModelConfig(arch="llama", dropout=0.0).to_arch_config().arch == "llama"


def test_training_and_data_config_as_documented():
    config = TrainingConfig(
        # Core training parameters
        batch_size=32,              # Batch size per device
        learning_rate=1e-4,         # Peak learning rate
        weight_decay=0.01,          # L2 regularization
        num_epochs=10,              # Number of training epochs
        max_steps=None,             # Maximum training steps

        # Learning rate scheduling
        lr_scheduler="cosine",      # Scheduler type
        warmup_steps=1000,          # Warmup steps
        warmup_ratio=0.1,           # Warmup ratio
        min_lr_ratio=0.1,           # Minimum LR ratio

        # Optimization
        optimizer="adamw",          # Optimizer type
        max_grad_norm=1.0,          # Gradient clipping
        gradient_accumulation_steps=1,

        # Mixed precision
        use_amp=True,               # Enable AMP
        amp_dtype="float16",        # Precision type

        # Checkpointing
        save_steps=1000,            # Save frequency
        checkpoint_dir="./checkpoints",

        # Evaluation
        eval_steps=500,             # Evaluation frequency
        eval_strategy="steps",      # Evaluation strategy

        # Logging
        logging_steps=100,          # Logging frequency
        report_to=["tensorboard"],  # Logging backends

        # Distributed training
        world_size=1,               # Number of processes
        local_rank=-1,              # Local process rank
    )
    assert config.effective_batch_size == 32
    training_config = TrainingConfig(
        use_amp=True,                    # Mixed precision
        compile_model=True,              # PyTorch 2.0 compilation
        dataloader_num_workers=8,        # Parallel data loading
        gradient_accumulation_steps=4,   # Larger effective batch
    )
    assert training_config.effective_batch_size == 128
    data = DataConfig(
        # Dataset
        dataset_name="wikitext",
        dataset_config="wikitext-103-raw-v1",
        dataset_split="train",
        validation_split="validation",
        text_column="text",

        # Preprocessing
        max_length=1024,            # Maximum sequence length
        min_length=10,              # Minimum sequence length
        vocab_size=50000,           # Tokenizer vocabulary size

        # Optimization
        pack_sequences=True,        # Pack sequences for efficiency
        preprocessing_num_workers=4,
        dataloader_num_workers=4,

        # Custom files
        train_file=None,            # Custom training file
        validation_file=None,       # Custom validation file
    )
    assert DataConfig.from_dict(data.to_dict()) == data
    with pytest.raises(ModelConfigurationError, match=r"^TrainingConfig: unknown field\(s\) lr$"):
        TrainingConfig.from_dict({"lr": 1})


# ---------------------------------------------------------------------- model and tokenizer
def test_transformer_lm_as_documented(tmp_path: Path, capsys):
    # Create model (tiny: the document's 768x12 shape works the same, it is only slower)
    config = ModelConfig(vocab_size=500, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=128)
    model = TransformerLM(config)

    # Model information
    print(f"Parameters: {model.get_num_params():,}")
    print(f"Model size: {model.get_model_size_mb():.1f} MB")
    # GPT-2 shape, embeddings tied: tokens + positions + blocks + final norm.
    V, P, d, f, L = 500, 128, 32, 64, 2
    expected = V * d + P * d + L * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)) + 2 * d
    assert model.get_num_params() == expected
    assert capsys.readouterr().out == f"Parameters: {expected:,}\nModel size: {expected * 4 / 2**20:.1f} MB\n"

    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, 500) and out.loss.ndim == 0
    gen = model.generate(ids[:1], max_length=16, do_sample=False)
    assert gen.shape == (1, 16) and torch.equal(gen[:, :10], ids[:1])
    model.save_pretrained(tmp_path / "m")
    again = TransformerLM.from_pretrained(tmp_path / "m")
    assert again.model_config == config
    model.eval(), again.eval()
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_bpe_tokenizer_as_documented(data: Path, tmp_path: Path):
    # Create and train tokenizer (a local file stands in for the Hub dataset)
    tokenizer = BPETokenizer()
    tokenizer.train_from_dataset(
        dataset_name=str(data / "data1.txt"),
        dataset_config=None,
        vocab_size=300
    )
    # Encode/decode
    token_ids = tokenizer.encode("Hello world!")
    text = tokenizer.decode(token_ids)
    assert text == "Hello world!"  # byte-level: any text round-trips
    assert tokenizer.vocab_size <= 300 and len(tokenizer.vocab) == tokenizer.vocab_size
    assert tokenizer.special_tokens == ["<|endoftext|>", "<|pad|>"]
    stats = tokenizer.get_vocab_stats()
    assert stats["vocab_size"] == tokenizer.vocab_size and stats["max_token_length"] >= 2
    tokenizer.save_pretrained(tmp_path / "tok")
    assert BPETokenizer.from_pretrained(tmp_path / "tok").encode("the trainer") == tokenizer.encode("the trainer")
    with pytest.raises(TokenizerNotTrainedException, match=r"^BPETokenizer: call train\(\)"):
        BPETokenizer().encode("x")


# ---------------------------------------------------------------------- training
def test_complete_training_example(data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def main():
        # Configuration (tiny, CPU: the document's sizes are 512 wide, 6 layers, vocab 32000)
        model_config = ModelConfig(
            vocab_size=300,
            d_model=32,
            n_heads=4,
            n_layers=2,
            d_ff=64,
            max_seq_len=64
        )

        training_config = TrainingConfig(
            batch_size=8,
            learning_rate=3e-3,
            num_epochs=1,
            warmup_steps=2,
            use_amp=True,
            checkpoint_dir="./checkpoints",
            logging_steps=1,
        )

        data_config = DataConfig(
            dataset_name=str(data / "data1.txt"),
            dataset_config=None,
            max_length=32,
            vocab_size=300
        )

        # Create tokenizer
        tokenizer = BPETokenizer()
        tokenizer.train_from_dataset(
            dataset_name=data_config.dataset_name,
            dataset_config=data_config.dataset_config,
            vocab_size=data_config.vocab_size
        )

        # Update model config
        model_config.vocab_size = tokenizer.vocab_size

        # Create model
        model = TransformerLM(model_config)

        # Create trainer
        trainer = Trainer(model, tokenizer, training_config)

        # Train
        trainer.train_from_config(model_config, data_config)

        # Save
        trainer.save_model("./final_model")
        return trainer

    trainer = main()
    assert trainer.generate_text("the model", max_length=12, seed=0).startswith("the model")
    with pytest.raises(TrainingError, match=r"^Trainer.evaluate: no eval_dataset$"):
        trainer.evaluate()
    windows = len(trainer.train_dataset)
    steps = math.ceil(windows / 8)
    assert [h["step"] for h in trainer.history] == list(range(1, steps + 1))  # num_epochs=1: one pass
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"]
    assert (run_step_dir(tmp_path, steps) / "manifest.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final_model")
    assert model.config.n_layer == 2 and tok.decode(tok("the model").input_ids) == "the model"


def test_custom_dataset_example(data: Path, tokenizer: BPETokenizer, monkeypatch):
    monkeypatch.chdir(data)
    texts = []
    for file_path in ["data1.txt", "data2.txt"]:
        with open(file_path) as f:
            texts.append(f.read())
    dataset = LanguageModelingDataset(
        texts=texts,
        tokenizer=tokenizer,
        max_length=64
    )
    dataloader = create_dataloader(
        dataset=dataset,
        batch_size=32,
        shuffle=True
    )
    batch = next(iter(dataloader))
    assert batch["input_ids"].shape == (32, 64) and torch.equal(batch["labels"], batch["input_ids"])
    stats = dataset.get_stats()
    n_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)  # EOS after each
    assert stats == {"num_sequences": n_tokens // 64, "num_tokens": n_tokens, "max_length": 64, "packed": True}
    # The Trainer section's example, with this dataset (two steps).
    model = TransformerLM(tiny_config(tokenizer.vocab_size))
    training_config = TrainingConfig(batch_size=8, max_steps=2, warmup_steps=1, logging_steps=1,
                                     checkpoint_dir=str(data / "trainer_section" / "checkpoints"))
    train_dataset = eval_dataset = dataset
    trainer = Trainer(
        model=model,
        tokenizer=tokenizer,
        config=training_config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset
    )
    trainer.train()
    assert [h["step"] for h in trainer.history] == [1, 2]
    metrics = trainer.evaluate()
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"])) and metrics["tokens"] == len(dataset) * 63
    trainer.save_model(data / "trainer_section" / "final")
    again = Trainer.from_pretrained(data / "trainer_section" / "final", config=training_config)
    assert again.tokenizer.encode("the model") == tokenizer.encode("the model")
    unpacked = LanguageModelingDataset(texts, tokenizer, max_length=16, pack_sequences=False)
    padded = create_dataloader(unpacked, batch_size=2, shuffle=False)
    assert next(iter(padded))["input_ids"].shape == (2, 16)


def test_documented_exception_handling(tokenizer: BPETokenizer, capsys):
    model = TransformerLM(tiny_config(tokenizer.vocab_size))
    trainer = Trainer(model, tokenizer, TrainingConfig())
    try:
        # Training code
        trainer.train()
    except TrainingError as e:
        print(f"Training failed: {e}")
    except ModelConfigurationError as e:
        print(f"Model configuration error: {e}")
    assert capsys.readouterr().out == ("Training failed: Trainer: no train_dataset (give one, or call "
                                       "train_from_config)\n")


# ---------------------------------------------------------------------- generation and inference
def test_text_generator_and_inference_engine_as_documented(tokenizer: BPETokenizer):
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(tokenizer.vocab_size))
    device = get_device()
    generator = TextGenerator(model, tokenizer, device)
    config = GenerationConfig(
        max_length=24,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        do_sample=True,
        repetition_penalty=1.1,
        seed=0,
    )
    generated = generator.generate(
        prompt="The future of AI is",
        config=config
    )
    assert generated.startswith("The future of AI is") and generated == generator.generate("The future of AI is", config)
    assert generator.batch_generate(["a", "b"], config)[1].startswith("b")
    answers = iter(["once upon", "", "quit"])
    shown = []
    assert generator.interactive_generate(config, read=lambda _: next(answers), write=shown.append) == 1
    assert shown[0].startswith("once upon")
    with pytest.raises(GenerationError, match=r"^prompt: expected non-empty text"):
        generator.generate("")

    engine = InferenceEngine(model, tokenizer, device)
    engine.optimize(
        enable_kv_cache=True,
        compile_model=True,
        quantize=False
    )
    result = engine.infer(
        prompt="Hello world",
        max_length=16
    )
    greedy = TextGenerator(model, tokenizer).generate("Hello world", GenerationConfig(max_length=16, do_sample=False))
    assert result == greedy
    engine.optimize(enable_kv_cache=False)
    assert engine.infer(prompt="Hello world", max_length=16) == greedy  # the cache changes speed only
    assert engine.batch_infer(["Hello", "world"], max_length=12)[0].startswith("Hello")
    report = engine.benchmark(["Hello"], num_runs=2, max_length=10)
    assert report["runs"] == 2 and report["tokens_per_s"] > 0


def test_generation_utilities():
    logits = torch.tensor([[1.0, 4.0, -2.0, 3.0]])
    assert torch.equal(sample_top_k(logits, k=2), torch.tensor([[-math.inf, 4.0, -math.inf, 3.0]]))
    # softmax([1, 4, -2, 3]) = [.035, .704, .002, .259]: 0.704 + 0.259 reaches p = 0.9
    assert torch.equal(sample_top_p(logits, p=0.9), torch.tensor([[-math.inf, 4.0, -math.inf, 3.0]]))
    input_ids = torch.tensor([[1, 2]])
    out = apply_repetition_penalty(logits, input_ids, penalty=1.1)
    expected = logits.clone()
    expected[0, 1] /= 1.1  # a positive logit of a token seen: divided by the penalty
    expected[0, 2] *= 1.1  # a negative one: multiplied
    assert torch.equal(out, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 4.0, -2.0, 3.0]]))  # the input is not modified
    assert torch.equal(create_causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))


# ---------------------------------------------------------------------- metrics and utilities
def test_metrics_functions(tokenizer: BPETokenizer, data: Path):
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(tokenizer.vocab_size))
    dataset = LanguageModelingDataset([(data / "data1.txt").read_text()], tokenizer, max_length=32)
    dataloader = create_dataloader(dataset, batch_size=5, shuffle=False)
    device = "cpu"
    perplexity = compute_perplexity(model, dataloader, device)
    assert model.training  # put back as it was
    total = tokens = 0
    model.eval()  # no dropout: compute_perplexity evaluates in eval mode
    with torch.no_grad():
        for batch in dataloader:
            total += model(batch["input_ids"], labels=batch["labels"]).loss.item() * batch["input_ids"].numel() * 31 / 32
            tokens += batch["input_ids"].shape[0] * 31
    assert perplexity == pytest.approx(math.exp(total / tokens), rel=1e-6)

    generated_texts = ["the cat sat on the mat", "the the the dog"]
    reference_texts = ["the cat sat on the mat", "a dog ran"]
    diversity = compute_diversity_metrics(generated_texts)
    # words: the cat sat on the mat | the the the dog -> 6 distinct of 10; bigrams (within a text):
    # 5 + 3, "the the" twice -> 7 distinct of 8
    assert diversity == {"distinct_1": 0.6, "distinct_2": 7 / 8}
    repetition = compute_repetition_metrics(generated_texts)
    assert repetition == pytest.approx({"repetition_rate": (1 - 5 / 6 + 1 - 2 / 4) / 2,
                                        "repeated_bigram_rate": (0 + 1 - 2 / 3) / 2, "max_run": (1 + 3) / 2}, abs=1e-12)
    import sacrebleu

    assert compute_bleu_score(generated_texts, reference_texts) == sacrebleu.corpus_bleu(
        generated_texts, [reference_texts]).score / 100
    assert compute_bleu_score(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(1.0)
    quality_metrics = evaluate_generation_quality(
        generated_texts=generated_texts,
        reference_texts=reference_texts
    )
    assert {"distinct_1", "distinct_2", "repetition_rate", "bleu", "mean_words"} <= set(quality_metrics)


def test_optimizer_scheduler_and_training_utilities(tmp_path: Path, restore_logging):
    model = torch.nn.Linear(4, 2)
    optimizer = create_optimizer(
        model=model,
        optimizer_type="adamw",
        learning_rate=1e-4,
        weight_decay=0.01,
        betas=(0.9, 0.999),
        eps=1e-8
    )
    total_steps, warmup_steps = 20, 4
    scheduler = create_scheduler(
        optimizer=optimizer,
        scheduler_type="cosine",
        num_training_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=0.1
    )
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0, 0.25e-4, 0.5e-4, 0.75e-4, 1e-4])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the floor: min_lr_ratio x peak
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # no decay on the bias
    with pytest.raises(Exception, match=r"optimizer_type 'lion': expected adamw, adam or sgd"):
        create_optimizer(model, "lion")

    set_seed(42)
    a = torch.randn(3)
    set_seed(42)
    assert torch.equal(a, torch.randn(3))
    assert get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    setup_logging(level="info")
    memory_usage = get_memory_usage()
    assert memory_usage["rss_mb"] > 10
    save_checkpoint(model, optimizer, tmp_path / "ck", step=7, scheduler=scheduler)
    other = torch.nn.Linear(4, 2)
    assert load_checkpoint(tmp_path / "ck", other) == {"step": 7}
    assert torch.equal(other.weight, model.weight)


# ---------------------------------------------------------------------- command lines
MODEL_CONFIG_YAML = """\
# model_config.yaml
model:
  vocab_size: 300
  d_model: 32
  n_heads: 4
  n_layers: 2
  d_ff: 64
  max_seq_len: 64
  dropout: 0.1
  activation: "gelu"

training:
  batch_size: 8
  learning_rate: 3e-3
  num_epochs: 1
  lr_scheduler: "cosine"
  warmup_steps: 2
  use_amp: true

data:
  dataset_name: "{dataset}"
  dataset_config: null
  max_length: 32
  vocab_size: 300
"""


def cli(*args: str, expect: int = 0, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELTRAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "acceltrain.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_yaml_and_json_formats_of_the_document_map_alike(tmp_path: Path):
    text = SEED.read_text()
    documented_yaml = text.split("```yaml\n# model_config.yaml\n")[1].split("```")[0]
    documented_json = text.split("### JSON Configuration\n\n```json\n")[1].split("```")[0]
    (tmp_path / "model_config.yaml").write_text(documented_yaml)
    (tmp_path / "model_config.json").write_text(documented_json)
    notes: list[str] = []
    flags, epochs = pretrain_flags(tmp_path / "model_config.yaml", note=notes.append)
    assert (flags, epochs) == pretrain_flags(tmp_path / "model_config.json", note=notes.append)
    assert epochs == 10 and notes == []
    assert dict(zip(flags[::2], flags[1::2], strict=True)) == {
        "--arch": "gpt2", "--d_model": "768", "--n_heads": "12", "--n_layers": "12", "--d_ff": "3072",
        "--activation": "gelu", "--dropout": "0.1", "--seq_len": "1024", "--vocab_size": "50000",
        "--dataset": "wikitext", "--dataset_config": "wikitext-103-raw-v1", "--batch_size": "32", "--lr": "0.0001",
        "--warmup_steps": "1000", "--mixed_precision": "auto"}
    from acceltrain.compat.llm_trainer_config import is_nested_config

    (tmp_path / "flat.json").write_text('{"recipe": "causal_lm", "model": "gpt2", "max_steps": 3}')
    assert is_nested_config(tmp_path / "model_config.json") and not is_nested_config(tmp_path / "flat.json")
    (tmp_path / "bad.yaml").write_text("model: {d_model: 64, n_head: 4}\n")
    with pytest.raises(Exception, match=r"bad.yaml: model.n_head: unknown key; known keys: vocab_size, d_model"):
        pretrain_flags(tmp_path / "bad.yaml")


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory) -> dict:
    """`acceltrain train` with the document's scripts/train.py line (a nested YAML config)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "configs").mkdir()
    config = root / "configs" / "model_config.yaml"
    config.write_text(MODEL_CONFIG_YAML.format(dataset=data / "data1.txt"))
    proc = cli("train", "--config", str(config), "--output_dir", str(root / "output"), "--log_level", "info",
               "--sample_tokens", "0", "--save_interval", "2", "--eval_interval", "2", cache=root / "cache")
    return {"root": root, "config": config, "train": proc}


def test_train_command_line_with_a_nested_config(trained):
    root, proc = trained["root"], trained["train"]
    assert "training.num_epochs 1: " in proc.stderr
    steps = int(proc.stderr.split("training.num_epochs 1: ")[1].split()[0])
    recorded = yaml.safe_load((root / "output" / "config.yaml").read_text())
    assert {k: recorded[k] for k in ("arch", "d_model", "n_heads", "n_layers", "d_ff", "dropout", "seq_len",
                                     "vocab_size", "batch_size", "lr", "max_steps", "warmup_steps")} == {
        "arch": "gpt2", "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "dropout": 0.1, "seq_len": 32,
        "vocab_size": 300, "batch_size": 8, "lr": 3e-3, "max_steps": steps, "warmup_steps": 2}
    assert (root / "output" / "final" / "config.json").is_file()
    assert run_step_dir(root / "output", steps).is_dir()


def test_train_resume_from_checkpoint_and_force_retrain_tokenizer(trained, capsys):
    root, config = trained["root"], trained["config"]
    checkpoints = ckpt_root(root / "output")
    last = max(checkpoints.glob(STEP_GLOB), key=lambda p: parse_step(p.name))
    step = int(last.name.rsplit("_", 1)[1])
    proc = cli("train", "--config", str(config), "--resume_from_checkpoint", str(last), "--max_steps", str(step + 2),
               "--sample_tokens", "0", "--force_retrain_tokenizer", cache=root / "cache")
    assert f"resumed from {last} at step {step}" in proc.stderr + proc.stdout
    assert "(cached)" not in proc.stdout.split("tokenizer")[1].split(";")[0]  # trained again, in a fresh cache
    assert step_dir(checkpoints, step + 2).is_dir()
    older = min(checkpoints.glob(STEP_GLOB), key=lambda p: parse_step(p.name))
    # Bad input: one error line, exit 2, before anything is read or written (in-process: fast).
    err = cli_error(capsys, "train", "--config", str(config), "--resume_from_checkpoint", str(older))
    assert err.startswith(f"error: --resume_from_checkpoint {older}: the run in ")
    err = cli_error(capsys, "train", "--config", str(config), "--log_level", "loud")
    assert err == "error: --log_level 'loud': expected one of debug, info, warning, error, critical"


def test_generate_command_line(trained, capsys):
    root = trained["root"]
    proc = cli("generate", "--model_path", str(root / "output" / "final"), "--prompts", "The future of AI",
               "Once upon a time", "--max_length", "24", "--temperature", "0.8", "--top_p", "0.9", cache=root / "cache")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("The future of AI") and lines[1].startswith("Once upon a time")
    err = cli_error(capsys, "generate", "--model_path", str(root / "output" / "final"), "--interactive")
    assert err == "error: --interactive needs a terminal (stdin is not a TTY); pass prompts with --prompts instead"


def test_generate_interactive_under_a_pseudo_terminal(trained):
    root = trained["root"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.environ.update(ACCELTRAIN_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "acceltrain.cli", "generate", "--model_path",
                                  str(root / "output" / "final"), "--interactive", "--max_new_tokens", "6",
                                  "--temperature", "0"])
    seen = b""

    def read_until(marker: bytes, start: int = 0, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen[start:]:
            assert time.monotonic() < deadline, f"no {marker!r} in {seen[-2000:]!r}"
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break

    try:
        read_until(b"> ")
        asked = len(seen)
        os.write(fd, b"once upon a time\n")
        read_until(b"\r\n> ", asked)  # the echo, the answer, then the next prompt
        start = seen.index(b"once upon a time\r\n", asked) + len(b"once upon a time\r\n")
        answer = seen[start:].split(b"\r\n")[0]
        assert answer.startswith(b"once upon a time") and len(answer) > len(b"once upon a time")
        os.write(fd, b"quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_evaluate_command_line(trained, data: Path, capsys):
    root = trained["root"]
    eval_config = root / "configs" / "eval_config.json"
    eval_config.write_text(json.dumps({"dataset_name": str(data / "data2.txt"), "max_length": 32, "batch_size": 4}))
    out = root / "evaluation_results.json"
    proc = cli("evaluate", "--model_path", str(root / "output" / "final"), "--dataset_config", str(eval_config),
               "--output_path", str(out), "--max_batches", "100", "--generation_samples", "2",
               "--generation_tokens", "8", cache=root / "cache")
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seq_len"] == 32 and result["windows"] == result["tokens"] // 32 and result["batches"] <= 100
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-3)
    gen = result["generation"]
    assert gen["samples"] == 2 and 0 <= gen["distinct_1"] <= 1 and 0 <= gen["bleu"] <= 1
    assert {"distinct_2", "repetition_rate", "repeated_bigram_rate", "max_run", "mean_words"} <= set(gen)
    one = json.loads(cli("evaluate", "--model_path", str(root / "output" / "final"), "--dataset_config",
                         str(eval_config), "--max_batches", "1", "--generation_samples", "0",
                         cache=root / "cache").stdout.strip().splitlines()[-1])
    assert (one["batches"], one["windows"]) == (1, 4) and "generation" not in one
    (root / "configs" / "bad_eval.json").write_text(json.dumps({"dataset": "x"}))
    err = cli_error(capsys, "evaluate", "--model_path", str(root / "output" / "final"), "--dataset_config",
                    str(root / "configs" / "bad_eval.json"))
    assert err.startswith(f"error: {root / 'configs' / 'bad_eval.json'}: dataset: unknown key")
