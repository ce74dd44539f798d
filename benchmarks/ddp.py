"""Two gloo processes: BaseTrainer against a hand-written DDP loop with no_sync, same work.

    python benchmarks/ddp.py [--repeats 3] [--steps 150] [--out benchmarks/results/ddp.json]

Each measurement is a fresh ``torchrun --nproc_per_node 2`` (CPU ranks, gloo, one thread per
rank), interleaved over repeats, for gradient accumulation 1 and 4. Both loops train the same
MLP on the same per-rank batches with AdamW and clipping at 1.0; the hand-written loop wraps
the model in DDP itself and runs every micro-batch but the last under ``no_sync``. A DDP
communication hook counts gradient all-reduces: per optimizer step it must equal DDP's bucket
count, whatever the accumulation. Reports steps/s (median), the ratio, and all-reduces/step.

    python benchmarks/ddp.py --ab [--pairs 300] [--chunk 1]

runs both loops in the same two processes instead (the trainer's Accelerator creates the
process group, the hand-written DDP model shares it) and alternates chunks of steps in ABBA
order, so the machine's drift between runs (10-20% here) cannot move the ratio; the trainer's
steps run through ``trainer.run_step()``, what ``train()`` runs in its loop. A control run
puts a second hand-written loop in the trainer's place (A/A): its distance from 1.0 is what
the harness cannot resolve. Writes ``ddp_ab.json``.

    python benchmarks/ddp.py --two_nodes [--repeats 3]

runs the BaseTrainer row (accumulation 1) as 2 processes on one node (``torchrun
--nproc_per_node 2``) and as a 2-node SLURM job with one process per node (``srun -N 2`` of
``torchrun --nnodes 2 --node_rank $SLURM_NODEID --master_addr n1``, the two-node cluster of
``.ci/slurm-up.sh``), interleaved. Both "nodes" are this machine and talk over loopback, so
the ratios show what the launch (an allocation, srun, a rendezvous across nodes) costs, not
network speed. Writes ``ddp_two_nodes.json``.
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
from typing import Any

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


def bucket_count(model) -> int:
    """DDP's gradient buckets after its first-iteration rebuild, from its own logging data."""
    data = model._get_ddp_logging_data()
    sizes = data["rebuilt_bucket_sizes"] if data.get("has_rebuilt_buckets") else data["bucket_sizes"]
    return len(str(sizes).split(","))


def count_python_all_reduces(counter: list[int]) -> None:
    """Count every ``torch.distributed.all_reduce`` call (the counting comm hook's bucket
    all-reduces go through it too: subtract those to get the others)."""
    import torch

    real = torch.distributed.all_reduce

    def all_reduce(*args, **kwargs):
        counter[0] += 1
        return real(*args, **kwargs)

    torch.distributed.all_reduce = all_reduce


def raw_loop(accum: int, counter: list[int]):
    """The hand-written DDP loop on the default process group: returns its one-step function."""
    import torch
    import torch.nn.functional as F

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

    def step() -> None:
        for micro in range(accum):
            x, y = next(it)
            ctx = model.no_sync() if micro < accum - 1 else torch.enable_grad()
            with ctx:
                (F.cross_entropy(model(x), y) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.ddp = model
    return step


def make_trainer(accum: int, steps: int, hooks: list):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from acceltrain import BaseTrainer

    class MLP(BaseTrainer):
        def build_data_loader(self):
            return torch.utils.data.DataLoader(make_data(), batch_size=BATCH, shuffle=True, drop_last=True)

        def build_model(self):
            return make_model()

        def build_optimizer(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

        def build_hooks(self):
            return hooks

        def forward(self, input):
            x, y = input
            return F.cross_entropy(self.model(x), y), {}

    return MLP(max_steps=steps, gradient_accumulation_steps=accum, grad_clip=1.0, device="cpu", data_seed=0)


def worker(impl: str, accum: int, steps: int, warmup: int) -> dict[str, float] | None:
    import torch

    torch.set_num_threads(1)
    counter, other = [0], [0]
    if impl == "raw":
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
        step = raw_loop(accum, counter)
        count_python_all_reduces(other)
        for i in range(steps):
            if i == warmup:
                counter[0], other[0], start = 0, 0, time.perf_counter()
            step()
        seconds = time.perf_counter() - start
        buckets = bucket_count(step.ddp)
        torch.distributed.destroy_process_group()
    else:
        from acceltrain import BaseHook

        marks: dict[str, float] = {}

        class Clock(BaseHook):
            def on_before_train(self, trainer):
                trainer.model.register_comm_hook(None, counting_hook(counter))

            def on_after_step(self, trainer):
                if trainer.step == warmup:
                    counter[0], other[0], marks["start"] = 0, 0, time.perf_counter()
                if trainer.step == steps:
                    marks["end"] = time.perf_counter()

        trainer = make_trainer(accum, steps, [Clock()])
        count_python_all_reduces(other)
        trainer.train()
        rank = trainer.accelerator.process_index
        seconds = marks["end"] - marks["start"]
        buckets = bucket_count(trainer.model)
        trainer.close()
    timed = steps - warmup
    if rank != 0:
        return None
    return {"steps_per_s": timed / seconds, "allreduces_per_step": counter[0] / timed, "buckets": buckets,
            "other_allreduces_per_step": (other[0] - counter[0]) / timed}


def worker_ab(accum: int, pairs: int, chunk: int, warmup: int, control: bool) -> dict[str, Any] | None:
    """Both loops in the same two processes, on the same process group, alternating ``chunk``
    steps in ABBA order: the machine's drift between runs cannot move this ratio. ``control``:
    a second hand-written loop in the trainer's place (A/A), the harness's own resolution."""
    import torch

    torch.set_num_threads(1)
    trainer = make_trainer(accum, 10**9, [])
    trainer.build()  # initialises the process group; train() is on_before_train, then run_step()
    trainer.call_hooks("on_before_train")
    at_counter, raw_counter, python_all_reduces = [0], [0], [0]
    raw_step = raw_loop(accum, raw_counter)
    if control:
        other = raw_loop(accum, at_counter)
        other_ddp = other.ddp
    else:
        trainer.model.register_comm_hook(None, counting_hook(at_counter))
        other, other_ddp = trainer.run_step, trainer.model
    count_python_all_reduces(python_all_reduces)

    def timed(step, n: int) -> float:
        torch.distributed.barrier()  # both ranks start the chunk together
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t0

    timed(raw_step, warmup)
    timed(other, warmup)
    at_counter[0] = raw_counter[0] = python_all_reduces[0] = 0
    raw_t, at_t = [], []
    for i in range(pairs):
        order = [(raw_step, raw_t), (other, at_t)]
        for step, times in order if i % 2 == 0 else order[::-1]:
            times.append(timed(step, chunk))
    rank = trainer.accelerator.process_index
    buckets = bucket_count(raw_step.ddp), bucket_count(other_ddp)
    trainer.close()
    if rank != 0:
        return None
    ratios = [r / a for r, a in zip(raw_t, at_t, strict=True)]
    n = pairs * chunk
    return {"raw_steps_per_s": n / sum(raw_t), "acceltrain_steps_per_s": n / sum(at_t),
            "ratio_total": sum(raw_t) / sum(at_t), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
            "raw_allreduces_per_step": raw_counter[0] / n, "acceltrain_allreduces_per_step": at_counter[0] / n,
            "raw_buckets": buckets[0], "acceltrain_buckets": buckets[1],
            "other_allreduces_per_step": (python_all_reduces[0] - raw_counter[0] - at_counter[0]) / n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def two_nodes(args: argparse.Namespace, env: dict[str, str]) -> None:
    """The 2-process single-node row against the 2-node row (one process per node)."""
    worker_args = ["--worker", "acceltrain", "1", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    runs: dict[str, list[dict]] = {"one_node": [], "two_nodes": []}
    for _ in range(args.repeats):
        for row in runs:
            if row == "one_node":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={free_port()}", __file__, *worker_args]
            else:
                inner = ('exec "$0" -m torch.distributed.run --nnodes 2 --node_rank "$SLURM_NODEID" --nproc_per_node 1 '
                         f'--master_addr n1 --master_port {free_port()} "$@"')
                cmd = ["srun", "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "bash", "-c", inner,
                       sys.executable, __file__, *worker_args]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            wall = time.perf_counter() - t0
            result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            runs[row].append({**result, "wall_s": wall})
    summary = {row: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for row, rows in runs.items()}
    one, two = summary["one_node"], summary["two_nodes"]
    print(f"BaseTrainer, 2 gloo ranks, MLP {DIM}-{HIDDEN}-{HIDDEN}-10, batch {BATCH}/rank, accumulation 1, "
          f"{args.steps - args.warmup} timed steps, median of {args.repeats}. Both nodes are this machine "
          "(loopback): the ratios show launch and rendezvous overhead, not network speed.")
    print(f"{'row':>28} {'steps/s':>9} {'wall s (launch to exit)':>24}")
    print(f"{'1 node x 2 processes':>28} {one['steps_per_s']:9.1f} {one['wall_s']:24.1f}")
    print(f"{'2 nodes x 1 process (SLURM)':>28} {two['steps_per_s']:9.1f} {two['wall_s']:24.1f}")
    print(f"2 nodes / 1 node: steps/s {two['steps_per_s'] / one['steps_per_s']:.3f}x, "
          f"wall time {two['wall_s'] / one['wall_s']:.3f}x (+{two['wall_s'] - one['wall_s']:.1f} s)")
    out = args.out.with_name(args.out.stem + "_two_nodes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ab", action="store_true",
                    help="instead: both loops in the same two processes, alternating chunks (ABBA)")
    ap.add_argument("--pairs", type=int, default=300, help="with --ab: chunk pairs")
    ap.add_argument("--chunk", type=int, default=1, help="with --ab: steps per chunk")
    ap.add_argument("--two_nodes", action="store_true",
                    help="instead: 2 processes on one node against a 2-node SLURM job (needs .ci/slurm-up.sh)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp.json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] in ("ab", "ab_control"):
            result = worker_ab(int(args.worker[1]), args.pairs, args.chunk, args.warmup, args.worker[0] == "ab_control")
        else:
            result = worker(args.worker[0], int(args.worker[1]), args.steps, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if args.two_nodes:
        two_nodes(args, env)
        return
    if args.ab:
        results = {}
        print(f"2 gloo ranks, MLP {DIM}-{HIDDEN}-{HIDDEN}-10, batch {BATCH}/rank, both loops in one torchrun job, "
              f"{args.pairs} ABBA pairs of {args.chunk} step(s); control: the hand-written loop against a second "
              "copy of itself (A/A)")
        print(f"{'accumulation':>12} {'arm':>11} {'raw steps/s':>12} {'other':>8} {'total':>7} {'median':>7} "
              f"{'pairs':>13} {'bucket all-reduces/step raw, other (buckets)':>44} {'other all-reduces/step':>23}")
        for accum in (1, 4):
            for arm in ("acceltrain", "control"):
                r = results[f"{arm}@{accum}"] = torchrun(
                    ["--worker", "ab" if arm == "acceltrain" else "ab_control", str(accum), "--pairs",
                     str(args.pairs), "--chunk", str(args.chunk), "--warmup", str(args.warmup)], env)
                print(f"{accum:>12} {arm:>11} {r['raw_steps_per_s']:12.1f} {r['acceltrain_steps_per_s']:8.1f} "
                      f"{r['ratio_total']:7.3f} {r['ratio_median']:7.3f} {r['ratio_min']:6.3f}..{r['ratio_max']:.3f} "
                      f"{r['raw_allreduces_per_step']:>30.2f}, {r['acceltrain_allreduces_per_step']:.2f} "
                      f"({r['raw_buckets']}, {r['acceltrain_buckets']}) {r['other_allreduces_per_step']:23.2f}")
        met = all(min(results[f"acceltrain@{a}"]["ratio_total"], results[f"acceltrain@{a}"]["ratio_median"]) >= 0.97
                  for a in (1, 4))
        print(f"target acceltrain >= 0.97x at both accumulations (total and median): {'OK' if met else 'MISSED'}")
        exact = all(r["raw_allreduces_per_step"] == r["raw_buckets"] and
                    r["acceltrain_allreduces_per_step"] == r["acceltrain_buckets"] for r in results.values())
        print(f"target gradient all-reduces per optimizer step == DDP's bucket count, whatever the accumulation: "
              f"{'OK' if exact else 'MISSED'} (other all-reduces: the trainer's one per-step agreement of loss "
              "counts and stop requests)")
        out = args.out.with_name(args.out.stem + "_ab.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for accum in (1, 4):
            for impl in ("raw", "acceltrain"):
                runs.setdefault(f"{impl}@{accum}", []).append(torchrun(
                    ["--worker", impl, str(accum), "--steps", str(args.steps), "--warmup", str(args.warmup)], env))
    summary = {key: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for key, rows in runs.items()}
    print(f"2 gloo ranks, MLP {DIM}-{HIDDEN}-{HIDDEN}-10, batch {BATCH}/rank, {args.steps - args.warmup} timed steps, "
          f"median of {args.repeats}")
    print(f"{'accumulation':>12} {'impl':>11} {'steps/s':>9} {'x raw':>7} {'bucket all-reduces/step':>24} "
          f"{'buckets':>8} {'other all-reduces/step':>23}")
    for accum in (1, 4):
        raw = summary[f"raw@{accum}"]["steps_per_s"]
        for impl in ("raw", "acceltrain"):
            row = summary[f"{impl}@{accum}"]
            print(f"{accum:>12} {impl:>11} {row['steps_per_s']:9.1f} {row['steps_per_s'] / raw:7.3f} "
                  f"{row['allreduces_per_step']:24.2f} {row['buckets']:8.0f} {row['other_allreduces_per_step']:23.2f}")
    exact = all(r["allreduces_per_step"] == r["buckets"] for rows in runs.values() for r in rows)
    print(f"target gradient all-reduces per optimizer step == DDP's bucket count: {'OK' if exact else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")

if __name__ == "__main__":
    main()
