"""FSDP2 and DeepSpeed ZeRO-2 on one GPU in one process, and the pretraining recipe's --compile
(regional compilation) on CUDA. Each runs in a fresh process: engines keep process-wide state."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, free_port

SCRIPT = ROOT / "tests" / "gpu" / "scripts" / "engine_check.py"


def _run(mode: str, out, env: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the wheels' folder too
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=600)
    assert proc.returncode == 0, f"{mode} exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return torch.load(out / "params.pt", weights_only=True), proc.stdout


def _one_rank() -> dict[str, str]:
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


@pytest.mark.parametrize("engine, distributed_type", [
    ("fsdp2", "FSDP"),
    pytest.param("zero2", "DEEPSPEED", marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install '.[deepspeed]')")),
])
def test_engine_on_one_gpu_matches_the_plain_run(tmp_path, engine, distributed_type):
    plain, _ = _run("plain", tmp_path / "plain")
    env = {**_one_rank(), "ACCELERATE_USE_FSDP" if engine == "fsdp2" else "ACCELERATE_USE_DEEPSPEED": "true"}
    got, stdout = _run(engine, tmp_path / engine, env)
    assert f"distributed_type {distributed_type}" in stdout
    assert got.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)


def test_pretrain_recipe_compile_on_cuda_matches_eager(tmp_path):
    """--compile compiles each transformer block (regional compilation) on CUDA, bf16."""
    from tests.integration.test_pretrain import TINY, losses, make_corpus, run

    corpus = make_corpus(tmp_path / "docs.jsonl")
    cache = tmp_path / "cache"
    common = ["--dataset", str(corpus), "--max_steps", "10", "--mixed_precision", "bf16", *TINY]
    run("--output_dir", str(tmp_path / "eager"), *common, cache=cache, timeout=600)
    proc = run("--output_dir", str(tmp_path / "compiled"), *common, "--compile", "true", cache=cache, timeout=900)
    assert "compiled" in proc.stdout + proc.stderr  # the recipe says what it compiled
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=2e-2)
