"""The raw loop and BaseTrainer in one process, alternating short chunks of steps: a ratio that
the machine's slow drift cannot move.

``overhead.py`` runs every row in a fresh process (import costs and peak memory stay
separate), but on a VM whole-machine speed drifts by 10-20% between runs minutes apart, which
hides a 1% target. Here one process builds both, the ``raw`` loop of ``overhead.py`` and its
``acceltrain`` row (``BaseTrainer`` with ``ProgressHook`` and ``LoggingHook`` at interval 100),
then alternates chunks of ``--chunk`` steps in ABBA order, so both see the same machine phases
and the same warm caches. Each chunk pair gives a ratio; the table shows their median, the
ratio of total times, and the spread.

The trainer's steps run through ``trainer.run_step()``, exactly what ``train()`` runs in its
loop after ``on_before_train`` (the bookkeeping of ``train()`` itself is per run, not per step).

    python benchmarks/overhead_ab.py                 # gpt case, 12 chunk pairs of 10 steps
    python benchmarks/overhead_ab.py --case mlp --chunk 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from overhead import CASES, GRAD_CLIP, Workload, _default_hooks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="gpt")
    ap.add_argument("--pairs", type=int, default=12, help="chunk pairs (ABBA: each pair is raw+trainer)")
    ap.add_argument("--chunk", type=int, default=10, help="steps per chunk")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead_ab.json")
    args = ap.parse_args()
    case = CASES[args.case]
    torch.set_num_threads(case.threads)
    w = Workload(case=case, steps=args.pairs * args.chunk, warmup=args.warmup, device="cpu")

    # raw: the hand-written loop of overhead.py, one step at a time.
    model = w.build_model()
    optimizer = w.build_optimizer(model)
    loader = w.build_loader(w.build_dataset())

    def epochs() -> Any:  # a new pass over the DataLoader each epoch (itertools.cycle would replay
        while True:       # stored batches and skip the loading the trainer pays for)
            yield from loader

    batches = epochs()

    def raw_step() -> None:
        batch = {k: v.to("cpu", non_blocking=True) for k, v in next(batches).items()}  # as overhead.py's raw row
        loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from acceltrain import BaseTrainer

    class BenchTrainer(BaseTrainer):
        def build_data_loader(self) -> Any:
            return w.build_loader(w.build_dataset())

        def build_model(self) -> torch.nn.Module:
            return w.build_model()

        def build_optimizer(self) -> torch.optim.Optimizer:
            return w.build_optimizer(self.model)

        def build_hooks(self) -> list[Any]:
            return _default_hooks()

        def forward(self, input: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            return self.model(**input)["loss"], {}

    with tempfile.TemporaryDirectory() as tmp:
        trainer = BenchTrainer(max_steps=10**9, grad_clip=GRAD_CLIP, workspace=tmp, device="cpu")
        trainer.build()
        trainer.call_hooks("on_before_train")

        def timed(step: Any, n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            return time.perf_counter() - t0

        timed(raw_step, args.warmup)
        timed(trainer.run_step, args.warmup)
        raw_t, at_t = [], []
        for i in range(args.pairs):
            order = [(raw_step, raw_t), (trainer.run_step, at_t)]
            for step, times in order if i % 2 == 0 else order[::-1]:  # ABBA
                times.append(timed(step, args.chunk))
        for tracker in trainer.accelerator.trackers:  # as train() does at its end
            tracker.finish()
        trainer.close()
    ratios = [r / a for r, a in zip(raw_t, at_t, strict=True)]  # trainer speed / raw speed
    result = {
        "case": case.name, "pairs": args.pairs, "chunk": args.chunk, "threads": torch.get_num_threads(),
        "raw_steps_per_s": args.pairs * args.chunk / sum(raw_t),
        "acceltrain_steps_per_s": args.pairs * args.chunk / sum(at_t),
        "ratio_total": sum(raw_t) / sum(at_t), "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
        "target": case.target,
    }
    print(f"case {case.name}: {args.pairs} ABBA pairs of {args.chunk} steps in one process, {result['threads']} thread(s)")
    print(f"raw {result['raw_steps_per_s']:.2f} steps/s, acceltrain {result['acceltrain_steps_per_s']:.2f} steps/s")
    print(f"acceltrain / raw: total {result['ratio_total']:.4f}x, median of pairs {result['ratio_median']:.4f}x "
          f"(pairs {result['ratio_min']:.3f}..{result['ratio_max']:.3f}); target >= {case.target:.2f}x: "
          f"{'OK' if result['ratio_median'] >= case.target else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
