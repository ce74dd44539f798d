"""Checkpoint cost: save/load time and the time training is blocked, plus resume-time data skipping.

    python benchmarks/checkpoint.py [--repeats 3] [--out benchmarks/results/checkpoint.json]

One process, a GPT-2-small-sized model (124M parameters) with AdamW state (so ~1.5 GB of
state), saved and loaded three ways on the same objects, interleaved over repeats:

- ``torch.save``: ``torch.save({"model": ..., "optimizer": ...})`` / ``torch.load`` + ``load_state_dict``
  (no fsync, no checksum, no atomic rename: the floor);
- ``accelerate``: ``accelerator.save_state`` / ``load_state``;
- ``acceltrain``: ``save_checkpoint(background=True)`` (what CheckpointingHook does): "blocked"
  is until training may continue, "save" until the folder is complete (fsync, CRC32 of every
  file, manifest, rename), "load" is ``load_checkpoint`` with verification.

Then the time to resume the data position at step 10 and at step 10,000 of a 1M-sample
shuffled map-style dataset (batch 32), for acceltrain's resumable sampler and for
Accelerate's ``skip_first_batches`` (which walks the skipped indices).

With ``--resize`` (2 CPU ranks through torchrun, gloo), elastic resume: a checkpoint saved by
2 ranks is loaded (``load_checkpoint``, verification included, the slowest rank timed) on 2
ranks and on 1, under DDP (full tensors either way) and FSDP2 (2 -> 2 reads each rank's own
shards; 2 -> 1 reads every shard and reassembles full tensors: the resharding read), and, when
DeepSpeed is installed, ZeRO-2 (2 -> 1 re-partitions the saved optimizer shards per parameter,
``acceltrain.zero_reshard``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acceltrain import BaseTrainer  # noqa: E402
from acceltrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from acceltrain.checkpoint_names import STEP_GLOB  # noqa: E402


class GPT2Small(BaseTrainer):
    def build_data_loader(self):
        ids = torch.zeros(64, 8, dtype=torch.long)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=1)

    def build_model(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config())  # n_layer 12, n_embd 768, vocab 50257: 124M

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def forward(self, input):
        (ids,) = input
        return self.model(input_ids=ids, labels=ids).loss, {}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_state(repeats: int, root: Path) -> dict[str, dict[str, float]]:
    trainer = GPT2Small(max_steps=1, device="cpu")
    trainer.train()  # one real step: AdamW state (exp_avg, exp_avg_sq) exists
    acc, model, opt = trainer.accelerator, trainer.model, trainer.optimizer
    size = sum(p.numel() for p in model.parameters()) * 4 * 3 / 2**30
    print(f"state: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, ~{size:.2f} GiB with AdamW")
    results: dict[str, dict[str, list[float]]] = {k: {"blocked": [], "save": [], "load": []}
                                                 for k in ("torch.save", "accelerate", "acceltrain")}
    for r in range(repeats):
        for name in results:
            path = root / f"{name}_{r}"
            if name == "torch.save":
                file = path.with_suffix(".pt")

                def save(file=file):
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)

                seconds = timed(save)
                results[name]["blocked"].append(seconds)
                results[name]["save"].append(seconds)

                def load(file=file):
                    state = torch.load(file, weights_only=True)
                    model.load_state_dict(state["model"])
                    opt.load_state_dict(state["optimizer"])

                results[name]["load"].append(timed(load))
                file.unlink()
            elif name == "accelerate":
                seconds = timed(lambda path=path: acc.save_state(str(path)))
                results[name]["blocked"].append(seconds)
                results[name]["save"].append(seconds)
                results[name]["load"].append(timed(lambda path=path: acc.load_state(str(path))))
                shutil.rmtree(path)
            else:
                t0 = time.perf_counter()
                handle = save_checkpoint(trainer, path, background=True)
                results[name]["blocked"].append(time.perf_counter() - t0)
                handle.wait()
                results[name]["save"].append(time.perf_counter() - t0)
                results[name]["load"].append(timed(lambda folder=handle.folder: load_checkpoint(trainer, folder)))
                shutil.rmtree(path)
    trainer.close()
    return {name: {k: statistics.median(v) for k, v in cols.items()} for name, cols in results.items()}


def bench_skip(n: int = 1_000_000, batch: int = 32) -> dict[str, dict[int, float]]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from acceltrain.data_stream import DataPosition

    dataset = torch.utils.data.TensorDataset(torch.arange(n))
    out: dict[str, dict[int, float]] = {"acceltrain": {}, "accelerate skip_first_batches": {}}
    for step in (10, 10_000):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
        position = DataPosition(loader, num_replicas=1, rank=0, seed=0)
        position.start_epoch(0)
        state = {**position.state_dict(), "samples_in_epoch": step * batch}
        state["next_fingerprint"] = None

        def resume_ours(position=position, state=state):
            position.load_state_dict(state)
            next(iter(position.loader))

        out["acceltrain"][step] = timed(resume_ours)
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True)
        prepared = acc.prepare(torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True))
        out["accelerate skip_first_batches"][step] = timed(
            lambda prepared=prepared, acc=acc, step=step: next(iter(acc.skip_first_batches(prepared, step))))
    return out


class GPT2Mini(GPT2Small):
    """GPT-2 with 4 layers and an untied head (~92M parameters: a bigger share of embeddings to reshard)."""

    def build_model(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=4, tie_word_embeddings=False))


def resize_worker(mode: str, folder: Path, out: Path) -> None:
    """One rank of a torchrun job: ``save`` one step's checkpoint, or ``load`` it and time it."""
    import os

    if mode.startswith("fsdp"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers import cpu_fsdp2_accelerator

        placement = {"accelerator": cpu_fsdp2_accelerator()}
    elif mode.startswith("zero"):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        plugin = DeepSpeedPlugin(zero_stage=int(mode[4]))
        placement = {"accelerator": Accelerator(deepspeed_plugin=plugin, step_scheduler_with_optimizer=False,
                                                kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])}
    else:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        placement = {"accelerator": Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])}
    trainer = GPT2Mini(max_steps=1, **placement)
    acc = trainer.accelerator
    if mode.endswith("save"):
        trainer.train()
        save_checkpoint(trainer, folder, background=False)
    else:
        trainer.build()
        acc.wait_for_everyone()
        seconds = torch.tensor([timed(lambda: load_checkpoint(trainer, next(folder.glob(STEP_GLOB))))])
        if acc.num_processes > 1:
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        if acc.is_main_process:
            out.write_text(json.dumps({"seconds": float(seconds), "world": acc.num_processes, "pid": os.getpid()}))
    trainer.close()


def bench_resize(root: Path) -> dict[str, float]:
    import os
    import subprocess

    from tests.conftest import free_port

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # DeepSpeed on CPU ranks: no ACCELERATE_USE_CPU (Accelerate would drop the plugin and run DDP).
    ds_env = {**env, "ACCELERATE_USE_CPU": "false", "ACCELERATE_USE_DEEPSPEED": "true"}

    def launch(nproc: int, mode: str, folder: Path, out: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "--master_addr=127.0.0.1", __file__, "--worker", mode, str(folder),
               str(out)]
        subprocess.run(cmd, check=True, env=ds_env if mode.startswith("zero") else env,
                       cwd=Path(__file__).resolve().parents[1], capture_output=True)

    import importlib.util

    rows: dict[str, float] = {}
    for kind in ("ddp", "fsdp2", *(("zero2",) if importlib.util.find_spec("deepspeed") else ())):
        folder = root / kind
        launch(2, f"{kind}-save", folder, root / "unused.json")
        for world in (2, 1):
            out = root / f"{kind}-{world}.json"
            launch(world, f"{kind}-load", folder, out)
            rows[f"{kind} 2 -> {world}"] = json.loads(out.read_text())["seconds"]
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        resize_worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint.json")
    ap.add_argument("--resize", action="store_true", help="only the elastic-resume rows (2 -> 2 vs 2 -> 1 ranks; DDP, FSDP2, ZeRO-2)")
    args = ap.parse_args()
    if args.resize:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            rows = bench_resize(Path(tmp))
        print(f"{'resume (GPT-2 4 layers untied, AdamW)':32} {'load s':>8} {'x same world':>13}")
        for name, seconds in rows.items():
            same = rows[name.rsplit(" ", 1)[0] + " 2"]
            print(f"{name:32} {seconds:8.2f} {seconds / same:13.2f}")
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        args.out.write_text(json.dumps({**previous, "resize_load_seconds": rows}, indent=1) + "\n")
        print(f"\nwrote {args.out}")
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        state = bench_state(args.repeats, Path(tmp))
    base = state["torch.save"]["blocked"]
    print(f"\n{'':12} {'blocked s':>10} {'x torch.save':>13} {'save s':>8} {'load s':>8}")
    for name, row in state.items():
        print(f"{name:12} {row['blocked']:10.2f} {row['blocked'] / base:13.2f} {row['save']:8.2f} {row['load']:8.2f}")
    skip = bench_skip()
    print(f"\n{'resume data position':32} {'at step 10':>12} {'at step 10,000':>15}")
    for name, row in skip.items():
        print(f"{name:32} {row[10] * 1e3:10.1f}ms {row[10_000] * 1e3:13.1f}ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"state": state, "resume_skip_seconds": skip}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
