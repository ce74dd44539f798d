"""Run under `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=true): DDP checks for the trainer.

Usage: ddp_check.py MODE OUT_DIR [--accum K] [--no-sync-off]
       ddp_check.py cases OUT_DIR     (every check of CASES in one launch, into OUT_DIR/NAME/)
Each rank writes OUT_DIR/rank{r}.json with its final parameters and what it counted.
Mode ``records`` then runs a second trainer that only rank 1 signals (see ``export_after_signal``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, NonFiniteError  # noqa: E402
from tests.helpers import EvalTrainer, ToyTrainer  # noqa: E402


class CountAllReduces(BaseHook):
    """Counts gradient all-reduces through a DDP communication hook."""

    def __init__(self):
        self.count = 0

    def on_before_train(self, trainer):
        def hook(state, bucket):
            self.count += 1
            return default_hooks.allreduce_hook(None, bucket)

        trainer.model.register_comm_hook(state=None, hook=hook)


class KeepInfo(BaseHook):
    def __init__(self):
        self.infos = []

    def on_after_step(self, trainer):
        info = trainer.step_info
        self.infos.append({"retries": info["non_finite_retries"], "skipped": info["skipped_batches"],
                           "lr": info["lr"][0], "loss": info["loss"].item()})


class NaNOnRank(ToyTrainer):
    def __init__(self, rank_nan, at, **kw):
        super().__init__(**kw)
        self.rank_nan, self.at, self.seen = rank_nan, at, 0

    def forward(self, input):
        loss, rec = super().forward(input)
        if self.accelerator.process_index == self.rank_nan and (self.at is None or self.seen in self.at):
            loss = loss * float("nan")
        self.seen += 1
        return loss, rec


class GainHolder(torch.nn.Identity):
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))


class NaNInIgnoredParam(ToyTrainer):
    """A parameter DDP does not reduce (``_ddp_params_and_buffers_to_ignore``) gets a NaN
    gradient on rank 1 only at forward 4: only the trainer's own agreement can see it. (It sits
    in a submodule: DDP in torch 2.13 mis-names ignored parameters of the root module.)"""

    def build_model(self):
        model = torch.nn.Sequential(*super().build_model(), GainHolder())
        model._ddp_params_and_buffers_to_ignore = ["3.gain"]
        return model

    def forward(self, input):
        loss, rec = super().forward(input)
        self.seen = getattr(self, "seen", 0) + 1
        if self.accelerator.process_index == 1 and self.seen == 4:
            loss = loss + self.unwrapped_model[3].gain * float("nan")  # NaN reaches gain's gradient only
        return loss, rec


def export_after_signal(out: Path) -> dict:
    """SIGTERM on rank 1 alone after step 2, with ExportHook placed before CheckpointingHook:
    no rank may export (and none may wait in a collective the others never join)."""
    import os
    import signal

    from acceltrain import CheckpointingHook, ExportHook

    class SignalRank1(BaseHook):
        def on_after_step(self, trainer):
            if trainer.step == 2 and trainer.accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = ToyTrainer(max_steps=6, batch_size=4, n=128, device="cpu", workspace=str(out / "signalled"),
                         hooks=[SignalRank1(), ExportHook(), CheckpointingHook(interval=100)])
    code = None
    try:
        trainer.train()
    except SystemExit as e:
        code = e.code
    return {"step": trainer.step, "exit": code, "stopped_by_signal": trainer.stopped_by_signal,
            "exported": (out / "signalled" / "final").exists()}


MODES = ["equiv", "nan", "nan_exhaust", "eval", "items", "guard", "none_last", "records", "nan_ignored"]
# Mode ``cases``: every check below in one launch (one process group, a trainer after another),
# each into OUT/NAME/: the interpreter and process-group start-ups are paid once, not 11 times.
# The failing ones run after the healthy ones, ``records`` (which signals rank 1) last.
CASES = [("equiv_1", "equiv", 1, False), ("equiv_3", "equiv", 3, False), ("equiv_3_sync", "equiv", 3, True),
         ("nan", "nan", 2, False), ("nan_ignored", "nan_ignored", 2, False), ("eval", "eval", 1, False),
         ("items", "items", 2, False), ("guard", "guard", 2, False), ("nan_exhaust", "nan_exhaust", 2, False),
         ("none_last", "none_last", 2, False), ("records", "records", 1, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=[*MODES, "cases"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--no-sync-off", action="store_true")
    args = ap.parse_args()
    if args.mode == "cases":
        for name, mode, accum, no_sync_off in CASES:
            run_case(argparse.Namespace(mode=mode, out=args.out / name, accum=accum, no_sync_off=no_sync_off))
        return
    if run_case(args):
        sys.exit(3)


def run_case(args: argparse.Namespace) -> str | None:
    """One check; each rank writes ``args.out/rank{r}.json``. Returns the error it ended in, if any."""
    counter, keep = CountAllReduces(), KeepInfo()
    common = dict(max_steps=4, gradient_accumulation_steps=args.accum, batch_size=4, n=128,
                  no_sync_accumulate=not args.no_sync_off, hooks=[counter, keep], device="cpu")
    if args.mode == "equiv":
        trainer = ToyTrainer(**common)
    elif args.mode == "items":
        from tests.unit.test_trainer import TokenTrainer

        trainer = TokenTrainer(**{**common, "batch_size": 2})
    elif args.mode == "guard":
        from acceltrain import GuardHook

        class SpikeOnRank1(ToyTrainer):
            def forward(self, input):
                loss, rec = super().forward(input)
                self.calls = getattr(self, "calls", 0) + 1
                if self.accelerator.process_index == 1 and self.calls == 13:  # step 7, micro-batch 1
                    loss = loss * 1e4
                return loss, rec

        guard = GuardHook(spike_threshold=10, min_history_len=3, state_update_interval=4, skips_before_rollback=0)
        trainer = SpikeOnRank1(**{**common, "max_steps": 10, "hooks": [counter, keep, guard]})
        trainer.guard = guard
    elif args.mode == "none_last":
        class NoneOnLast(ToyTrainer):
            def forward(self, input):
                self.calls = getattr(self, "calls", 0) + 1
                return (None, {}) if self.calls % 2 == 0 else super().forward(input)

        trainer = NoneOnLast(**common)
    elif args.mode == "records":
        from acceltrain import LoggingHook

        class RankRecords(ToyTrainer):
            # Records differ by rank: a key only rank 1 returns, and a value per rank.
            def forward(self, input):
                loss, rec = super().forward(input)
                rank = self.accelerator.process_index
                return loss, {**rec, "rank_plus_one": float(rank + 1), **({"only_rank1": 2.0} if rank else {})}

        logging = LoggingHook(interval=2, tensorboard=False)
        trainer = RankRecords(**{**common, "hooks": [counter, keep, logging], "workspace": str(args.out / "ws")})
    elif args.mode == "eval":
        trainer = EvalTrainer(**common)
    elif args.mode == "nan":
        trainer = NaNOnRank(1, {3}, max_non_finite_grad_retries=2, scheduler=True, **common)
    elif args.mode == "nan_ignored":
        trainer = NaNInIgnoredParam(max_non_finite_grad_retries=2, scheduler=True, **common)
    else:
        trainer = NaNOnRank(1, None, max_non_finite_grad_retries=2, **common)
    error = None
    try:
        trainer.train()
    except (NonFiniteError, ValueError) as e:
        error = str(e)
    rank = trainer.accelerator.process_index
    metrics = trainer.evaluate() if args.mode == "eval" else None
    signalled = export_after_signal(args.out) if args.mode == "records" else None
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "step": trainer.step,
        "allreduces": counter.count,
        "infos": keep.infos,
        "error": error,
        "metrics": metrics,
        "guard_events": getattr(getattr(trainer, "guard", None), "events", None),
        "signalled": signalled,
        "params": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    return error


if __name__ == "__main__":
    main()
