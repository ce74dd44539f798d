"""One command for a GPU machine: the CUDA tests, tokens/s and MFU against a raw loop, host
syncs per step, and the time a checkpoint save blocks training. Prints a table and writes JSON.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget_s 450]
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.json   # the same code, tiny, on CPU
    bash benchmarks/gpu_check.sh                                         # on the GPU machine

1. ``pytest -m gpu tests/gpu`` in a subprocess (counts of passed/failed/skipped, failures named).
2. The pretraining recipe's step (``trainer.run_step()``, every hook included) against a
   nanoGPT-style raw loop (autocast, fused AdamW, clip, schedule, pinned non-blocking batches;
   ``torch.compile`` of the whole model when compiled) in one process, alternating chunks in
   ABBA order as ``throughput.py --ab`` does, with ``torch.cuda.synchronize()`` around each
   chunk: ``124m`` and ``350m`` at seq 1024 in bf16, eager and compiled (the recipe's
   ``--compile``: each transformer block). MFU against the datasheet peak and a measured
   bf16 matmul peak.
3. Host syncs on a quiet step and on a logging step of the recipe: counted by
   ``torch.cuda.set_sync_debug_mode("warn")`` on CUDA, by counting tensor reads on the CPU.
4. ``save_checkpoint(background=True)`` of the 124m run: how long training is blocked
   (serialisation, device-to-host copies included) and how long until the folder is complete.

Without CUDA every part that needs it is listed under ``skipped`` with the reason. A time
budget (``--budget_s``) skips what no longer fits, also listed, so the command ends in time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402
from throughput import load_recipe, recipe_args  # noqa: E402

SCHEMA = 1
SECTIONS = ("pytest_gpu", "throughput", "host_syncs", "checkpoint")
TARGETS = {"compiled_124m_vs_raw": 0.98, "mfu_124m_compiled": 0.45, "quiet_step_syncs": 0}
_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class Budget:
    """Seconds left of ``--budget_s``; a part that needs more is skipped, not started."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------- 1. pytest -m gpu
def run_pytest(budget: Budget, tmp: Path, in_process: bool = False) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu``: in a subprocess (a crashing CUDA test cannot take this run
    down), or in this process for the CPU smoke run, where every test skips and a second
    interpreter would only import torch again."""
    xml = tmp / "gpu_tests.xml"
    timeout = max(30.0, min(300.0, budget.left() - 120))
    pytest_args = ["-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    t0 = time.perf_counter()
    if in_process:
        import pytest

        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            exit_code, output = int(pytest.main(pytest_args)), ""
        finally:
            os.chdir(cwd)
    else:
        try:
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            proc = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path})
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"pytest -m gpu ran past {timeout:.0f} s"}
        exit_code, output = proc.returncode, proc.stdout[-500:] + proc.stderr[-500:]
    seconds = time.perf_counter() - t0
    if not xml.exists():
        return {"status": "failed", "reason": f"pytest exited {exit_code}: {output}"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append(f"{name}: {(node.get('message') or '').splitlines()[0][:200] if node.get('message') else tag}")
        node = case.find("skipped")
        if node is not None:
            skipped.append(f"{name}: {node.get('message', '')[:120]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"status": "ran", "exit_code": exit_code, "seconds": round(seconds, 1), "passed": passed,
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "failures": failed, "skips": sorted(set(s.split(": ", 1)[1] for s in skipped))}


# ----------------------------------------------------------------------------- shared set-up
def _corpus(tmp: Path) -> Path:
    """A small plain-text corpus for the CPU smoke run (.txt: read without ``datasets``)."""
    rng = random.Random(0)
    words = "the trainer saves loads a model each rank steps its gradients the sampler resumes".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "." for _ in range(400)]
    path = tmp / "corpus.txt"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _recipe_trainer(spec: dict[str, Any], tmp: Path, name: str, log_interval: int = 20):
    """The pretraining recipe's trainer, built and prepared (``train()`` minus its loop)."""
    from acceltrain.config import parse_config

    recipe = load_recipe()
    ns = argparse.Namespace(steps=10**6, model_size=spec["preset"], seq_len=spec["seq_len"],
                            batch_size=spec["batch_size"])
    argv = recipe_args(ns, tmp / name) + ["--log_interval", str(log_interval), "--mixed_precision",
                                          spec["precision"], "--compile", str(spec["compiled"]).lower(),
                                          *spec.get("extra", [])]
    trainer = recipe.PretrainTrainer(parse_config(recipe.PretrainConfig, argv))
    trainer.build()
    trainer.call_hooks("on_before_train")
    return trainer


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raw_loop(trainer, compiled: bool):
    """nanoGPT's training step on the recipe's pieces: the same initial weights (built again
    from the recipe's seed, never compiled in place), AdamW groups, schedule, data and precision."""
    import torch

    from acceltrain.recipe_kit import adamw_with_decay_groups, warmup_cosine

    cfg, device = trainer.cfg, trainer.device
    saved, cfg.compile = cfg.compile, False
    model = trainer.build_model()
    cfg.compile = saved
    model.load_state_dict(trainer.unwrapped_model.state_dict())
    if compiled:
        model = torch.compile(model)
    opt = adamw_with_decay_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)
    loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         pin_memory=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if trainer.mixed_precision == "bf16"
                else contextlib.nullcontext())
    params = [p for p in model.parameters() if p.requires_grad]

    def epochs():
        while True:
            yield from loader

    batches = epochs()

    def step() -> None:
        batch = next(batches)
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def measured_matmul_peak(device, seconds: float = 1.0) -> float | None:
    """bf16 matmul FLOP/s measured on this GPU (8192^3 products), the practical ceiling."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        _sync(device)
        n += 10
    return 2 * 8192**3 * n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- 2. throughput
def ab_row(spec: dict[str, Any], tmp: Path, peaks: dict[str, float | None], keep: bool = False) -> dict[str, Any]:
    """One preset and mode: the recipe's step against the raw loop, ABBA chunks in one process."""
    trainer = _recipe_trainer(spec, tmp, f"{spec['preset']}_{'compiled' if spec['compiled'] else 'eager'}")
    device = trainer.device
    raw_step = _raw_loop(trainer, spec["compiled"])

    def timed(step, n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    timed(raw_step, spec["warmup"])  # compilation and caches happen here, untimed
    timed(trainer.run_step, spec["warmup"])
    warmup_s = time.perf_counter() - t0
    raw_t, rec_t = [], []
    for i in range(spec["pairs"]):
        order = [(raw_step, raw_t), (trainer.run_step, rec_t)]
        for step, times in order if i % 2 == 0 else order[::-1]:
            times.append(timed(step, spec["chunk"]))
    tokens = spec["pairs"] * spec["chunk"] * spec["batch_size"] * spec["seq_len"]
    raw_tps, rec_tps = tokens / sum(raw_t), tokens / sum(rec_t)
    fpt = trainer.flops_per_token
    row = {"preset": spec["preset"], "mode": "compiled" if spec["compiled"] else "eager",
           "precision": spec["precision"], "seq_len": spec["seq_len"], "batch_size": spec["batch_size"],
           "pairs": spec["pairs"], "chunk": spec["chunk"], "warmup_s": round(warmup_s, 1),
           "params": trainer.n_params, "flops_per_token": fpt,
           "raw_tokens_per_s": raw_tps, "recipe_tokens_per_s": rec_tps,
           "ratio_total": rec_tps / raw_tps,
           "ratio_median": statistics.median(r / a for r, a in zip(raw_t, rec_t, strict=True))}
    for key, peak in peaks.items():
        row[f"recipe_mfu_{key}"] = rec_tps * fpt / peak if peak else None
        row[f"raw_mfu_{key}"] = raw_tps * fpt / peak if peak else None
    if device.type == "cuda":
        import torch

        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if keep:
        return row, trainer
    _release(trainer)
    return row


def _release(trainer) -> None:
    import gc

    import torch

    trainer.model = trainer.optimizer = trainer.unwrapped_optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- 3. host syncs
@contextlib.contextmanager
def _count_reads(device):
    """Yield a list that collects one entry per host sync (CUDA) or tensor read (CPU)."""
    import torch

    seen: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
        return
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counting(name, original):
        def wrapper(tensor, *args, **kwargs):
            seen.append(name)
            return original(tensor, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_syncs(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Syncs on steps 5-8 of the recipe with log_interval 4: 5, 6, 7 are quiet, 8 logs."""
    trainer = _recipe_trainer(spec, tmp, "syncs", log_interval=4)
    for _ in range(4):  # epoch start, optimizer state, compilation: outside the count
        trainer.run_step()
    per_step = {}
    for _ in range(4):
        with _count_reads(trainer.device) as seen:
            trainer.run_step()
        per_step[trainer.step] = list(seen)
    _release(trainer)
    quiet = [len(per_step[s]) for s in (5, 6, 7)]
    return {"status": "ran", "method": ("torch.cuda.set_sync_debug_mode('warn')" if trainer.device.type == "cuda"
                                        else "patched Tensor.item/cpu/tolist/numpy/bool/float/int/index"),
            "preset": spec["preset"], "quiet_step": max(quiet), "quiet_steps": quiet,
            "logging_step": len(per_step[8]), "logging_step_reads": per_step[8][:10]}


# ----------------------------------------------------------------------------- 4. checkpoint
def checkpoint_block(trainer, tmp: Path) -> dict[str, Any]:
    from acceltrain.checkpoint import save_checkpoint

    device = trainer.device
    _sync(device)
    t0 = time.perf_counter()
    handle = save_checkpoint(trainer, tmp / "checkpoints", background=True)
    _sync(device)
    blocked = time.perf_counter() - t0
    handle.wait()
    complete = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in handle.folder.rglob("*") if f.is_file())
    return {"status": "ran", "preset": trainer.cfg.model_size, "blocked_s": blocked, "complete_s": complete,
            "size_gib": size / 2**30}


# ----------------------------------------------------------------------------- driver
def plan(cpu_smoke: bool, cuda: bool, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """The throughput rows, the sync-count run, and what is skipped before starting."""
    if cuda:
        rows = [{"preset": preset, "seq_len": 1024, "batch_size": batch, "precision": "bf16", "compiled": compiled,
                 "warmup": 8, "pairs": 10, "chunk": 4}
                for preset, batch in (("124m", 16), ("350m", 8)) for compiled in (False, True)]
        syncs = {"preset": "124m", "seq_len": 1024, "batch_size": 16, "precision": "bf16", "compiled": False}
        return rows, syncs, []
    tiny = ["--d_model", "32", "--n_heads", "2", "--n_layers", "2", "--d_ff", "64", "--vocab_size", "300",
            "--dataset", str(_corpus(tmp)), "--warmup_steps", "2"]
    base = {"preset": "tiny", "seq_len": 32, "batch_size": 4, "precision": "no", "compiled": False, "extra": tiny,
            "warmup": 1, "pairs": 2, "chunk": 1}
    if not cpu_smoke:
        return [], base, ["throughput: no CUDA device (--cpu-smoke runs the same code on the tiny preset)",
                          "checkpoint: no CUDA device"]
    return [base], base, ["throughput/compiled: the CPU smoke run skips inductor compilation (minutes on a small CPU)",
                          "throughput/124m, 350m: the CPU smoke run measures the tiny preset only"]


def targets(result: dict[str, Any]) -> dict[str, Any]:
    rows = {(r["preset"], r["mode"]): r for r in result["throughput"].get("rows", [])}
    compiled = rows.get(("124m", "compiled"))
    syncs = result["host_syncs"]
    return {
        "compiled_124m_vs_raw >= 0.98": None if compiled is None else
        min(compiled["ratio_total"], compiled["ratio_median"]) >= TARGETS["compiled_124m_vs_raw"],
        "mfu_124m_compiled >= 0.45": None if compiled is None or compiled.get("recipe_mfu_datasheet") is None else
        compiled["recipe_mfu_datasheet"] >= TARGETS["mfu_124m_compiled"],
        "quiet_step_syncs == 0": None if syncs.get("status") != "ran" or syncs.get("method", "").startswith("patched")
        else syncs["quiet_step"] == TARGETS["quiet_step_syncs"],
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"gpu_check ({result['mode']}) on {result['device']}: {result['seconds']:.0f} s")
    tests = result["pytest_gpu"]
    if tests.get("status") == "ran":
        print(f"pytest -m gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
              f"({tests['seconds']} s)")
        for line in tests["failures"]:
            print(f"  FAILED {line}")
    rows = result["throughput"].get("rows", [])
    if rows:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        print(format_table(
            ["preset/mode", "raw tok/s", "recipe tok/s", "total x", "median x", "MFU (sheet)", "MFU (matmul)"],
            [[f"{r['preset']} {r['mode']}", f"{r['raw_tokens_per_s']:,.0f}", f"{r['recipe_tokens_per_s']:,.0f}",
              f"{r['ratio_total']:.3f}", f"{r['ratio_median']:.3f}", pct(r.get("recipe_mfu_datasheet")),
              pct(r.get("recipe_mfu_measured"))] for r in rows]))
    syncs = result["host_syncs"]
    if syncs.get("status") == "ran":
        print(f"host syncs ({syncs['method']}): quiet step {syncs['quiet_step']}, logging step {syncs['logging_step']}")
    ckpt = result["checkpoint"]
    if ckpt.get("status") == "ran":
        print(f"checkpoint ({ckpt['preset']}, {ckpt['size_gib']:.2f} GiB): training blocked {ckpt['blocked_s']:.2f} s, "
              f"complete {ckpt['complete_s']:.2f} s")
    for name, met in result["targets"].items():
        print(f"target {name}: {'not measured' if met is None else 'met' if met else 'MISSED'}")
    for line in result["skipped"]:
        print(f"skipped: {line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    ap.add_argument("--budget_s", type=float, default=420.0, help="skip parts that would end past this")
    ap.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                    help="run everything that applies on the CPU, tiny and quick (the CI test of this script)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="parts not to run")
    args = ap.parse_args()
    import torch

    started = time.monotonic()
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    result: dict[str, Any] = {"schema": SCHEMA, "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "machine": machine_info(),
                              "targets_wanted": TARGETS, "skipped": [], "complete": False}

    def save() -> None:  # after every part: a run stopped by its timeout still leaves what it measured
        result["seconds"] = time.monotonic() - started
        result["targets"] = targets(result)
        write_json(args.out, _finite(result))

    if not cuda and not args.cpu_smoke:
        result["skipped"].append("no CUDA device: the CUDA parts are skipped")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("ACCELTRAIN_CACHE", str(tmp / "cache"))
        rows, sync_spec, skipped = plan(args.cpu_smoke, cuda, tmp)
        result["skipped"] += skipped
        for name in SECTIONS:
            result[name] = {"status": "skipped", "reason": "--skip"} if name in args.skip else {}

        if "pytest_gpu" not in args.skip:
            result["pytest_gpu"] = run_pytest(budget, tmp, in_process=args.cpu_smoke)
            save()
        if "host_syncs" not in args.skip:
            result["host_syncs"] = host_syncs(sync_spec, tmp)
            save()
        from acceltrain.models import device_peak_flops

        peaks = {"datasheet": device_peak_flops(device, torch.bfloat16) if cuda else None,
                 "measured": measured_matmul_peak(device)}
        if args.cpu_smoke:  # the CPU's measured matmul rate stands in for both
            peaks = {"datasheet": None, "measured": device_peak_flops(device, torch.float32)}
        result["peak_flops"] = peaks
        done, trainer_for_ckpt = [], None
        if "throughput" not in args.skip:
            for i, spec in enumerate(rows):
                # a compiled 350m row needs about two minutes: do not start what cannot finish
                need = 30 if args.cpu_smoke else (150 if spec["preset"] == "350m" else 90)
                if budget.left() < need:
                    result["skipped"].append(f"throughput/{spec['preset']} {'compiled' if spec['compiled'] else 'eager'}: "
                                             f"time budget ({budget.left():.0f} s left of {args.budget_s:.0f})")
                    continue
                if i == 0 and "checkpoint" not in args.skip:
                    row, trainer_for_ckpt = ab_row(spec, tmp, peaks, keep=True)
                    result["checkpoint"] = checkpoint_block(trainer_for_ckpt, tmp)
                    _release(trainer_for_ckpt)
                else:
                    row = ab_row(spec, tmp, peaks)
                done.append(row)
                result["throughput"] = {"status": "ran", "rows": done}
                save()
            result["throughput"] = {"status": "ran" if done else "skipped", "rows": done}
        if not result["checkpoint"]:
            result["checkpoint"] = {"status": "skipped", "reason": "no throughput row ran"}
    result["complete"] = True
    save()
    print_table(result)
    print(f"wrote {args.out}")
    tests = result["pytest_gpu"]
    return 1 if tests.get("status") == "failed" or tests.get("failed") else 0


def _finite(value: Any) -> Any:
    """JSON without NaN/inf (strict parsers refuse them): those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
