"""acceltrain slurm: the 4x8 golden script, and a real job array on the cluster (.ci/slurm-up.sh).

The helpers here (job state, waits that end with a cluster report, restarting a requeued job)
serve tests/integration/test_slurm_multinode.py too, where USR1, requeue, resume and node
failure run on two nodes; one-node jobs run there as well (the elastic resubmission). Without
`sbatch` these skip, except in CI (CI=true), where a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from acceltrain.slurm import load_slurm_config, render_sbatch
from tests.conftest import ROOT
from tests.helpers import require_slurm

GOLDEN = Path(__file__).parent / "golden" / "slurm_4x8.sbatch"
SWEEP_SCRIPT = Path(__file__).parent / "scripts" / "sweep_echo.py"
STEPS = 60
# Big enough for ~0.1 s steps, so USR1 lands mid-run; small enough for a 2-core CI machine.
SMALL = ["--d_model", "128", "--n_heads", "4", "--n_layers", "2", "--d_ff", "512", "--seq_len", "64",
         "--batch_size", "32", "--vocab_size", "300", "--log_interval", "1", "--eval_interval", "20",
         "--save_interval", "5", "--sample_tokens", "0", "--warmup_steps", "2"]


def test_4x8_script_matches_the_golden_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "slurm_4x8.yaml"
    config.write_text("""
job_name: pretrain-124m
nodes: 4
gpus_per_node: 8
cpus_per_task: 64
mem: 0
time: 2-00:00:00
partition: gpu
account: my-project
signal_seconds: 300
output: logs/%x-%j.out
sbatch: [--exclusive]
env: {NCCL_DEBUG: WARN, OMP_NUM_THREADS: 8}
setup: [source .venv/bin/activate]
accelerate_config: accelerate_configs/multi_node.yaml
script: recipes/pretrain.py
script_args: [--config, recipes/configs/pretrain_124m.yaml, --output_dir, runs/124m]
""")
    text = render_sbatch(load_slurm_config(config))
    if os.environ.get("ACCELTRAIN_WRITE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


# ---------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster() -> None:
    require_slurm()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "acceltrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def state(job: str) -> str:
    """The job's state in the queue ('' once it left it)."""
    proc = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format", "%T"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:  # a busy slurmctld can refuse a query: unknown, not gone
        return "UNKNOWN"
    return proc.stdout.strip()


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None,
             jobs: tuple[str, ...] = ()) -> None:
    """Poll ``check`` until it holds; past ``timeout``, fail with the log's tail and, for
    ``jobs``, what SLURM says of them (cluster_report)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            report = f"\n{cluster_report(*jobs)}" if jobs else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}{report}")
        time.sleep(0.2)


def cluster_report(*jobs: str) -> str:
    """What SLURM says of the nodes and of ``jobs`` (state, reason, the controller's log lines):
    appended to a failure, to say why a job did not run."""
    out = []
    for cmd in (["sinfo", "-N", "-o", "%N %T %E"], *(["scontrol", "show", "job", j] for j in jobs)):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        out.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    ctld = Path("/var/log/slurm/slurmctld.log")
    if jobs and ctld.is_file():
        wanted = [re.compile(rf"JobId={j}\b|job_id={j}\b|JOB {j}\b") for j in jobs]
        lines = [ln for ln in ctld.read_text(errors="replace").splitlines() if any(w.search(ln) for w in wanted)]
        out.append(f"$ grep job {' '.join(jobs)} {ctld}\n" + "\n".join(lines[-40:]))
    return "\n".join(out)


def wait_nodes_idle(timeout: float = 120) -> None:
    """Every node idle: after a job ends (or is requeued) its node stays `completing` until slurmd
    has reaped the job's steps, and a job started meanwhile can fail to launch there."""
    def idle() -> bool:
        proc = subprocess.run(["sinfo", "--noheader", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30)
        states = proc.stdout.split()
        return proc.returncode == 0 and bool(states) and all(s == "idle" for s in states)
    deadline = time.monotonic() + timeout
    while not idle():
        if time.monotonic() > deadline:
            raise AssertionError(f"the nodes did not come back idle within {timeout:.0f} s\n{cluster_report()}")
        time.sleep(0.5)


def restart_requeued(job: str, log: Path, timeout: float = 300) -> None:
    """Wait for ``job`` to requeue itself, start it again at once and wait for that run to end.

    `scontrol requeue` from inside a job leaves it PENDING (BeginTime) for ~2 minutes; it is
    started once every node is idle (the first run's steps reaped), and the StartTime update is
    repeated while it still waits on BeginTime (an update that lands while the requeue is still
    completing can be overwritten by it)."""
    wait_for("the requeued job to be pending", lambda: state(job) in ("PENDING", ""), 120, log, (job,))
    assert state(job) == "PENDING", f"the job was not requeued\n{log.read_text()[-3000:]}\n{cluster_report(job)}"
    wait_nodes_idle()
    last_update = 0.0

    def restarted() -> bool:
        nonlocal last_update
        if "SLURM_RESTART_COUNT=1" in log.read_text() and state(job) == "":
            return True
        if time.monotonic() - last_update > 15 and state(job) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
            last_update = time.monotonic()
        return False
    # Gone from the queue *after* the rerun started (between requeue and restart squeue can
    # briefly report nothing on a loaded machine).
    wait_for("the resumed job to finish", restarted, timeout, log, (job,))


def last_step(log: Path) -> int:
    steps = re.findall(r"Step\s+(\d+)/", log.read_text()) if log.exists() else []
    return max(map(int, steps), default=0)


def job_env(tmp_path: Path) -> dict:
    """What the job needs on top of the submitting shell's environment: the venv, one thread."""
    activate = Path(sys.prefix) / "bin" / "activate"
    return {"setup": [f"source {activate}"] if activate.is_file() else [],
            "env": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "ACCELTRAIN_CACHE": str(tmp_path / "cache")}}


@pytest.mark.slow
def test_sweep_runs_as_a_job_array(cluster, tmp_path: Path):
    sweep = tmp_path / "sweep.yaml"
    slurm = {"cpus_per_task": 1, "time": "5:00", "resume": False, **job_env(tmp_path)}
    sweep.write_text(yaml.safe_dump({
        "script": str(SWEEP_SCRIPT), "grid": {"lr": [0.1, 0.2], "model.width": ["it's $(touch pwned)"]},
        "naming": "sequential", "output_dir": str(tmp_path / "sweep"), "slurm": slurm}))
    job = cli("sweep", str(sweep), "--slurm").stdout.strip()
    assert job.isdigit(), job
    try:
        wait_for("the array job to finish", lambda: state(job) == "", 180, jobs=(job,))
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)
    for index, lr in enumerate([0.1, 0.2]):
        folder = tmp_path / "sweep" / f"run_{index:03d}"
        log = (folder / "sweep_run.log").read_text()
        assert f"sweep_echo: lr={lr}" in log, log[-3000:]
        result = json.loads((folder / "result.json").read_text())
        assert result["array_task"] == str(index)
        assert result["config"]["model"] == {"width": "it's $(touch pwned)"}
        assert result["argv"][:2] == ["--config", str(folder / "sweep_config.yaml")]
        assert json.loads((folder / "sweep_run.json").read_text())["slurm_job"] == f"{job}_{index}"
    assert not list(tmp_path.rglob("pwned")) and not (ROOT / "pwned").exists()
