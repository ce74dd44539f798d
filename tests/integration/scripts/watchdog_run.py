"""Run under `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=true): a run to kill or hang.

Usage: watchdog_run.py OUT_DIR [--hang_rank R --hang_at S] [--collective_timeout T] [--checkpoints]
Each rank writes OUT_DIR/rank{r}.pid at start, OUT_DIR/rank{r}.step after every step, and
OUT_DIR/rank{r}.json with the error that ended it (if one did).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, CheckpointingHook  # noqa: E402
from tests.helpers import ToyTrainer  # noqa: E402


class Progress(BaseHook):
    def __init__(self, out: Path, rank: int, hang_rank: int | None, hang_at: int | None):
        self.out, self.rank, self.hang_rank, self.hang_at = out, rank, hang_rank, hang_at

    def on_after_step(self, trainer):
        (self.out / f"rank{self.rank}.step").write_text(f"{trainer.step} {time.time()}")
        if self.rank == self.hang_rank and trainer.step == self.hang_at:
            time.sleep(600)  # a peer that hangs: alive, sockets open, never in the next collective
        time.sleep(0.02)  # keep the run going long enough to be killed mid-way


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--hang_rank", type=int)
    parser.add_argument("--hang_at", type=int)
    parser.add_argument("--collective_timeout", type=float, default=60.0)
    parser.add_argument("--checkpoints", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    (args.out / f"rank{rank}.pid").write_text(str(os.getpid()))
    hooks = [Progress(args.out, rank, args.hang_rank, args.hang_at)]
    if args.checkpoints:
        hooks.append(CheckpointingHook(interval=10**6))
    trainer = ToyTrainer(max_steps=100_000, n=1024, hooks=hooks, device="cpu", workspace=args.out / "run",
                         collective_timeout=args.collective_timeout)
    try:
        trainer.train()
    except RuntimeError as e:
        (args.out / f"rank{rank}.json").write_text(json.dumps({"error": str(e), "time": time.time()}))
        raise
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
