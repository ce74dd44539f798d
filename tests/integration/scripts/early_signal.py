"""A run that waits at a chosen point for the test to signal it: while building its data (before
training) or inside its first, long step.

Usage: early_signal.py WORKSPACE --at {build,first-step,recipe-init}

It writes WORKSPACE/READY when it has reached the point and then waits there (up to 60 s, in
short sleeps, as a slow tokenizer or packing loop would) for a signal. ``build``: in
``build_data_loader``, after a cache file was half written through the atomic-write pattern
(temporary name, then rename), which must not leave the final name behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseTrainer, CheckpointingHook  # noqa: E402
from acceltrain.config import exit_on_user_error  # noqa: E402


def wait_for_signal(workspace: Path, trainer: BaseTrainer | None = None) -> None:
    """Sleep until a signal: it raises out of here, or (``trainer``) it asked the trainer to stop."""
    (workspace / "READY").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if trainer is not None and trainer.stop_reason is not None:
            # The signal was received (its handler only set flags). The step goes on as a compile
            # warm-up would, without looking again, and ends; the stop is acted on at its boundary.
            time.sleep(0.5)
            return
        time.sleep(0.01)
    raise RuntimeError("no signal came")


class SlowTrainer(BaseTrainer):
    def __init__(self, at: str, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def build_data_loader(self):
        if self.at == "build":
            final = self.workspace / "packed.bin"
            tmp = final.with_name(".packed.bin.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(b"\0" * 1024)  # half of the cache is written when the signal comes
                    wait_for_signal(self.workspace)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def build_model(self):
        return nn.Linear(4, 1)

    def build_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def build_hooks(self):
        return [CheckpointingHook(interval=100)]

    def forward(self, input):
        if self.at == "first-step" and self.step == 0:
            wait_for_signal(self.workspace, self)  # a compile warm-up inside step 1
        x, y = input
        return nn.functional.mse_loss(self.model(x), y), {}


@exit_on_user_error
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--at", choices=["build", "first-step"], required=True)
    args = ap.parse_args()
    args.workspace.mkdir(parents=True, exist_ok=True)
    SlowTrainer(args.at, max_steps=5, workspace=args.workspace, device="cpu").train()


if __name__ == "__main__":
    main()
