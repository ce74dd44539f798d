"""Transformer Builder Colab's API reference (seed 002) run on acceltrain: each code example as
written, with only the import line, tiny local models and text files in place of model ids and
Hub datasets, and the CPU. The lines that drive PyTorch Lightning (``pl.Trainer(...).fit``) run in
``test_tb_lightning.py``; here the same objects are trained by acceltrain (``TrainingCoordinator``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acceltrain.compat.transformer_builder import (
    AdaptiveTokenizer,
    AdaptiveTokenizerDataModule,
    BPETrainerConfig,
    CharacterLevelTokenizer,
    CheckpointManager,
    ComputationalGraphExecutor,
    ConfigPresets,
    DatasetLoader,
    FastBPETrainer,
    ModelCardGenerator,
    ModelSignatureInspector,
    ONNXExporter,
    SetupWizard,
    TokenizerValidator,
    TorchScriptExporter,
    TrainingCoordinator,
    UniversalModelAdapter,
    train_model,
)
from acceltrain.data.text import DataError
from acceltrain.data.tokenizer_check import TokenizerValidationError
from tests.helpers import CHECKPOINTS_SUBDIR, STEP_GLOB, ckpt_root, step_folder_name

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial boxers; "
          "sphinx of black quartz judge my vow").split()


def _paragraphs(n: int, words: int = 12) -> list[str]:
    return [" ".join(_WORDS[(i * 3 + j) % len(_WORDS)] for j in range(words)) + f" {i}." for i in range(n)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network here: make Hub lookups fail at once instead of after minutes of retries."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def wikitext(tmp_path, monkeypatch):
    """A tiny local stand-in for 'wikitext': ~1,100 characters = two 512-token windows (character tokenizer)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "wikitext.txt"
    path.write_text("\n\n".join(_paragraphs(16)))
    return str(path)


def _gpt2(vocab_size: int = 50257):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=512))


# ---------------------------------------------------------------------- Adapters
def test_model_signature_inspector_and_executor():
    model = _gpt2(96)
    inspector = ModelSignatureInspector(model)
    params = inspector.get_parameters()
    assert params[0] == "input_ids" and "attention_mask" in params and "labels" in params
    is_complex = inspector.requires_intermediate_outputs()
    assert is_complex is False
    info = inspector.get_signature_info()
    assert info["model_class"] == "GPT2LMHeadModel" and info["requires_intermediate_outputs"] is False

    executor = ComputationalGraphExecutor(model, inspector)
    input_ids, attention_mask = torch.randint(0, 96, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    output = executor.forward(input_ids, attention_mask)
    assert output.shape == (2, 5, 96)
    assert "transformer.h.0.attn" in executor.get_layer_map()

    class Generated(torch.nn.Module):
        def forward(self, input_ids, mhsa_0_output):
            return input_ids

    assert ModelSignatureInspector(Generated()).requires_intermediate_outputs() is True
    with pytest.raises(ValueError, match=r"needs intermediate outputs \['mhsa_0_output'\]"):
        ComputationalGraphExecutor(Generated())


def test_universal_model_adapter():
    your_model = _gpt2(96)
    adapter = UniversalModelAdapter(model=your_model, learning_rate=1e-4, vocab_size=50257, warmup_steps=500)
    start_tokens = torch.randint(0, 96, (1, 4))
    text = adapter.generate(input_ids=start_tokens, max_length=100, temperature=0.8)
    assert text.shape == (1, 100) and torch.equal(text[:, :4], start_tokens)
    out = adapter(start_tokens, labels=start_tokens)
    assert set(out) == {"loss", "logits"} and out["loss"].ndim == 0
    opt, sched = adapter.configure_optimizers()
    assert opt.param_groups[0]["lr"] == 0.0 and sched.lr_lambdas[0].warmup_steps == 500  # warmup starts at 0


# ---------------------------------------------------------------------- Tokenization
def test_adaptive_tokenizer(tmp_path, caplog):
    your_dataset = _paragraphs(20)
    tokenizer = AdaptiveTokenizer.load_or_create(vocab_size=50257, dataset=your_dataset,
                                                 cache_dir=str(tmp_path / "tokenizers"))
    assert "using the character strategy instead" in caplog.text  # no gpt2 offline; too little text for BPE
    encoded = tokenizer.encode("Hello world!", max_length=512, padding="max_length")
    assert len(encoded["input_ids"]) == 512 and sum(encoded["attention_mask"]) == 12
    text = tokenizer.decode(encoded["input_ids"])
    assert text == "Hello world!" and len(tokenizer) == 50257
    assert AdaptiveTokenizer.detect_strategy(50257, 10) == "pretrained"
    assert AdaptiveTokenizer.detect_strategy(8000, 1_000_000) == "bpe"
    assert AdaptiveTokenizer.detect_strategy(8000, 1_000) == "character"


def test_fast_bpe_trainer(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.chdir(tmp_path)
    dataset = {"text": _paragraphs(200)}
    config = BPETrainerConfig(vocab_size=25000, min_frequency=2, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    trainer = FastBPETrainer(config)
    tokenizer = trainer.train_on_dataset(texts=dataset["text"], show_progress=True)
    tokenizer.save("my_tokenizer.json")
    loaded = Tokenizer.from_file("my_tokenizer.json")
    assert [loaded.token_to_id(t) for t in ("</s>", "<pad>", "<unk>", "<s>")] == [0, 1, 2, 3]
    ids = loaded.encode("the quick brown fox").ids
    assert loaded.decode(ids) == "the quick brown fox"


def test_character_level_tokenizer(tmp_path):
    tokenizer = CharacterLevelTokenizer(vocab_size=100000, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    encoded = tokenizer.encode("Hello 世界!", max_length=512)
    text = tokenizer.decode(encoded["input_ids"])
    assert text == "Hello 世界!" and len(encoded["input_ids"]) == 9 and len(tokenizer) == 100000
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "chars")
    hf = AutoTokenizer.from_pretrained(tmp_path / "chars")  # a plain Hugging Face folder
    assert hf("Hello 世界!", add_special_tokens=False)["input_ids"] == encoded["input_ids"]
    assert (hf.pad_token, hf.unk_token, hf.bos_token, hf.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")


def test_tokenizer_validator(caplog):
    tokenizer = CharacterLevelTokenizer(vocab_size=50257)
    assert TokenizerValidator.validate(tokenizer, expected_vocab_size=50257, strict=True) is True
    is_valid = TokenizerValidator.validate(tokenizer, expected_vocab_size=50257, strict=False)
    assert is_valid is True
    small = CharacterLevelTokenizer(vocab_size=12, texts=["hello world"])
    with pytest.raises(TokenizerValidationError,
                       match=r"^tokenizer: vocabulary size is 12, expected 50257; round trip of 'Hello world!' gives"):
        TokenizerValidator.validate(small, expected_vocab_size=50257, strict=True)
    assert TokenizerValidator.validate(small, expected_vocab_size=50257, strict=False) is False
    assert "vocabulary size is 12, expected 50257" in caplog.text


def test_adaptive_tokenizer_datamodule(tmp_path):
    from datasets import Dataset

    hf_dataset = Dataset.from_dict({"text": _paragraphs(40)})
    tokenizer = CharacterLevelTokenizer(vocab_size=512, texts=hf_dataset["text"])
    datamodule = AdaptiveTokenizerDataModule(dataset=hf_dataset, tokenizer=tokenizer, batch_size=16, max_length=512,
                                             val_split=0.1, cache_dir=tmp_path)
    n_chars = sum(len(t) + 1 for t in hf_dataset["text"])  # + EOS after each text
    assert len(datamodule.train_set) + len(datamodule.val_set) == n_chars // 512 and len(datamodule.val_set) == 1
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape == (len(datamodule.train_set), 512) and torch.equal(batch["labels"], batch["input_ids"])
    # `trainer.fit(model, datamodule)` is Lightning's; acceltrain's coordinator takes the data module instead
    results = TrainingCoordinator(output_dir=str(tmp_path / "dm_run")).train(model=_gpt2(512), datamodule=datamodule,
                                                                              max_epochs=2)
    assert results["trainer"].step == 2 and set(results["final_metrics"]) == {"loss"}
    assert Path(results["best_model_path"]).parent == (tmp_path / "dm_run/checkpoints").resolve()


# ---------------------------------------------------------------------- Training
def test_train_model_simple_api(wikitext, capsys):
    your_model = _gpt2()
    results = train_model(model=your_model, dataset=wikitext, vocab_size=50257, max_epochs=3, batch_size=16,
                          learning_rate=1e-4)
    print(f"Best checkpoint: {results['best_model_path']}")
    print(f"Final metrics: {results['final_metrics']}")
    assert set(results) == {"best_model_path", "final_metrics", "trainer", "model", "tokenizer"}
    best = Path(results["best_model_path"])
    assert best.parent.name == CHECKPOINTS_SUBDIR and (best / "manifest.json").is_file()
    assert set(results["final_metrics"]) == {"loss"} and results["trainer"].step == 3
    assert isinstance(results["model"], UniversalModelAdapter) and results["model"].model is results["trainer"].unwrapped_model
    assert len(results["tokenizer"]) == 50257
    final = Path("training_output/final")
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert "Best checkpoint: " in capsys.readouterr().out


def test_training_coordinator_advanced_api(wikitext, caplog):
    your_model = _gpt2()
    coordinator = TrainingCoordinator(output_dir="./training_output", use_gpu=True, precision="16",
                                      gradient_clip_val=1.0)
    results = coordinator.train(model=your_model, dataset=wikitext, config_name="wikitext-2-raw-v1", vocab_size=50257,
                                batch_size=32, max_length=512, learning_rate=5e-4, max_epochs=10, val_split=0.1,
                                accumulate_grad_batches=2, early_stopping_patience=3, save_top_k=3,
                                resume_from_checkpoint=None)
    assert "precision='16': no GPU in use, training in fp32" in caplog.text or torch.cuda.is_available()
    trainer = results["trainer"]
    assert trainer.gradient_accumulation_steps == 2 and trainer.grad_clip == 1.0
    kept = sorted(ckpt_root("training_output").glob(STEP_GLOB))
    assert 1 <= len(kept) <= 4  # the 3 best and the newest
    manager = CheckpointManager(checkpoint_dir="training_output/checkpoints", monitor="val_loss")
    assert manager.get_best_checkpoint_path() == results["best_model_path"]  # both absolute
    again = coordinator.resume_training(results["best_model_path"], your_model, wikitext, vocab_size=50257,
                                        max_epochs=10, accumulate_grad_batches=2)
    assert again["trainer"].step >= trainer.step  # resumed from the best checkpoint, not from step 0


def test_dataset_loader(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("first sample text\n\nshort\n\nfirst sample text\n\nthe second sample here")
    loader = DatasetLoader(preprocessing=True, min_length=10, max_length=None, remove_duplicates=False)
    dataset = loader.load_huggingface(str(tmp_path / "data.txt"), None)  # a local path for the Hub name
    assert dataset["text"] == ["first sample text", "first sample text", "the second sample here"]
    dataset = loader.load_local_file(str(tmp_path / "data.txt"), text_column="text")
    assert loader.last_report == {"read": 4, "kept": 3, "too_short": 1, "too_long": 0, "duplicates": 0}
    dataset = loader.load_from_drive(str(tmp_path / "data.txt"))
    stats = loader.get_statistics(dataset)
    assert stats == {"num_samples": 3, "total_characters": 56, "total_words": 10, "unique_words": 6,
                     "avg_length": 56 / 3, "median_length": 17.0, "min_length": 17, "max_length": 22,
                     "avg_words": 10 / 3}
    loader.print_statistics(dataset)
    loader.preview_samples(dataset, num_samples=3)
    out = capsys.readouterr().out
    assert "num_samples      3" in out and "[2] the second sample here" in out
    dedup = DatasetLoader(remove_duplicates=True).load_local_file(tmp_path / "data.txt")
    assert dedup["text"] == ["first sample text", "the second sample here"]
    with pytest.raises(DataError, match="not found; mount Google Drive first"):
        loader.load_from_drive("/content/drive/MyDrive/data.txt")


def test_checkpoint_manager(wikitext, capsys):
    results = train_model(model=_gpt2(96), dataset=wikitext, vocab_size=96, max_epochs=4, batch_size=16, max_length=64,
                          tokenizer="character", save_top_k=2, learning_rate=1e-3)
    manager = CheckpointManager(checkpoint_dir="./training_output/checkpoints", save_top_k=3, monitor="val_loss",
                                mode="min", drive_backup=True, drive_backup_path="MyDrive/checkpoints")
    callback = manager.get_callback()
    assert (callback.keep_best, callback.metric, callback.mode) == (3, "eval/loss", "min")
    checkpoint = manager.load_checkpoint()
    assert checkpoint["path"] == results["best_model_path"] and set(checkpoint["state_dict"]) >= {"lm_head.weight"}
    model = manager.load_model_from_checkpoint(UniversalModelAdapter)
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k in ("transformer.wte.weight", "lm_head.weight")}
    assert len(saved) == 1  # tied: stored once
    assert torch.equal(model.model.transformer.wte.weight, next(iter(saved.values())))
    checkpoints = manager.list_checkpoints()
    metrics = [manager.metric_of(c) for c in manager.list_checkpoints(sort_by="metric")]
    assert metrics == sorted(metrics) and checkpoints[-1].endswith(step_folder_name(4))
    assert 2 <= len(checkpoints) <= 3  # save_top_k=2 best and the newest (4 epochs: one checkpoint each)
    removed = manager.cleanup_old_checkpoints(keep_top_k=1)
    left = manager.list_checkpoints()
    assert len(removed) + len(left) == len(checkpoints) and results["best_model_path"] in left
    assert set(left) == {results["best_model_path"], checkpoints[-1]}
    manager.print_checkpoint_info()
    assert "(best)" in capsys.readouterr().out
    assert manager.get_backup_callback() is not None
    assert (Path(manager.backup()) / "manifest.json").is_file()


# ---------------------------------------------------------------------- Export
def test_onnx_and_torchscript_exporters_and_the_complete_pipeline(wikitext):
    # Common Workflows: Complete Training Pipeline (GPT2Config shrunk to a tiny local model)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    model = GPT2LMHeadModel(config)
    results = train_model(model=model, dataset=wikitext, vocab_size=50257, max_epochs=3)
    exporter = ONNXExporter()
    report = exporter.export(results["model"].model, "model.onnx", vocab_size=50257)
    assert Path("model.onnx").is_file() and report["max_abs_diff"] <= 1e-4
    generator = ModelCardGenerator()
    card = generator.generate(model_name="my-model", model=results["model"], training_results=results,
                              output_path="MODEL_CARD.md")
    assert Path("MODEL_CARD.md").read_text() == card
    for section in ModelCardGenerator.SECTIONS:
        assert f"## {section}" in card
    assert f"- loss: {results['final_metrics']['loss']:.4f}" in card and "Vocabulary size: 50257" in card

    trained_model = results["model"]
    exporter = ONNXExporter(opset_version=14, optimize=True, validate=True, benchmark=True)
    result = exporter.export(model=trained_model, output_path="model.onnx", vocab_size=50257, max_seq_len=512,
                             dynamic_axes=True)
    print(f"Exported: {result['output_path']}")
    print(f"Size: {result['file_size_mb']:.2f} MB")
    print(f"Speedup: {result['benchmark']['speedup']:.2f}x")
    assert result["opset_version"] == 18 and result["max_abs_diff"] <= 1e-4 and result["benchmark"]["speedup"] > 0

    exporter = TorchScriptExporter(validate=True, benchmark=True)
    result = exporter.export(model=trained_model, output_path="model.pt", vocab_size=50257, mode="auto")
    print(f"Mode: {result['mode']}")
    print(f"Speedup: {result['benchmark']['speedup']:.2f}x")
    assert result["mode"] == "trace" and result["max_abs_diff"] <= 1e-4 and Path("model.pt").is_file()

    generator = ModelCardGenerator()
    card = generator.generate(model_name="my-gpt2-wikitext", model=trained_model, training_results=results,
                              dataset_name="wikitext-2-raw-v1", vocab_size=50257, description="GPT-2 trained on WikiText",
                              output_path="MODEL_CARD.md")
    assert card.startswith("---\nlibrary_name: transformers") and "GPT-2 trained on WikiText" in card
    assert "- Dataset: wikitext-2-raw-v1" in card


# ---------------------------------------------------------------------- UI
def test_config_presets(capsys):
    presets = ConfigPresets()
    presets.print_all_presets()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["tiny", "small", "medium", "large", "code_generation", "chat",
                                                 "summarization"]
    config = presets.get("small")
    print(config.description)
    print(config.estimated_time_hours)
    assert config.estimated_time_hours == 4.0 and config.model_params == 125_000_000
    custom = presets.customize("small", max_epochs=10, batch_size=32)
    assert (custom.max_epochs, custom.batch_size, custom.learning_rate) == (10, 32, config.learning_rate)
    preset_name = presets.get_recommendation(goal="learning", time_budget_hours=5.0)
    assert preset_name == "small"
    assert presets.get_recommendation(goal="research", time_budget_hours=13) == "medium"
    with pytest.raises(ValueError, match="^bogus: not a preset field"):
        presets.customize("small", bogus=1)


def test_recommend_from_model_size_and_hardware():
    from acceltrain.presets import recommend

    r = recommend(124_000_000, device_memory_gib=24.0, num_devices=1)
    assert (r.preset, r.accelerate_config, r.gradient_checkpointing, r.mixed_precision) == (
        "small", "accelerate_configs/single_gpu.yaml", False, "bf16")
    r = recommend(1_000_000_000, device_memory_gib=24.0, num_devices=8)  # 14.9 GiB of state: 62% of one GPU
    assert (r.preset, r.accelerate_config, r.gradient_checkpointing) == ("large", "accelerate_configs/ddp.yaml", True)
    r = recommend(7_000_000_000, device_memory_gib=80.0, num_devices=8)  # 104 GiB: FSDP2 over 8
    assert r.accelerate_config == "accelerate_configs/fsdp2.yaml" and "13.0 GiB each" in r.reason
    r = recommend(7_000_000_000, device_memory_gib=24.0, num_devices=1)
    assert r.accelerate_config == "accelerate_configs/deepspeed_zero3_offload.yaml"
    r = recommend(10_000_000, num_devices=0, task="summarization")
    assert (r.preset, r.accelerate_config, r.batch_size, r.gradient_accumulation_steps) == (
        "summarization", "accelerate_configs/cpu.yaml", 8, 4)


def test_setup_wizard_and_the_preset_workflows(wikitext, monkeypatch, capsys):
    your_model = _gpt2(96)
    wizard = SetupWizard()
    answers = iter([wikitext, "1", "", "", "64"])  # dataset, max_epochs, (batch_size), (learning_rate), max_length
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    config = wizard.run(model=your_model, interactive=True, preset="small")
    assert config.to_dict()["dataset"] == wikitext and config.preset.max_epochs == 1 and config.preset.max_length == 64
    quick = wizard.quick_setup(model=your_model, preset="small", dataset_name=wikitext)
    wizard.print_config(quick)
    assert f"dataset                  {wikitext}" in capsys.readouterr().out
    is_valid, errors = wizard.validate_config(quick)
    assert is_valid and errors == []
    assert wizard.validate_config(wizard.quick_setup(preset="tiny")) == (False, ["dataset_name: not set"])
    coordinator = TrainingCoordinator()
    results = coordinator.train(model=your_model, **config.to_dict())  # Interactive Setup, as written
    assert results["trainer"].config.epochs == 1 and Path(results["best_model_path"]).is_dir()
    # Using Presets: the seed passes no dataset (its default is a Hub one): a local file is added here.
    presets = ConfigPresets()
    config = presets.get("tiny")
    coordinator = TrainingCoordinator(output_dir="./preset_run")
    results = coordinator.train(model=_gpt2(96), dataset=wikitext, **{**config.to_dict(), "max_length": 64})
    assert results["trainer"].config.learning_rate == 5e-4 and results["trainer"].config.warmup_ratio == 0.05


# ---------------------------------------------------------------------- Testing
def test_test_tiers(capsys):
    from acceltrain.compat.transformer_builder import run_all_tests, run_all_tier1_tests, run_all_tier2_tests

    model, config = _gpt2(96), {"vocab_size": 96, "max_seq_len": 16}
    tier1 = run_all_tier1_tests(model, config)
    assert list(tier1) == ["shape_robustness", "gradient_flow", "output_stability", "parameter_initialization",
                           "memory_footprint", "inference_speed"] and all(r["passed"] for r in tier1.values())
    assert tier1["shape_robustness"]["output_shapes"] == {"1x2": (1, 2, 96), "2x8": (2, 8, 96), "3x16": (3, 16, 96)}
    assert tier1["memory_footprint"]["parameter_mib"] == pytest.approx(
        sum(p.numel() * 4 for p in model.parameters()) / 2**20)
    tier2 = run_all_tier2_tests(model, config)
    assert tier2["feature_attribution"]["passed"] and len(tier2["feature_attribution"]["attribution_per_position"]) == 16
    assert tier2["input_perturbation"]["relative_output_change"] > 0
    assert tier2["attention_patterns"]["passed"] and tier2["attention_patterns"]["layers"] == 1
    everything = run_all_tests(model, {**config, "tier3_steps": 5})
    assert list(everything) == ["tier1", "tier2", "tier3"]
    assert list(everything["tier3"]) == ["fine_tuning_loop", "hyperparameter_search", "glue_benchmark"]
    out = capsys.readouterr().out
    assert "PASS gradient_flow" in out and "SKIP glue_benchmark (needs config['tokenizer']" in out
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))  # a broken model fails the checks
    broken = run_all_tier1_tests(model, config)
    assert not broken["parameter_initialization"]["passed"] and not broken["output_stability"]["passed"]


def test_test_tier3_trains_copies(tmp_path):
    from datasets import Dataset, DatasetDict

    from acceltrain.compat.transformer_builder import run_all_tier3_tests

    model = _gpt2(96)
    before = [p.detach().clone() for p in model.parameters()]
    config = {"vocab_size": 96, "max_seq_len": 16, "tier3_steps": 20}
    tier3 = run_all_tier3_tests(model, config)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))  # copies were trained
    ft = tier3["fine_tuning_loop"]
    assert ft["passed"] and ft["loss_after"] < ft["loss_before"] and ft["steps"] == 20
    hp = tier3["hyperparameter_search"]
    losses = hp["final_loss_per_lr"]
    assert list(losses) == [1e-4, 1e-3, 1e-2] and hp["best_learning_rate"] == min(losses, key=losses.get)
    assert losses[1e-2] < losses[1e-4] < hp["loss_before"]  # 20 updates: the larger LR fits more
    assert hp["passed"] and tier3["hyperparameter_search"]["loss_before"] == pytest.approx(ft["loss_before"])
    assert tier3["glue_benchmark"]["skipped"] and "needs config['tokenizer']" in tier3["glue_benchmark"]["reason"]

    # GLUE from the Hub: offline here, so it says so instead of guessing
    tokenizer = CharacterLevelTokenizer(vocab_size=96, texts=["abcdefgh ", "x"])
    offline = run_all_tier3_tests(model, {**config, "tier3_steps": 1, "tokenizer": tokenizer.hf})["glue_benchmark"]
    assert offline["skipped"] and offline["task"] == "sst2" and "'nyu-mll/glue'" in offline["reason"]

    # a local GLUE-shaped DatasetDict (sst2's columns): the probe separates "aaaa" from "bbbb" sentences
    def split(n):
        return Dataset.from_dict({"sentence": [("a" if i % 2 else "b") * (4 + i % 5) for i in range(n)],
                                  "label": [i % 2 for i in range(n)]})

    glue = DatasetDict({"train": split(64), "validation": split(20)})
    result = run_all_tier3_tests(model, {**config, "tier3_steps": 1, "tokenizer": tokenizer.hf, "glue_data": glue,
                                         "glue_epochs": 30})["glue_benchmark"]
    assert result["passed"] and result["majority_baseline"] == 0.5 and result["accuracy"] == 1.0
    assert (result["train_examples"], result["validation_examples"]) == (64, 20)
    with pytest.raises(ValueError, match="^glue_task must be one of"):
        run_all_tier3_tests(model, {**config, "glue_task": "squad"})


# ---------------------------------------------------------------------- errors and tips
def test_error_handling_as_documented(wikitext):
    model = _gpt2(96)
    with pytest.raises(ValueError, match="invalid_dataset"):
        train_model(model=model, dataset="invalid_dataset")
    with pytest.raises(ValueError, match="^dataset: give a file, folder, Hub dataset name or Dataset"):
        train_model(model=model, batch_size=8)  # the Performance Tips' calls name no dataset
    with pytest.raises(DataError, match="^tokenizer: 50257 tokens, but the model embeds only 96"):
        train_model(model=model, dataset=wikitext, vocab_size=50257)
