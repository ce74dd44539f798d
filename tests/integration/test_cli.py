"""The acceltrain command: --version, env, train --config, generate, evaluate, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.integration.test_pretrain import TINY, make_corpus


def cli(*args: str, expect: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "acceltrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
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


def test_generate_greedy_is_deterministic(trained):
    args = ["generate", "--model", str(trained / "run" / "final"), "--prompt", "the trainer", "--temperature", "0",
            "--max_new_tokens", "10"]
    first, second = cli(*args).stdout, cli(*args).stdout
    assert first == second and first.startswith("the trainer") and len(first.strip()) > len("the trainer")


def test_evaluate_reports_perplexity(trained):
    out = cli("evaluate", "--model", str(trained / "run" / "final"), "--dataset", str(trained / "docs.jsonl"),
              "--seq_len", "32", env={"ACCELTRAIN_CACHE": str(trained / "cache")}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] > 10 and 1.0 < result["perplexity"] < 300  # trained: far below the 300-token vocab


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent", "--prompt", "x"], "--model /nonexistent: not a Hugging Face model folder"),
        (["evaluate", "--model", "/nonexistent", "--dataset", "x.txt"], "not a Hugging Face model folder"),
        (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: config file not found"),
    ],
)
def test_errors_are_one_line_exit_2(args, message):
    err = cli(*args, expect=2).stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_train_with_an_unknown_recipe(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: nope\n")
    err = cli("train", "--config", str(config), expect=2).stderr
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
    assert not (tmp_path / "run" / "checkpoints").exists()  # a range test trains nothing for real
