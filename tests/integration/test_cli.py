"""The acceltrain command: --version, env, train (with and without --config), generate, evaluate, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import ckpt_root, cli_error, cli_run
from tests.integration.test_pretrain import TINY, make_corpus


def cli(*args: str, expect: int = 0, env: dict | None = None, module: str = "acceltrain.cli",
        timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`acceltrain train --config` on a recipe YAML: the tiny pretraining run the other tests use."""
    root = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(root / "docs.jsonl")
    config = root / "run.yaml"
    config.write_text(f"recipe: pretrain\ndataset: {corpus}\noutput_dir: {root / 'run'}\nmax_steps: 20\n")
    proc = cli("train", "--config", str(config), *TINY, env={"ACCELTRAIN_CACHE": str(root / "cache")})
    assert "Saved" in proc.stdout
    return root


def test_version_and_env():
    from acceltrain import __version__

    assert cli("--version").stdout.strip() == f"acceltrain {__version__}"
    out = cli("env").stdout
    for name in ("torch", "accelerate", "transformers", "peft", "datasets", "deepspeed", "torch threads",
                 "accelerate launch view"):
        assert name in out


def test_generate_greedy_is_deterministic(trained, capsys):
    args = ["generate", "--model", str(trained / "run" / "final"), "--prompt", "the trainer", "--temperature", "0",
            "--max_new_tokens", "10"]
    first, second = cli_run(capsys, *args)[0], cli_run(capsys, *args)[0]
    assert first == second and first.startswith("the trainer") and len(first.strip()) > len("the trainer")


def test_evaluate_reports_perplexity(trained, capsys, monkeypatch):
    monkeypatch.setenv("ACCELTRAIN_CACHE", str(trained / "cache"))
    out, _ = cli_run(capsys, "evaluate", "--model", str(trained / "run" / "final"), "--dataset",
                     str(trained / "docs.jsonl"), "--seq_len", "32")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] > 10 and 1.0 < result["perplexity"] < 300  # trained: far below the 300-token vocab


def test_generate_sampling_with_a_seed_is_deterministic(trained, capsys):
    args = ["generate", "--model", str(trained / "run" / "final"), "--prompt", "the trainer", "--temperature", "0.9",
            "--top_k", "20", "--top_p", "0.9", "--repetition_penalty", "1.3", "--seed", "123", "--max_new_tokens", "12"]
    first, second = cli_run(capsys, *args)[0], cli_run(capsys, *args)[0]
    assert first == second and first.startswith("the trainer") and len(first.strip()) > len("the trainer")


def test_generate_beam_search(trained, capsys):
    out, _ = cli_run(capsys, "generate", "--model", str(trained / "run" / "final"), "--prompt", "the trainer",
                     "--num_beams", "2", "--max_new_tokens", "8")
    assert out.startswith("the trainer") and len(out.strip()) > len("the trainer")


def _windows_loss(folder, text: str, seq_len: int) -> tuple[int, float]:
    """Windows and mean loss computed here with transformers alone: EOS after the document, full windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(ids) // seq_len
    with torch.no_grad():
        losses = [model(input_ids=x, labels=x).loss.item()
                  for x in (torch.tensor([ids[w * seq_len:(w + 1) * seq_len]]) for w in range(n))]
    return n, sum(losses) / n


@pytest.mark.parametrize("case", ["several windows", "exactly one window"])
def test_evaluate_covers_every_full_window(trained, tmp_path, case, capsys, monkeypatch):
    from transformers import AutoTokenizer

    folder = trained / "run" / "final"
    text = "the trainer saves the state. each rank reduces the loss. a model loads every shard.\n" * (
        6 if case == "several windows" else 1)
    (tmp_path / "eval.txt").write_text(text)
    tokens = len(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False).input_ids) + 1
    seq_len = 16 if case == "several windows" else tokens
    expected_windows, expected_loss = _windows_loss(folder, text, seq_len)
    assert expected_windows == (tokens // 16 if case == "several windows" else 1) and expected_windows >= 1
    monkeypatch.setenv("ACCELTRAIN_CACHE", str(tmp_path / "cache"))
    out, _ = cli_run(capsys, "evaluate", "--model", str(folder), "--dataset", str(tmp_path / "eval.txt"),
                     "--seq_len", str(seq_len), "--batch_size", "3")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] == expected_windows and result["tokens"] == tokens
    assert result["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)


def test_evaluate_on_too_little_text(trained, tmp_path, capsys, monkeypatch):
    (tmp_path / "short.txt").write_text("the trainer")
    monkeypatch.setenv("ACCELTRAIN_CACHE", str(tmp_path / "cache"))
    _, err = cli_run(capsys, "evaluate", "--model", str(trained / "run" / "final"), "--dataset",
                     str(tmp_path / "short.txt"), "--seq_len", "64", expect=2)
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --dataset {tmp_path / 'short.txt'}: "), err
    assert "tokens found, fewer than one window of --seq_len 64" in err[0]


def test_python_dash_m_acceltrain():
    out = cli("--help", module="acceltrain").stdout
    assert out.startswith("usage: acceltrain") and all(c in out for c in ("train", "generate", "evaluate", "env"))


def test_train_help_lists_the_recipe_fields(capsys):
    out, _ = cli_run(capsys, "train", "--help")
    assert out.startswith("usage: acceltrain train") and all(f in out for f in ("--max_steps", "--vocab_size", "--config"))
    out, _ = cli_run(capsys, "train", "--config", str(ROOT / "recipes/configs/classify_stdlib.yaml"), "--help")
    assert "--label_column" in out and "--max_corpus_bytes" not in out  # the recipe the config names


def test_train_without_config_runs_the_default_demo(tmp_path):
    """No --config: the pretraining recipe on its default corpus (the stdlib), shrunk to two steps."""
    out = tmp_path / "run"
    cli("train", "--max_steps", "2", "--output_dir", str(out), "--max_corpus_bytes", "500000", *TINY, timeout=120,
        env={"ACCELTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent", "--prompt", "x"], "--model /nonexistent: not a Hugging Face model folder"),
        (["evaluate", "--model", "/nonexistent", "--dataset", "x.txt"], "not a Hugging Face model folder"),
        (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: config file not found"),
    ],
)
def test_errors_are_one_line_exit_2(args, message, capsys):
    assert message in cli_error(capsys, *args)


def test_train_with_an_unknown_recipe(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: nope\n")
    err = cli_error(capsys, "train", "--config", str(config))
    assert "recipe 'nope' does not exist; known recipes:" in err and "pretrain" in err


def test_lr_find_on_a_recipe_config(tmp_path):
    corpus = make_corpus(tmp_path / "docs.jsonl")
    config = tmp_path / "lr.yaml"
    config.write_text(f"recipe: pretrain\ndataset: {corpus}\noutput_dir: {tmp_path / 'run'}\n")
    out = cli("lr-find", "--config", str(config), "--num_steps", "40", *TINY, env={"ACCELTRAIN_CACHE": str(tmp_path / "cache")}).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith("suggested learning rate: ")
    assert 1e-5 < float(line.split(": ")[1].split()[0]) < 10
    png = (tmp_path / "run" / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not ckpt_root(tmp_path / "run").exists()  # a range test trains nothing for real
