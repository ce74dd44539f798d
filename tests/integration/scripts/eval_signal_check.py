"""Run under `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=true): SIGTERM to rank 0 during an
evaluation, and the resumed run.

Usage: eval_signal_check.py ref|cut|resume OUT_DIR
Each rank writes OUT_DIR/<mode>_rank{r}.json: evaluation history, losses, evaluation batches run, exit code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, CheckpointingHook, EvaluationHook  # noqa: E402
from tests.helpers import EvalTrainer  # noqa: E402


class Losses(BaseHook):
    def __init__(self):
        self.losses = []

    def on_after_step(self, trainer):
        self.losses.append([trainer.step, trainer.step_info["loss"].item()])


class Signalled(EvalTrainer):
    def __init__(self, signal_at, **kw):
        super().__init__(**kw)
        self.signal_at, self.seen = signal_at, []

    def evaluation_step(self, batch):
        self.seen.append([self.step, self.eval_batch_idx])
        if self.accelerator.process_index == 0 and (self.step, self.eval_batch_idx) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank only, as a preemption may arrive
        return super().evaluation_step(batch)


mode, out = sys.argv[1], Path(sys.argv[2])
folder = out / ("ref" if mode == "ref" else "run")
ev, losses = EvaluationHook(interval=3), Losses()
trainer = Signalled((3, 1) if mode == "cut" else None, max_steps=6, batch_size=8, n=128, optimizer="adamw",
                    hooks=[CheckpointingHook(interval=3, background=False, path=folder / "ckpt"), ev, losses])
code = 0
try:
    trainer.train()
except SystemExit as e:
    code = e.code
rank = trainer.accelerator.process_index
(out / f"{mode}_rank{rank}.json").write_text(json.dumps({
    "history": ev.history, "losses": losses.losses, "seen": trainer.seen, "code": code,
    "params": [p.detach().flatten().tolist() for p in trainer.unwrapped_model.parameters()]}))
trainer.close()
