"""Helpers shared by the benchmarks: thread settings, a step clock, peak memory, worker plumbing.

A benchmark runs each variant in its own fresh interpreter (``run_worker``) so import costs,
Accelerate's process-wide singletons and the resident-set high-water mark do not leak from one
variant into the next. The worker prints one line ``RESULT_PREFIX + json`` on stdout (anything
else the run prints goes to stderr, see ``emit_result``) and the parent parses that line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "BUSY_CPU_SHARE",
    "BUSY_OTHER_CPUS",
    "RESULT_PREFIX",
    "OtherLoad",
    "StepClock",
    "contended",
    "current_rss_mib",
    "emit_result",
    "format_table",
    "machine_info",
    "median",
    "peak_memory_mib",
    "peak_rss_mib",
    "run_measured",
    "run_worker",
    "summarize",
    "thread_env",
    "wait_until_idle",
    "write_json",
]

RESULT_PREFIX = "BENCH_RESULT "

# Every thread-pool knob a CPU math library might read; set them all so no pool oversubscribes.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) pinning every math library to ``threads`` threads."""
    env = dict(os.environ if base is None else base)
    for var in _THREAD_VARS:
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONHASHSEED"] = "0"
    # Nothing in a benchmark should reach the network (and a slow DNS lookup would be timed).
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


class StepClock:
    """Times the steady state: from the end of step ``warmup`` to the end of step ``warmup + steps``.

    Every implementation calls ``mark(step)`` at the same point of its loop (after the step's
    optimizer update and zero_grad, with ``step`` = optimizer updates done so far) and once with
    ``step = 0`` before the first step, so the timed window covers exactly ``steps`` full steps
    everywhere and no setup (imports, building, ``prepare``) or warmup.

    Args:
        warmup: Steps run before the clock starts.
        steps: Steps inside the timed window.
        sync: Called before each reading (``torch.cuda.synchronize`` on a GPU), or None.
    """

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] | None = None) -> None:
        if warmup < 0 or steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
        self.warmup = warmup
        self.steps = steps
        self.last = warmup + steps
        self.sync = sync
        self.t0: float | None = None
        self.t1: float | None = None
        self.cpu0 = self.cpu1 = 0.0

    def mark(self, step: int) -> None:
        """Record the time if ``step`` opens or closes the timed window (cheap otherwise)."""
        if step == self.warmup:
            if self.sync is not None:
                self.sync()
            self.t0 = time.perf_counter()
            self.cpu0 = time.process_time()
        elif step == self.last:
            if self.sync is not None:
                self.sync()
            self.t1 = time.perf_counter()
            self.cpu1 = time.process_time()

    @property
    def elapsed(self) -> float:
        """Seconds spent in the timed window (raises if the loop never closed it)."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(
                f"the timed window was not closed: started={self.t0 is not None}, "
                f"ended={self.t1 is not None} (warmup={self.warmup}, steps={self.steps})"
            )
        return self.t1 - self.t0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.elapsed

    @property
    def cpu_s(self) -> float:
        """Process CPU time (all threads) spent in the window."""
        return self.cpu1 - self.cpu0

    def cpu_share(self, threads: int) -> float:
        """CPU time of this process in the window over ``elapsed * threads``.

        Near 1 when the run had its cores to itself (OpenMP workers spin while they wait); well
        below 1 when something else on the machine took them, and the timing is not to be trusted.
        """
        return self.cpu_s / (self.elapsed * threads)


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` from ``/proc/self/status``. Not ``getrusage``'s ``ru_maxrss``, which keeps the
    peak the process had before ``exec``: a row started by forking the benchmark's parent (which
    holds torch and a model) would report the parent's size. Elsewhere ``ru_maxrss`` (KiB on
    Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_memory_mib(device_type: str) -> tuple[float, str]:
    """This process's peak memory in MiB, and which figure it is.

    On CUDA it is ``torch.cuda.max_memory_allocated`` (``"cuda_max_allocated"``); otherwise the
    peak resident set size (``"peak_rss"``, :func:`peak_rss_mib`), which includes the interpreter
    and every imported library.
    """
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return peak_rss_mib(), "peak_rss"


def current_rss_mib() -> float:
    """The resident set size right now in MiB (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_memory_mib("cpu")[0]


def emit_result(result: dict[str, Any], stream: Any = None) -> None:
    """Print the worker's result as the one line the parent parses."""
    stream = stream if stream is not None else sys.__stdout__
    print(RESULT_PREFIX + json.dumps(result), file=stream, flush=True)


def run_worker(cmd: Sequence[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    """Run one worker process and return the JSON it printed; fail loudly with its stderr if it broke."""
    proc = subprocess.run(
        list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
        raise RuntimeError(
            f"worker {' '.join(cmd)!r} exited with status {proc.returncode} "
            f"and {'a' if lines else 'no'} result line; last lines of its stderr:\n{tail}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy,
    # steal included (a hypervisor neighbour took the core).
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """How many CPUs other processes kept busy while this one and its children ran.

    ``with OtherLoad() as load: run_worker(...)`` then ``load.cpus``: the machine's busy CPU time
    minus this process's children's, over the wall time. A benchmark row that ran while
    ``cpus`` was well above 0 shared its cores (or their hyper-thread siblings) and is suspect.
    ``cpus`` is None where ``/proc/stat`` does not exist.
    """

    def __enter__(self) -> OtherLoad:
        self.cpus: float | None = None
        self._busy0, self._child0, self._t0 = _machine_busy_s(), _children_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, child1, t1 = _machine_busy_s(), _children_cpu_s(), time.perf_counter()
        if self._busy0 is not None and busy1 is not None and t1 > self._t0:
            own = child1 - self._child0
            self.cpus = max(0.0, (busy1 - self._busy0 - own) / (t1 - self._t0))


def wait_until_idle(max_wait_s: float, threshold_cpus: float = 0.15, sample_s: float = 1.0) -> float | None:
    """Sleep until other processes use under ``threshold_cpus`` CPUs (sampled over ``sample_s``).

    Gives up after ``max_wait_s`` and returns the last load seen (None without ``/proc/stat``).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherLoad() as load:
            time.sleep(sample_s)
        if load.cpus is None or load.cpus < threshold_cpus or time.perf_counter() >= deadline:
            return load.cpus


# A run was contended if it got under this share of its cores (process CPU time / wall time /
# threads) or if other processes kept more than this many CPUs busy while it ran.
BUSY_CPU_SHARE = 0.9
BUSY_OTHER_CPUS = 0.15


def contended(run: dict[str, Any]) -> bool:
    """Whether a run (a worker's result with ``cpu_share`` and ``other_cpus``) shared the machine."""
    other = run.get("other_cpus")
    return run["cpu_share"] < BUSY_CPU_SHARE or (other is not None and other > BUSY_OTHER_CPUS)


def run_measured(
    cmd: Sequence[str], env: dict[str, str], *, label: str, timeout: float,
    wait_idle_s: float = 0.0, retries: int = 0,
) -> dict[str, Any]:
    """``run_worker`` watched for other load: optionally wait for quiet first, rerun when contended.

    Returns the worker's result plus ``process_s`` (the worker's whole wall time, imports
    included), ``other_cpus``, ``attempt`` and ``contended``; prints one progress line per attempt
    to stderr.
    """
    for attempt in range(1 + retries):
        if wait_idle_s:
            wait_until_idle(wait_idle_s, BUSY_OTHER_CPUS)
        t0 = time.perf_counter()
        with OtherLoad() as other:
            result = run_worker(cmd, env, timeout)
        result.update(process_s=time.perf_counter() - t0, other_cpus=other.cpus, attempt=attempt)
        result["contended"] = contended(result)
        busy = "" if other.cpus is None else f", other processes {other.cpus:.2f} CPUs"
        print(f"{label} {result['steps_per_s']:9.1f} steps/s (cpu share {result['cpu_share']:.0%}{busy}, "
              f"process {result['process_s']:.1f}s){'  [busy]' if result['contended'] else ''}",
              file=sys.stderr, flush=True)
        if not result["contended"]:
            break
    return result


def summarize(runs: Sequence[dict[str, Any]], impls: Sequence[str], reference: str) -> dict[str, dict[str, Any]]:
    """Per row: medians over the repeats, their spread, and figures relative to ``reference``.

    Each run is a worker's result with ``impl``, ``repeat``, ``steps``, ``steps_per_s``, ``cpu_s``, ``peak_mem_mib``,
    ``mem_kind``, ``train_mem_mib``, ``eval_loss``, ``cpu_share``, ``other_cpus``, ``process_s``.
    """
    by_impl = {impl: [r for r in runs if r["impl"] == impl] for impl in impls}
    ref_sps = median([r["steps_per_s"] for r in by_impl[reference]])
    ref_mem = median([r["peak_mem_mib"] for r in by_impl[reference]])
    ref_by_repeat = {r["repeat"]: r["steps_per_s"] for r in by_impl[reference]}
    ref_cpu = median([r["cpu_s"] / r["steps"] for r in by_impl[reference]])
    summary: dict[str, dict[str, Any]] = {}
    for impl, rs in by_impl.items():
        sps = [r["steps_per_s"] for r in rs]
        med = median(sps)
        mem = median([r["peak_mem_mib"] for r in rs])
        others = [r["other_cpus"] for r in rs if r.get("other_cpus") is not None]
        summary[impl] = {
            "steps_per_s": med,
            "steps_per_s_all": sps,
            "spread": (max(sps) - min(sps)) / med,
            "ratio_to_raw": med / ref_sps,
            "paired_ratios": [r["steps_per_s"] / ref_by_repeat[r["repeat"]] for r in rs],
            "paired_ratio": median([r["steps_per_s"] / ref_by_repeat[r["repeat"]] for r in rs]),
            "overhead_us_per_step": (1.0 / med - 1.0 / ref_sps) * 1e6,
            # CPU time per step is far less disturbed by other processes than wall time (on one
            # thread; with several, OpenMP's spinning counts too).
            "cpu_us_per_step": median([r["cpu_s"] / r["steps"] for r in rs]) * 1e6,
            "cpu_ratio_to_raw": ref_cpu / median([r["cpu_s"] / r["steps"] for r in rs]),
            "peak_mem_mib": mem,
            "mem_kind": rs[0]["mem_kind"],
            "peak_mem_ratio_to_raw": mem / ref_mem,
            "train_mem_mib": median([r["train_mem_mib"] for r in rs]),
            "eval_loss": median([r["eval_loss"] for r in rs]),
            "min_cpu_share": min(r["cpu_share"] for r in rs),
            "max_other_cpus": max(others) if others else None,
            "contended_runs": sum(contended(r) for r in rs),
            "process_s": median([r["process_s"] for r in rs]),
            "hook_share": (median([r["hook_share"] for r in rs])
                           if all(r.get("hook_share") is not None for r in rs) else None),
        }
    return summary


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision(repo: Path) -> dict[str, Any]:
    """The commit the code under test is at, and whether its working tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": head, "git_dirty": bool(dirty)}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: interpreter, library versions, CPU count, platform, commit."""
    return {
        **_git_revision(Path(__file__).resolve().parent.parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": _version("torch"),
        "accelerate": _version("accelerate"),
        "transformers": _version("transformers"),
        "acceltrain": _version("acceltrain"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (parents created) through a temporary file, so a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
