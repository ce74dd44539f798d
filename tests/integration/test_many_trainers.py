"""Several trainers in one Python process, as a notebook or a settings sweep builds them.

The suite's autouse fixture resets Accelerate's singletons before every test, which would hide
the defect this file is about, so the scenario runs in a fresh interpreter with no fixture.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT
from tests.helpers import run_step_dir

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from acceltrain import BaseTrainer, CheckpointingHook

    class Tiny(BaseTrainer):
        def build_data_loader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 8, generator=g)
            y = (x[:, 0] > 0).long()
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                               generator=torch.Generator().manual_seed(1))

        def build_model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(8, 2)

        def build_optimizer(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

        def forward(self, batch):
            self.micro_batches = getattr(self, "micro_batches", 0) + 1
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y), {}

        def build_hooks(self):
            return [CheckpointingHook(interval=2)]

    out = {}
    runs = [("bf16", "bf16", 1), ("none", None, 1), ("bf16_acc", "bf16", 2)]
    for name, precision, acc in runs:
        t = Tiny(max_steps=4, mixed_precision=precision, gradient_accumulation_steps=acc,
                 workspace=sys.argv[1] + "/" + name, device="cpu")
        t.train()
        out[name] = {"precision": t.accelerator.mixed_precision, "step": t.step,
                     "micro_batches": t.micro_batches,
                     "weight": t.model.weight.detach().flatten().tolist()}
    # Resume the first run (bf16) to step 6 from its checkpoint, still in the same process.
    t = Tiny(max_steps=6, mixed_precision="bf16", workspace=sys.argv[1] + "/bf16", device="cpu")
    t.train()
    out["resumed"] = {"precision": t.accelerator.mixed_precision, "step": t.step}
    print(json.dumps(out))
    """
)


def test_three_trainers_and_a_resume_in_one_process(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bf16"]["precision"] == "bf16"
    assert out["none"]["precision"] == "no"
    assert out["bf16_acc"]["precision"] == "bf16"
    assert [out[k]["step"] for k in ("bf16", "none", "bf16_acc")] == [4, 4, 4]
    assert [out[k]["micro_batches"] for k in ("bf16", "none", "bf16_acc")] == [4, 4, 8]
    # bf16 autocast changes the arithmetic: the fp32 run must not have run under bf16.
    assert out["bf16"]["weight"] != out["none"]["weight"]
    assert out["resumed"] == {"precision": "bf16", "step": 6}
    assert run_step_dir(tmp_path / "bf16", 6).is_dir()
