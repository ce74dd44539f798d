"""Transformer Builder's PyTorch Lightning lines (seed 002: "UniversalModelAdapter", "Use with
trainer") run as written on :mod:`acceltrain.compat.tb_lightning`, with a tiny GPT-2 built from a
config, a character tokenizer and text made here, on the CPU. Skipped without
``pytorch_lightning`` (``pip install 'acceltrain[lightning]'``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from acceltrain.compat.tb_lightning import AdaptiveTokenizerDataModule, UniversalModelAdapter  # noqa: E402
from acceltrain.compat.transformer_builder import CharacterLevelTokenizer  # noqa: E402
from acceltrain.compat.transformer_builder import UniversalModelAdapter as PlainAdapter  # noqa: E402

from .test_transformer_builder import _gpt2, _paragraphs  # noqa: E402


def test_lightning_fit_generate_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ into the working directory
    from datasets import Dataset

    hf_dataset = Dataset.from_dict({"text": _paragraphs(80)})
    tokenizer = CharacterLevelTokenizer(vocab_size=512, texts=hf_dataset["text"])
    datamodule = AdaptiveTokenizerDataModule(dataset=hf_dataset, tokenizer=tokenizer, batch_size=2, max_length=128,
                                             val_split=0.1, cache_dir=tmp_path / "cache")
    your_model = _gpt2(512)
    before = [p.detach().clone() for p in your_model.parameters()]

    # ---- the seed's lines
    adapter = UniversalModelAdapter(model=your_model, learning_rate=1e-4, vocab_size=50257, warmup_steps=500)
    trainer = pl.Trainer(max_epochs=3)
    trainer.fit(adapter, datamodule)
    start_tokens = torch.tensor([tokenizer.encode("the quick")["input_ids"]])
    text = adapter.generate(input_ids=start_tokens, max_length=100, temperature=0.8)

    assert isinstance(adapter, PlainAdapter) and isinstance(adapter, pl.LightningModule)
    assert isinstance(datamodule, pl.LightningDataModule)
    per_epoch = -(-len(datamodule.train_set) // 2)  # batches of 2 windows
    assert per_epoch >= 3 and trainer.current_epoch == 3 and trainer.global_step == 3 * per_epoch
    assert {"train_loss", "val_loss"} <= set(trainer.logged_metrics)
    assert all(torch.isfinite(v) for v in trainer.logged_metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(your_model.parameters(), before, strict=True))
    # acceltrain's schedule over the run's updates, stepped every update: warmup (clamped to the run)
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step" and adapter.total_steps == trainer.global_step
    warmup = sched.scheduler.lr_lambdas[0].warmup_steps
    assert warmup == trainer.global_step - 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * sched.scheduler.lr_lambdas[0](trainer.global_step))
    assert text.shape == (1, 100) and torch.equal(text[:, :start_tokens.shape[1]], start_tokens)
    ckpt = Path("lightning_logs/version_0/checkpoints") / f"epoch=2-step={trainer.global_step}.ckpt"
    assert ckpt.is_file()  # Lightning's own checkpoint
