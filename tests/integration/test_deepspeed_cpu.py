"""DeepSpeed ZeRO-2/3 through the trainer on 2 CPU ranks: the same parameters as DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install '.[deepspeed]')")
SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_check.py"
pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(SCRIPT, "ddp", str(out))
    return json.loads((out / "ddp.json").read_text())["params"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_ddp_with_accumulation_clipping_and_schedule(tmp_path, ddp, stage):
    # No ACCELERATE_USE_CPU: with it Accelerate picks MULTI_CPU and ignores the DeepSpeed plugin.
    torchrun(SCRIPT, f"ds{stage}", str(tmp_path), env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "false"})
    result = json.loads((tmp_path / f"ds{stage}.json").read_text())
    assert result["engine"] == "DeepSpeedEngine" and result["world"] == 2
    for name, values in ddp.items():
        torch.testing.assert_close(torch.tensor(result["params"][name]), torch.tensor(values), atol=1e-5, rtol=0)


def test_checkpointing_under_deepspeed_is_refused_before_training(tmp_path):
    proc = torchrun(SCRIPT, "ds2-checkpoint", str(tmp_path), check=False,
                    env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "false"})
    assert proc.returncode != 0
    assert "error: CheckpointingHook does not support DeepSpeed yet: use FSDP2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
