"""Two gloo processes: BaseTrainer against a hand-written DDP loop with no_sync, same work.

    python benchmarks/ddp.py [--repeats 3] [--steps 150] [--out benchmarks/results/ddp.json]

Each measurement is a fresh ``torchrun --nproc_per_node 2`` (CPU ranks, gloo, one thread per
rank), interleaved over repeats, for gradient accumulation 1 and 4. Both loops train the same
MLP on the same per-rank batches with AdamW and clipping at 1.0; the hand-written loop wraps
the model in DDP itself and runs every micro-batch but the last under ``no_sync``. A DDP
communication hook counts gradient all-reduces: per optimizer step it must equal DDP's bucket
count, whatever the accumulation. Reports steps/s (median), the ratio, and all-reduces/step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, DIM, HIDDEN = 64, 256, 1024


def make_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def make_data():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * 64, DIM, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :10]).argmax(1))


def counting_hook(counter: list[int]):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        counter[0] += 1
        return default_hooks.allreduce_hook(None, bucket)

    return hook


def worker(impl: str, accum: int, steps: int, warmup: int) -> dict[str, float] | None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    counter = [0]
    if impl == "raw":
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        model.register_comm_hook(None, counting_hook(counter))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sampler = torch.utils.data.DistributedSampler(make_data(), num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(make_data(), batch_size=BATCH, sampler=sampler, drop_last=True)

        def batches():
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from loader
                epoch += 1

        it = batches()
        for step in range(steps):
            if step == warmup:
                counter[0], start = 0, time.perf_counter()
            for micro in range(accum):
                x, y = next(it)
                ctx = model.no_sync() if micro < accum - 1 else torch.enable_grad()
                with ctx:
                    (F.cross_entropy(model(x), y) / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    else:
        sys.path.insert(0, str(ROOT))
        from acceltrain import BaseHook, BaseTrainer

        marks: dict[str, float] = {}

        class Clock(BaseHook):
            def on_before_train(self, trainer):
                trainer.model.register_comm_hook(None, counting_hook(counter))

            def on_after_step(self, trainer):
                if trainer.step == warmup:
                    counter[0], marks["start"] = 0, time.perf_counter()
                if trainer.step == steps:
                    marks["end"] = time.perf_counter()

        class MLP(BaseTrainer):
            def build_data_loader(self):
                return torch.utils.data.DataLoader(make_data(), batch_size=BATCH, shuffle=True, drop_last=True)

            def build_model(self):
                return make_model()

            def build_optimizer(self):
                return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

            def build_hooks(self):
                return [Clock()]

            def forward(self, input):
                x, y = input
                return F.cross_entropy(self.model(x), y), {}

        trainer = MLP(max_steps=steps, gradient_accumulation_steps=accum, grad_clip=1.0, device="cpu", data_seed=0)
        trainer.train()
        rank = trainer.accelerator.process_index
        seconds = marks["end"] - marks["start"]
        trainer.close()
    timed = steps - warmup
    if impl == "raw":
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    return {"steps_per_s": timed / seconds, "allreduces_per_step": counter[0] / timed}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp.json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = worker(args.worker[0], int(args.worker[1]), args.steps, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for accum in (1, 4):
            for impl in ("raw", "acceltrain"):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                       __file__, "--worker", impl, str(accum), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
                runs.setdefault(f"{impl}@{accum}", []).append(json.loads(line))
    summary = {key: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for key, rows in runs.items()}
    print(f"2 gloo ranks, MLP {DIM}-{HIDDEN}-{HIDDEN}-10, batch {BATCH}/rank, {args.steps - args.warmup} timed steps, "
          f"median of {args.repeats}")
    print(f"{'accumulation':>12} {'impl':>11} {'steps/s':>9} {'x raw':>7} {'all-reduces/step':>17}")
    for accum in (1, 4):
        raw = summary[f"raw@{accum}"]["steps_per_s"]
        for impl in ("raw", "acceltrain"):
            row = summary[f"{impl}@{accum}"]
            print(f"{accum:>12} {impl:>11} {row['steps_per_s']:9.1f} {row['steps_per_s'] / raw:7.3f} "
                  f"{row['allreduces_per_step']:17.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
