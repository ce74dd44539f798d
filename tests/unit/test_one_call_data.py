"""``acceltrain.train_model(model=..., dataset=...)``: loaders built from text, the results dict,
real Hugging Face folders, save_top_k and resume_from_checkpoint; bad input named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from acceltrain import train_model
from tests.helpers import BEST, ckpt_root


def _gpt2(vocab: int = 96):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, n_positions=64))


@pytest.fixture
def notes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"note {i}: the cat sat on the mat and looked at the {i % 7} birds." for i in range(40)))
    return path


def test_dataset_form_returns_the_results_dict_and_hf_folders(tmp_path, notes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    results = train_model(model=_gpt2(), dataset=str(notes), vocab_size=96, tokenizer="character", max_epochs=2,
                          batch_size=4, max_length=32, val_split=0.2, save_top_k=1, use_gpu=False, output_dir=out,
                          learning_rate=1e-3)
    assert set(results) == {"best_model_path", "final_metrics", "trainer", "model", "tokenizer"}
    trainer = results["trainer"]
    n_tokens = sum(len(t) + 1 for t in notes.read_text().split("\n\n"))  # one token per character, EOS each
    windows = n_tokens // 32
    train_windows = windows - round(windows * 0.2)
    assert trainer.step == 2 * math.ceil(train_windows / 4) and trainer.device.type == "cpu"
    assert Path(results["best_model_path"]) == (ckpt_root(out) / BEST).resolve()
    assert set(results["final_metrics"]) == {"loss"}
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert len(tok) == 96 and tok.decode(tok("the cat", add_special_tokens=False)["input_ids"]) == "the cat"
    for name, value in results["model"].state_dict().items():
        assert torch.equal(model.state_dict()[name], value)


def test_resume_from_checkpoint(tmp_path, notes):
    first = train_model(model=_gpt2(), dataset=str(notes), tokenizer="character", max_epochs=1, batch_size=4,
                        max_length=32, use_gpu=False, output_dir=tmp_path / "a")
    step = first["trainer"].step
    again = train_model(model=_gpt2(), dataset=str(notes), tokenizer="character", max_epochs=2, batch_size=4,
                        max_length=32, use_gpu=False, output_dir=tmp_path / "b",
                        resume_from_checkpoint=first["best_model_path"])
    hook = next(h for h in again["trainer"].hooks if type(h).__name__ == "CheckpointingHook")
    assert hook.loaded_from == Path(first["best_model_path"]) and again["trainer"].step == 2 * step


@pytest.mark.parametrize("kwargs, message", [
    ({"val_split": 1.5}, r"^val_split must be in \[0, 1\), got 1.5"),
    ({"batch_size": 0}, r"^batch_size must be an int >= 1, got 0"),
    ({"max_length": 1}, r"^max_length must be an int >= 2, got 1"),
    ({"dataset_path": "x.txt"}, r"^dataset / dataset_path: give exactly one"),
    ({"tokenizer": "./missing_tok"}, r"tokenizer folder not found: missing_tok"),
])
def test_bad_input_is_named(tmp_path, notes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_model(model=_gpt2(), dataset=str(notes), max_epochs=1, output_dir=tmp_path / "o", **kwargs)
    assert not ckpt_root(tmp_path / "o").exists()


def test_without_data_or_loader():
    with pytest.raises(ValueError, match="^train_model: give a train_dataloader, or dataset="):
        train_model(_gpt2())
