"""FSDP2 through the trainer on 2 gloo CPU ranks: equals DDP, sharded exact resume, HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.integration.test_resume import N, assert_identical_end

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_check.py"
RESUME = Path(__file__).parent / "scripts" / "resume_run.py"
pytestmark = pytest.mark.multiproc


def test_fsdp2_matches_ddp_over_ten_steps(tmp_path):
    proc = torchrun(SCRIPT, "toy", str(tmp_path / "fsdp"))
    assert "distributed_type FSDP model FSDPSequential" in proc.stdout
    torchrun(SCRIPT, "toy", str(tmp_path / "ddp"), "--ddp")
    fsdp, ddp = (json.loads((tmp_path / name / "params.json").read_text()) for name in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys()
    for name in fsdp:
        torch.testing.assert_close(torch.tensor(fsdp[name]), torch.tensor(ddp[name]), atol=1e-5, rtol=0)


def test_fsdp2_sharded_checkpoint_resumes_bit_identically(tmp_path_factory):
    a = tmp_path_factory.mktemp("fsdp_uninterrupted")
    torchrun(RESUME, str(a), "--max-steps", str(N), "--fsdp")
    b = tmp_path_factory.mktemp("fsdp_interrupted")
    proc = torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp", "--kill-at", "5", check=False)
    assert proc.returncode != 0
    # Signalled after step 5; the ranks agree in step 6's collective and both save step 6.
    folder = b / "checkpoints" / "checkpoint_step_6"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sharded"] is True
    assert {"model_shard_0.safetensors", "model_shard_1.safetensors", "optimizer_shard_0.pt",
            "optimizer_shard_1.pt"} <= set(manifest["files"])
    torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp")
    for rank in (0, 1):
        assert_identical_end(a, b, 6, rank)


def test_fsdp2_export_is_one_safetensors_hf_folder(tmp_path):
    # With fsdp2.yaml's settings: one FSDP unit per decoder layer (plus the root), weights
    # loaded on rank 0 and broadcast (CPU-RAM-efficient loading).
    proc = torchrun(SCRIPT, "hf", str(tmp_path))
    units = next(line for line in proc.stdout.splitlines() if line.startswith("fsdp units")).split()[2:]
    assert units[0] == "FSDPLlamaForCausalLM" and units.count("FSDPLlamaDecoderLayer") == 2, units
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        got = model(input_ids=torch.arange(10).unsqueeze(0)).logits
    torch.testing.assert_close(got, torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=0)
