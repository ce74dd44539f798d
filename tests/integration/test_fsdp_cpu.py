"""FSDP2 through the trainer on 2 gloo CPU ranks: equals DDP, sharded exact resume, HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.helpers import run_step_dir
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
    folder = run_step_dir(b, 6)
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
    # classify's --export_best path: an earlier sharded checkpoint's weights, reassembled from both
    # ranks' shards and loaded into the live FSDP2 model, are that step's weights bitwise.
    assert json.loads((tmp_path / "reload.json").read_text()) == {"sharded": True, "step": 4, "names": True,
                                                                  "unequal": []}


# ---------------------------------------------------------------- elastic resume (another world size)
def _assert_loaded_equals_saved_shards(dump: Path, folder: Path) -> None:
    """The full weights and AdamW state as loaded equal the saved shards, concatenated in rank order."""
    from safetensors.torch import load_file

    world = json.loads((folder / "manifest.json").read_text())["world_size"]
    loaded = torch.load(dump, weights_only=True)
    shards = [load_file(folder / f"model_shard_{r}.safetensors") for r in range(world)]
    optim = [torch.load(folder / f"optimizer_shard_{r}.pt", weights_only=True) for r in range(world)]
    assert set(loaded["model"]) == set(shards[0])
    for name, tensor in loaded["model"].items():
        assert torch.equal(tensor, torch.cat([s[name] for s in shards])), name
    assert set(loaded["optimizer"]["state"]) == set(optim[0]["state"])
    for fqn, st in loaded["optimizer"]["state"].items():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(st["step"], optim[0]["state"][fqn]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], torch.cat([o["state"][fqn][key] for o in optim])), (fqn, key)


@pytest.fixture(scope="module")
def fsdp2_no_dropout(tmp_path_factory) -> Path:
    a = tmp_path_factory.mktemp("fsdp2_no_dropout")
    torchrun(RESUME, str(a), "--max-steps", str(N), "--fsdp", "--dropout", "0")
    return a


def test_fsdp2_two_ranks_resume_on_one_from_the_reassembled_shards(fsdp2_no_dropout, tmp_path):
    from tests.integration.test_elastic import assert_close_final, assert_same_stream, steps

    b = tmp_path / "b"
    proc = torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp", "--dropout", "0", "--kill-at", "3",
                    "--kill-rank", "1", check=False)
    assert proc.returncode != 0
    folder = run_step_dir(b, 4)
    proc = torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp", "--dropout", "0", "--dump-loaded",
                    str(b / "loaded.pt"), nproc=1)
    assert ("resumed on 1 process from a 2-process checkpoint at step 4: accumulation 2 -> 4, same 16 samples "
            "per step") in proc.stderr
    _assert_loaded_equals_saved_shards(b / "loaded.pt", folder)
    # The one-rank run is FSDP2 too (it saves shards), and drew the two-rank run's samples.
    later = json.loads((run_step_dir(b, 8) / "manifest.json").read_text())
    assert later["sharded"] is True and later["world_size"] == 1
    assert_same_stream(steps(fsdp2_no_dropout, 2), steps(b, 1), after=4)
    assert_close_final(fsdp2_no_dropout, b)


def test_fsdp2_one_rank_resumes_on_two(fsdp2_no_dropout, tmp_path):
    from tests.integration.test_elastic import assert_close_final, assert_same_stream, steps

    b = tmp_path / "b"
    proc = torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp", "--dropout", "0", "--accum", "4",
                    "--kill-at", "4", nproc=1, check=False)
    assert proc.returncode != 0
    folder = run_step_dir(b, 4)
    proc = torchrun(RESUME, str(b), "--max-steps", str(N), "--fsdp", "--dropout", "0", "--accum", "4",
                    "--dump-loaded", str(b / "loaded.pt"))
    assert ("resumed on 2 processes from a 1-process checkpoint at step 4: accumulation 4 -> 2, same 16 samples "
            "per step") in proc.stderr
    _assert_loaded_equals_saved_shards(b / "loaded.pt", folder)
    assert_same_stream(steps(fsdp2_no_dropout, 2), steps(b, 2), after=4)
    assert_close_final(fsdp2_no_dropout, b)
