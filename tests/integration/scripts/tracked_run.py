"""A tiny recipe on ``RecipeTrainer`` + ``TrainingConfig`` that stops itself at a chosen step, for
the tracker-resume tests. Every recipe flag works (``--report_to``, ``--run_name``, ``--resume`` ...).

Usage: tracked_run.py [recipe flags] ; env STOP_AT=K STOP_HOW=sigterm|crash stops the run after step K
(``sigterm``: a real SIGTERM to itself, saved and exit 143; ``crash``: an exception, nothing saved).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook  # noqa: E402
from acceltrain.config import exit_on_user_error, parse_config  # noqa: E402
from acceltrain.recipe_kit import RecipeTrainer, TrainingConfig  # noqa: E402


@dataclass
class TrackedConfig(TrainingConfig):
    """A linear model on fixed data."""


def _data(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.linspace(-1, 1, 8).unsqueeze(1))


class StopAt(BaseHook):
    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_after_step(self, trainer):
        if trainer.step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: the step boundary saves
            else:
                raise RuntimeError(f"crash after step {trainer.step}")


class TrackedTrainer(RecipeTrainer):
    def __init__(self, cfg: TrackedConfig):
        super().__init__(cfg, **cfg.trainer_kwargs())

    def build_data_loader(self):
        return torch.utils.data.DataLoader(_data(256), batch_size=self.cfg.batch_size, shuffle=True)

    def build_eval_data_loader(self):
        return torch.utils.data.DataLoader(_data(40, seed=1), batch_size=16)

    def build_model(self):
        torch.manual_seed(self.cfg.seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(self.device)

    def build_hooks(self):
        stop = [StopAt(int(os.environ["STOP_AT"]), os.environ.get("STOP_HOW", "sigterm"))] \
            if os.environ.get("STOP_AT") else []
        return self.standard_hooks(extra=stop)

    def forward(self, input):
        x, y = input
        return nn.functional.mse_loss(self.model(x), y), {}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrackedConfig, argv, prog="tracked_run.py")
    cfg.validate_training()
    trainer = TrackedTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
