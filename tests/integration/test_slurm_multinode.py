"""Two SLURM nodes on one machine (.ci/slurm-up.sh): real cross-node jobs.

Every job goes through `acceltrain slurm submit --nodes 2` (so the rendered sbatch script is what
runs): one srun task per node, each `accelerate launch --num_machines 2 --machine_rank
$SLURM_NODEID --main_process_ip n1`, one CPU process per node, gloo. Checked: the same weights as
2 processes on one node; USR1, requeue and resume on both nodes bit-identical to an uninterrupted
2-node run; SIGKILL of the rank-1 node's task and its worker (a failed node) ends the job within
the stated bound and a resubmission resumes bit-identically; a 1-node resubmission of a 2-node
checkpoint resumes elastically. (SIGKILL of a launcher alone, whose worker the watchdog then
stops: tests/integration/test_watchdog_cpu.py, on a bare torchrun.)
Without the two nodes they skip, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, free_port
from tests.helpers import (
    LATEST,
    STEP_GLOB,
    STEP_PREFIX,
    ckpt_root,
    require_slurm,
    run_step_dir,
    step_folder_name,
)
from tests.integration.test_pretrain import make_corpus
from tests.integration.test_slurm import (
    SMALL,
    cli,
    cluster_report,
    job_env,
    last_step,
    restart_requeued,
    state,
    wait_for,
    wait_nodes_idle,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS = 40
RECIPE = ROOT / "recipes" / "pretrain.py"
CONFIGS = ROOT / "accelerate_configs"
# What the README states: after a node's task dies, every rank of the job is gone within this long.
FAILURE_BOUND_S = 120


@pytest.fixture(scope="module")
def two_nodes() -> None:
    require_slurm(("n1", "n2"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("multinode")
    return {"base": base, "corpus": make_corpus(base / "docs.jsonl"), "cache": base / "cache"}


def train_args(data: dict, out: Path) -> list[str]:
    return ["--output_dir", str(out), "--dataset", str(data["corpus"]), "--max_steps", str(STEPS), *SMALL]


def submit(data: dict, name: str, out: Path, *, nodes: int = 2) -> tuple[str, Path]:
    """`acceltrain slurm submit` of the pretraining recipe; the job id and its log."""
    log = data["base"] / "logs" / f"{name}.out"
    env = job_env(data["base"])
    env["env"]["ACCELERATE_USE_CPU"] = "true"
    config = data["base"] / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "job_name": f"acceltrain-test-{name}", "nodes": nodes, "cpus_per_task": 1, "time": "10:00",
        "output": str(log), "script": str(RECIPE), "script_args": train_args(data, out),
        "accelerate_config": str(CONFIGS / ("multi_node_cpu.yaml" if nodes == 2 else "cpu.yaml")), **env}))
    job = cli("slurm", "submit", "--config", str(config)).stdout.strip()
    assert job.isdigit(), job
    return job, log


def wait_done(job: str, log: Path, timeout: float = 300) -> None:
    try:
        wait_for(f"job {job} to leave the queue", lambda: state(job) == "", timeout, log, (job,))
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def uninterrupted(two_nodes, data) -> dict:
    """A 2-node run and, beside it, 2 processes on one node (torchrun) of the same config."""
    out = data["base"] / "two_nodes"
    job, log = submit(data, "uninterrupted", out)
    reference = None
    try:
        # The job's main process trains the tokenizer into the shared cache first; the local
        # run starts once that is complete (past step 1), so both read the same files.
        wait_for("the 2-node job to pass step 1", lambda: last_step(log) >= 1 or state(job) == "", 240, log, (job,))
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "ACCELTRAIN_CACHE": str(data["base"] / "cache")}
        reference = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             "--master_addr=127.0.0.1", str(RECIPE), *train_args(data, data["base"] / "one_node")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert reference.returncode == 0, reference.stderr[-4000:]
        wait_done(job, log)
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert f"Step {STEPS}/{STEPS}" in text, text[-4000:]
    return {"out": out, "log": log, "job": job, "one_node": data["base"] / "one_node"}


def test_two_nodes_are_idle_and_srun_puts_one_task_on_each(two_nodes):
    proc = subprocess.run(["srun", "-N", "2", "-n", "2", "bash", "-c", 'echo "$SLURM_NODEID $SLURMD_NODENAME"'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["0 n1", "1 n2"], proc.stdout


def test_scancel_usr1_reaches_the_task_on_each_node(two_nodes, tmp_path):
    # What the preemption test relies on, seen directly: `scancel --signal=USR1` (no --batch)
    # signals the srun tasks on both nodes, and the batch shell survives it.
    log = tmp_path / "usr1.out"
    task = 'trap "echo got USR1 on $SLURMD_NODENAME; exit 0" USR1; echo ready on $SLURMD_NODENAME; ' \
           'while :; do sleep 0.1; done'
    script = f"#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --time=2:00 --output={log}\n" \
             f"srun bash -c {shlex.quote(task)}\necho batch shell still here\n"
    job = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, check=True,
                         timeout=60).stdout.strip()
    try:
        wait_for("a task on each node", lambda: log.exists() and all(f"ready on {n}" in log.read_text()
                                                                       for n in ("n1", "n2")), 120, log)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        wait_for("the job to end", lambda: state(job) == "", 60, log)
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert "got USR1 on n1" in text and "got USR1 on n2" in text and "batch shell still here" in text, text


def test_a_two_node_run_equals_two_processes_on_one_node(uninterrupted):
    text = uninterrupted["log"].read_text()
    # The rendered script's view: both nodes, the first one's name as the main process address.
    assert re.search(r"acceltrain: job \d+ on n\[1-2\], SLURM_RESTART_COUNT=0, main process n1:\d+", text), text[:3000]
    got, want = weights(uninterrupted["out"]), weights(uninterrupted["one_node"])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_usr1_on_two_nodes_saves_requeues_once_and_resumes_bit_identically(uninterrupted, data):
    out = data["base"] / "preempted"
    job, log = submit(data, "preempted", out)
    try:
        wait_for("the job to pass step 10", lambda: last_step(log) >= 10 or state(job) == "", 240, log, (job,))
        assert state(job) == "RUNNING" and last_step(log) < STEPS, "the job ended before it could be signalled"
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        restart_requeued(job, log)
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    saves = re.findall(rf"requeueing SLURM job {job} after the checkpoint at step (\d+)", text)
    assert len(saves) == 1, text[-4000:]  # `scontrol requeue` ran once, from the main process
    k = int(saves[0])
    assert 10 <= k < STEPS
    # One log, both runs on both nodes.
    assert re.search(rf"job {job} on n\[1-2\], SLURM_RESTART_COUNT=0,", text)
    assert re.search(rf"job {job} on n\[1-2\], SLURM_RESTART_COUNT=1,", text)
    assert re.search(rf"resumed from \S*{step_folder_name(k)} at step {k}", text), text[-4000:]
    assert f"Step {STEPS}/{STEPS}" in text
    status = cli("slurm", "status", job).stdout
    assert "COMPLETED" in status and "Restarts=1" in status, status
    assert_bitwise_equal(weights(out), weights(uninterrupted["out"]))


def node_task(job: str, node_id: str) -> psutil.Process:
    """The srun task of ``job`` on node ``node_id``: its `accelerate launch` process."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if (env.get("SLURM_JOB_ID") == job and env.get("SLURM_NODEID") == node_id and "RANK" not in env
                and "accelerate" in cmdline and " launch " in f" {cmdline} "):
            return proc
    raise AssertionError(f"no `accelerate launch` task of job {job} on node {node_id}")


def job_processes(job: str) -> list[psutil.Process]:
    """The live (not zombie) processes started for ``job`` on this machine."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


# "task" costs CI another 40 s beside the bare-torchrun test of the same watchdog
# (tests/integration/test_watchdog_cpu.py): it runs with ACCELTRAIN_ALL_SLURM=1.
@pytest.mark.parametrize("what", [
    pytest.param("task", marks=pytest.mark.skipif(not os.environ.get("ACCELTRAIN_ALL_SLURM"),
                                                  reason="the launcher-only case runs with ACCELTRAIN_ALL_SLURM=1")),
    "node"])
def test_sigkill_of_the_rank1_nodes_task_ends_the_job_and_a_resubmission_resumes(uninterrupted, data, what):
    """``task``: SIGKILL of node 1's `accelerate launch`: its worker gets the kernel's SIGTERM at
    once (the launcher watchdog's parent-death signal), says so, and stops at the next step with
    rank 0, which srun's step kill (``--kill-on-bad-exit``) has signalled too: both save that step.
    ``node``: that task and its worker at once, as when the node itself fails (nothing saves;
    rank 0's next collective fails within ``collective_timeout``)."""
    out = data["base"] / f"{what}_failure"
    job, log = submit(data, f"{what}_failure", out)
    try:
        wait_for("the job to pass step 12", lambda: last_step(log) >= 12 or state(job) == "", 240, log, (job,))
        assert state(job) == "RUNNING" and last_step(log) < STEPS, "the job ended before its node could fail"
        task = node_task(job, "1")
        workers = task.children(recursive=True)
        assert workers, "no worker under the task"
        for proc in [task, *(workers if what == "node" else [])]:
            proc.send_signal(signal.SIGKILL)
        killed_at, killed = last_step(log), time.monotonic()
        wait_for("the job to end", lambda: state(job) == "", FAILURE_BOUND_S, log, (job,))
        # SLURM can drop the job from the queue while a rank that escaped its process tracking
        # (torchrun's workers run in sessions of their own) still saves: the bound is on every
        # process of the job, and a resubmission must not start beside one.
        wait_for("every process of the job to exit", lambda: not job_processes(job),
                 max(1.0, FAILURE_BOUND_S - (time.monotonic() - killed)), log)
        took = time.monotonic() - killed
        for w in workers:  # the killed launcher's own worker too (what == "task": the watchdog ended it)
            assert not psutil.pid_exists(w.pid) or w.status() == psutil.STATUS_ZOMBIE, w
    finally:
        if state(job):
            subprocess.run(["scancel", job], timeout=30)
    assert took < FAILURE_BOUND_S
    print(f"{what}: the job ended {took:.1f} s after SIGKILL on the rank-1 node")
    status = cli("slurm", "status", job).stdout
    assert "JobState=COMPLETED" not in status, status
    first = log.read_text()
    assert f"Step {STEPS}/{STEPS}" not in first
    if what == "task":
        assert "acceltrain watchdog: the launcher (pid " in first, first[-4000:]

    # Resubmitted as is (`--resume true` is in the rendered script): it continues from the last
    # complete checkpoint and ends where the uninterrupted run did, bit for bit.
    wait_nodes_idle()
    job2, log2 = submit(data, f"{what}_failure", out)
    wait_done(job2, log2)
    text = log2.read_text()[len(first):]  # the same log file, appended to
    resumed = re.search(rf"resumed from \S*{re.escape(STEP_PREFIX)}(\d+) at step (\d+)", text)
    assert resumed and resumed.group(1) == resumed.group(2), f"{text[-4000:]}\n{cluster_report(job, job2)}"
    step = int(resumed.group(1))
    if what == "node":  # no save at the failure: the last periodic one (save_interval 5)
        assert step % 5 == 0 and 10 <= step <= killed_at, (step, killed_at)
    else:  # both ranks agreed on a stop after the watchdog's SIGTERM and saved that step
        assert step >= killed_at, (step, killed_at)
    assert f"Step {STEPS}/{STEPS}" in text
    assert_bitwise_equal(weights(out), weights(uninterrupted["out"]))


def test_a_one_node_resubmission_of_a_two_node_checkpoint(uninterrupted, data):
    out = data["base"] / "one_node_resubmission"
    shutil.copytree(uninterrupted["out"], out, symlinks=True)
    shutil.rmtree(out / "final")
    keep = run_step_dir(out, STEPS - 5)
    assert keep.is_dir(), sorted(p.name for p in ckpt_root(out).iterdir())
    for folder in ckpt_root(out).glob(STEP_GLOB):
        if folder != keep:
            shutil.rmtree(folder)
    latest = ckpt_root(out) / LATEST
    if latest.is_symlink():  # it names the newest folder, deleted above; the loader scans the folders
        latest.unlink()
    job, log = submit(data, "one_node", out, nodes=1)
    wait_done(job, log)
    text = log.read_text()
    status = cli("slurm", "status", job).stdout
    # Elastic resume: the 2-process checkpoint continues on 1 process, the global batch kept by
    # doubling the accumulation.
    assert "COMPLETED" in status, status
    assert re.search(rf"resumed on 1 process from a 2-process checkpoint at step {STEPS - 5}: accumulation "
                     r"\d+ -> \d+, same \d+ samples per step", text), text[-4000:]
    assert re.search(rf"resumed from \S*{step_folder_name(STEPS - 5)} at step {STEPS - 5}", text), text[-4000:]
    assert f"Step {STEPS}/{STEPS}" in text
