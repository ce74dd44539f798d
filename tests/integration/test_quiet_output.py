"""A default CPU run of recipes/pretrain.py prints acceltrain's lines only: no DeepSpeed line (it
prints one when it is merely installed), no third-party progress bar, unless --log_level debug.
Its export carries the training curves and a table of the final metrics in its model card."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
# Model and data small enough to run in seconds; everything else is the recipe's default.
SMALL = ["--d_model", "32", "--n_heads", "2", "--n_layers", "2", "--d_ff", "64", "--seq_len", "32", "--batch_size", "4",
         "--vocab_size", "300", "--log_interval", "1", "--eval_interval", "2", "--save_interval", "2",
         "--sample_tokens", "4", "--warmup_steps", "1"]
THIRD_PARTY = ("DeepSpeed", "Setting accelerator", "real_accelerator", "Writing model shards", "Loading weights", "it/s]")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("quiet")
    rng = random.Random(0)
    words = ["the", "trainer", "saves", "a", "checkpoint", "loads", "every", "shard", "rank", "steps"]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) for _ in range(120)]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "docs.jsonl", folder / "cache"


def pretrain(out: Path, corpus: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELTRAIN_CACHE": str(corpus[1]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--output_dir", str(out),
                           "--dataset", str(corpus[0]), *SMALL, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_a_default_run_prints_only_acceltrain_lines_and_its_card_shows_the_curves(tmp_path, corpus):
    pytest.importorskip("deepspeed")  # DeepSpeed's line appears where it is installed: the case to check
    proc = pretrain(tmp_path / "run", corpus, "--max_steps", "2")
    assert proc.stderr == ""
    for line in proc.stdout.splitlines():
        assert line.startswith(("pretrain: ", "Step ", "Eval ", "Saved ", "Sample: ")), line
    assert not [word for word in THIRD_PARTY if word in proc.stdout]

    final = tmp_path / "run" / "final"
    assert (final / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (final / "README.md").read_text()
    assert "## Training curves" in card and "](curves.png)" in card
    last = {k: v for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            for k, v in json.loads(line).items()}
    assert f"| eval/loss | 2 | {last['eval/loss']:.6g} |" in card and f"| loss | 2 | {last['loss']:.6g} |" in card


def test_log_level_debug_lets_third_party_output_through(tmp_path, corpus):
    pytest.importorskip("deepspeed")
    proc = pretrain(tmp_path / "run", corpus, "--max_steps", "1", "--log_level", "debug")
    both = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" in both and "Loading weights" in both  # what the default run hides
