"""Pretraining throughput: recipes/pretrain.py's training loop against a nanoGPT-style raw loop.

    python benchmarks/throughput.py [--repeats 3] [--steps 60] [--out benchmarks/results/throughput.json]

Same model (the recipe's preset), same packed data and windows, same AdamW groups, schedule,
clipping and precision; each run in its own process, interleaved over repeats; the first
``--warmup`` steps are not timed. Reports tokens/s (median), the ratio to the raw loop, the
share of step time spent waiting for data in the recipe, and peak RSS.

    python benchmarks/throughput.py --ab [--pairs 200] [--chunk 1]

runs the recipe's step (``trainer.run_step()``, what ``train()`` runs in its loop, all hooks
included) and the raw loop in one process, alternating chunks in ABBA order, so the machine's
drift between runs cannot move the ratio; then a control: the raw loop against a second copy
of itself (A/A), whose distance from 1.0 is the harness's own resolution. Writes
``throughput_ab.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib  # noqa: E402


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_recipe", ROOT / "recipes" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def recipe_args(args: argparse.Namespace, out: Path) -> list[str]:
    return ["--output_dir", str(out), "--max_steps", str(args.steps), "--model_size", args.model_size,
            "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--eval_interval", "100000",
            "--save_interval", "100000", "--log_interval", "20", "--sample_tokens", "0", "--overwrite", "true"]


def nanogpt_step(model, opt, sched, batch, grad_clip: float) -> None:
    """The raw loop's step: forward, backward, clip, AdamW, schedule, zero (nanoGPT's order)."""
    import torch

    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def worker(impl: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from acceltrain import BaseHook
    from acceltrain.config import parse_config

    recipe = load_recipe()
    out = Path(args.tmp) / impl
    cfg = parse_config(recipe.PretrainConfig, recipe_args(args, out))
    trainer = recipe.PretrainTrainer(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if impl == "acceltrain":
        marks: dict[str, float] = {}
        data = []

        class Clock(BaseHook):
            def on_after_step(self, trainer):
                if trainer.step == args.warmup:
                    marks["start"] = time.perf_counter()
                elif trainer.step > args.warmup:
                    data.append(trainer.step_info["data_time"] / trainer.step_info["step_time"])
                if trainer.step == cfg.max_steps:
                    marks["end"] = time.perf_counter()

        build = trainer.build_hooks
        # First in the list: the final checkpoint the recipe writes at the last step falls
        # outside the timed window, and every timed step includes the other hooks once.
        trainer.build_hooks = lambda: [Clock(), *build()]
        trainer.train()
        seconds = marks["end"] - marks["start"]
        data_share = statistics.mean(data)
    else:  # nanoGPT-style: the same pieces, no trainer
        trainer.build()  # builds model/optimizer/scheduler/data exactly as the recipe does
        model = trainer.unwrapped_model
        opt = trainer.unwrapped_optimizer
        sched = trainer.unwrapped_scheduler
        loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        it = iter(loader)
        for step in range(cfg.max_steps):
            if step == args.warmup:
                start = time.perf_counter()
            nanogpt_step(model, opt, sched, next(it), cfg.grad_clip)
        seconds = time.perf_counter() - start
        data_share = float("nan")
    steps = cfg.max_steps - args.warmup
    return {"tokens_per_s": steps * tokens_per_step / seconds, "data_share": data_share,
            "peak_rss_gib": peak_rss_mib() / 1024}


def ab(args: argparse.Namespace, control: bool = False) -> dict[str, float]:
    """The recipe's step and the raw loop in one process, alternating ``--chunk`` steps (ABBA):
    the machine's drift between separate runs cannot move this ratio. ``control``: a second
    raw loop (its own copy of the weights, optimizer and loader) in the recipe's place, an A/A
    run whose distance from 1.0 is what this harness cannot resolve."""
    import copy

    import torch

    from acceltrain.config import parse_config
    from acceltrain.recipe_kit import adamw_with_decay_groups, warmup_cosine

    recipe = load_recipe()
    cfg = parse_config(recipe.PretrainConfig, recipe_args(args, Path(args.tmp) / "ab"))
    trainer = recipe.PretrainTrainer(cfg)
    trainer.build()  # train() is on_before_train, then run_step() until done
    trainer.call_hooks("on_before_train")

    def raw_loop():
        model = copy.deepcopy(trainer.unwrapped_model)  # the same weights, trained separately
        opt = adamw_with_decay_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = warmup_cosine(opt, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                              min_lr_ratio=cfg.min_lr_ratio)
        loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=cfg.batch_size, shuffle=True,
                                             drop_last=True)

        def epochs():
            while True:
                yield from loader

        batches = epochs()

        return lambda: nanogpt_step(model, opt, sched, next(batches), cfg.grad_clip)

    raw_step = raw_loop()
    other = raw_loop() if control else trainer.run_step
    # Time spent inside the recipe's hooks, counted only in the timed chunks (overhead.py's
    # wrapper; it reads the window from a clock's t0/t1).
    from types import SimpleNamespace

    from overhead import _time_hook

    window = SimpleNamespace(t0=None, t1=None)
    in_hooks = [_time_hook(hook, window) for hook in trainer.hooks]
    trainer.index_hooks()

    def timed(step, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t0

    timed(raw_step, args.warmup)
    timed(other, args.warmup)
    raw_t, at_t = [], []
    window.t0 = time.perf_counter()
    for i in range(args.pairs):
        order = [(raw_step, raw_t), (other, at_t)]
        for step, times in order if i % 2 == 0 else order[::-1]:
            times.append(timed(step, args.chunk))
    ratios = [r / a for r, a in zip(raw_t, at_t, strict=True)]
    return {"ratio_total": sum(raw_t) / sum(at_t), "ratio_median": statistics.median(ratios),
            "hooks_share": None if control else sum(x[0] for x in in_hooks) / sum(at_t),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "raw_tokens_per_s": args.pairs * args.chunk * cfg.batch_size * cfg.seq_len / sum(raw_t),
            "acceltrain_tokens_per_s": args.pairs * args.chunk * cfg.batch_size * cfg.seq_len / sum(at_t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--model_size", default="tiny")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    ap.add_argument("--ab", action="store_true",
                    help="instead: the recipe's step and the raw loop in one process, alternating chunks (ABBA)")
    ap.add_argument("--pairs", type=int, default=200, help="with --ab: chunk pairs")
    ap.add_argument("--chunk", type=int, default=1, help="with --ab: steps per chunk")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import tempfile

    if args.ab:
        result = {}
        for name, control in (("recipe", False), ("control", True)):
            with tempfile.TemporaryDirectory() as tmp:
                args.tmp, args.steps = tmp, 10**6  # no final checkpoint or end of schedule inside the run
                result[name] = ab(args, control)
        r, c = result["recipe"], result["control"]
        print(f"{args.model_size} preset, batch {args.batch_size} x seq {args.seq_len}, {args.pairs} ABBA pairs of "
              f"{args.chunk} steps in one process: raw {r['raw_tokens_per_s']:,.0f} tokens/s, recipe "
              f"{r['acceltrain_tokens_per_s']:,.0f}")
        print(f"recipe / raw: total {r['ratio_total']:.4f}x, median of pairs {r['ratio_median']:.4f}x "
              f"({r['ratio_min']:.3f}..{r['ratio_max']:.3f}); time in the recipe's hooks "
              f"{100 * r['hooks_share']:.2f}% of its steps; target >= 0.98x: "
              f"{'OK' if min(r['ratio_total'], r['ratio_median']) >= 0.98 else 'MISSED'}")
        print(f"control, raw / a second raw loop (A/A): total {c['ratio_total']:.4f}x, median of pairs "
              f"{c['ratio_median']:.4f}x ({c['ratio_min']:.3f}..{c['ratio_max']:.3f})")
        out = args.out.with_name(args.out.stem + "_ab.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
        return

    impls = ["raw", "acceltrain"]
    results: dict[str, list[dict]] = {k: [] for k in impls}
    with tempfile.TemporaryDirectory() as tmp:
        # Warm the tokenizer/packing cache once so no worker pays for it.
        subprocess.run([sys.executable, __file__, "--worker", "raw", "--tmp", tmp, "--steps", str(args.warmup + 1),
                        "--warmup", "0"], check=True, capture_output=True, env={**os.environ})
        for _ in range(args.repeats):
            for impl in impls:
                cmd = [sys.executable, __file__, "--worker", impl, "--tmp", tmp, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--model_size", args.model_size, "--seq_len", str(args.seq_len),
                       "--batch_size", str(args.batch_size)]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {impl: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for impl, rows in results.items()}
    raw = summary["raw"]["tokens_per_s"]
    print(f"{args.model_size} preset, batch {args.batch_size} x seq {args.seq_len}, {args.steps - args.warmup} timed steps, "
          f"median of {args.repeats}")
    print(f"{'':12} {'tokens/s':>10} {'x raw':>7} {'data wait':>10} {'peak RSS':>9}")
    for impl, row in summary.items():
        share = "" if row["data_share"] != row["data_share"] else f"{100 * row['data_share']:.2f}%"
        print(f"{impl:12} {row['tokens_per_s']:10,.0f} {row['tokens_per_s'] / raw:7.3f} {share:>10} "
              f"{row['peak_rss_gib']:8.2f}G")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
