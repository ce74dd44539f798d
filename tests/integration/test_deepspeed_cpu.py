"""DeepSpeed ZeRO-2/3 through the trainer on CPU ranks: the same parameters as DDP, checkpoints
that resume bit-identically in a new process, resume on another number of processes (re-partitioned,
the global sample order kept), or are refused naming why (another ZeRO stage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, torchrun
from tests.helpers import LATEST, ckpt_root, run_step_dir, step_dir, step_folder_name

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install '.[deepspeed]')")
SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_check.py"
RESUME = Path(__file__).parent / "scripts" / "resume_run.py"
# No ACCELERATE_USE_CPU: with it Accelerate picks MULTI_CPU and ignores the DeepSpeed plugin.
DS_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "false"}
N = 6
pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(SCRIPT, "ddp", str(out))
    return json.loads((out / "ddp.json").read_text())["params"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_ddp_with_accumulation_clipping_and_schedule(tmp_path, ddp, stage):
    # No ACCELERATE_USE_CPU: with it Accelerate picks MULTI_CPU and ignores the DeepSpeed plugin.
    torchrun(SCRIPT, f"ds{stage}", str(tmp_path), env={**DS_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)})
    result = json.loads((tmp_path / f"ds{stage}.json").read_text())
    assert result["engine"] == "DeepSpeedEngine" and result["world"] == 2
    for name, values in ddp.items():
        torch.testing.assert_close(torch.tensor(result["params"][name]), torch.tensor(values), atol=1e-5, rtol=0)


def test_deepspeed_asked_for_on_a_cpu_device_is_refused_not_run_as_ddp(tmp_path):
    proc = torchrun(SCRIPT, "cpu_ds", str(tmp_path), env=DS_ENV, check=False)
    assert proc.returncode != 0
    assert "DeepSpeed was asked for but Accelerate chose MULTI_CPU" in proc.stdout + proc.stderr
    assert not (tmp_path / "cpu_ds.json").exists()


# ---------------------------------------------------------------- checkpoint and resume
# resume_run.py: AdamW, a warmup-cosine LR schedule, accumulation 2, clipping, dropout, shuffling
# and 2 DataLoader workers; --kill-at K sends SIGTERM after step K (CheckpointingHook saves, exits).
# Runs that do not depend on each other start together (the machine has 2 cores).


def _start(workspace: Path, nproc: int, *args: str) -> tuple[subprocess.Popen, Path]:
    workspace.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DS_ENV}
    script = [str(RESUME), str(workspace), "--max-steps", str(N), *args]
    if nproc == 1:  # one process, no launcher: DeepSpeed joins an env:// group of one
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "--master_addr=127.0.0.1", *script]
    log = workspace.parent / f"{workspace.name}-{len(list(workspace.parent.glob(workspace.name + '-*.log')))}.log"
    with open(log, "w") as f:  # files, not pipes: concurrent runs must not block on a full pipe
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True), log


def _finish(*started: tuple[subprocess.Popen, Path]) -> list[tuple[int, str]]:
    results = []
    for proc, log in started:
        proc.wait(timeout=300)
        results.append((proc.returncode, log.read_text()))
    return results


def _ok(result: tuple[int, str], expect: int | None = 0) -> str:
    code, text = result
    assert (code == expect) if expect is not None else code != 0, f"exit {code}\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    """ZeRO-2 on one process and ZeRO-3 on two ranks: uninterrupted runs to N, runs killed after
    step 3 and resumed in a new process, and resumes of those checkpoints that must be refused."""
    root = tmp_path_factory.mktemp("zero")
    ws = {name: root / name for name in ("z2_a", "z2_b", "z3_a", "z3_b", "z2_as_z3")}
    first = _finish(_start(ws["z2_a"], 1, "--deepspeed", "2"),
                    _start(ws["z2_b"], 1, "--deepspeed", "2", "--kill-at", "3"),
                    _start(ws["z3_a"], 2, "--deepspeed", "3"),
                    # rank 0 gets the signal after step 2; the ranks agree on it and both save step 3
                    _start(ws["z3_b"], 2, "--deepspeed", "3", "--kill-at", "2"))
    _ok(first[0]), _ok(first[1], 143), _ok(first[2]), _ok(first[3], None)
    latest = {k: (ckpt_root(ws[k]) / LATEST).resolve().name for k in ("z2_b", "z3_b")}
    shutil.copytree(ckpt_root(ws["z2_b"]), ckpt_root(ws["z2_as_z3"]), symlinks=True)
    second = _finish(_start(ws["z2_b"], 1, "--deepspeed", "2"),
                     _start(ws["z3_b"], 2, "--deepspeed", "3"),
                     _start(ws["z2_as_z3"], 1, "--deepspeed", "3"))
    return {"ws": ws, "latest": latest, "resumed": {"z2_b": _ok(second[0]), "z3_b": _ok(second[1])},
            "refused": {"z2_as_z3": second[2]}}


def _steps(workspace: Path, rank: int) -> dict[int, dict]:
    lines = [json.loads(line) for line in (workspace / f"steps_rank{rank}.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}  # a resumed run logs steps 4.. after the killed run's 1..3


def _assert_resumed_exactly(a: Path, b: Path, rank: int, k: int = 3) -> dict:
    sa, sb = _steps(a, rank), _steps(b, rank)
    assert sorted(sa) == sorted(sb) == list(range(1, N + 1))
    for s in range(k + 1, N + 1):
        assert sb[s]["loss"] == sa[s]["loss"], f"rank {rank} step {s}: loss"
        assert sb[s]["indices"] == sa[s]["indices"], f"rank {rank} step {s}: samples"
        assert sb[s]["lr"] == sa[s]["lr"], f"rank {rank} step {s}: lr"
    fa, fb = (torch.load(w / f"final_rank{rank}.pt", weights_only=True) for w in (a, b))
    assert fa["step"] == fb["step"] == N and fa["lr"] == fb["lr"]
    assert fa["engine"] == fb["engine"] and fa["engine"][0] == N  # DeepSpeed's own step and sample counters
    assert fa["model"].keys() == fb["model"].keys()
    for name, tensor in fa["model"].items():  # the full weights (gathered on rank 0 under ZeRO-3)
        assert torch.equal(tensor, fb["model"][name]), name
    za, zb = fa["optimizer"]["state"]["zero"], fb["optimizer"]["state"]["zero"]
    assert za.keys() == zb.keys() and len(za) >= 4  # fp32 master partition, AdamW step and moments
    for key, value in za.items():
        assert torch.equal(value, zb[key]), (rank, key)
    return fb


def test_zero2_resumes_bit_identically_in_a_new_process(zero):
    ws = zero["ws"]
    assert zero["latest"]["z2_b"] == step_folder_name(3)
    assert "resumed from" in zero["resumed"]["z2_b"] and f"{step_folder_name(3)} at step 3" in zero["resumed"]["z2_b"]
    final = _assert_resumed_exactly(ws["z2_a"], ws["z2_b"], rank=0)
    # Training moved the weights between step 3 and N (the comparison is not vacuous).
    from safetensors.torch import load_file

    at_3 = load_file(run_step_dir(ws["z2_b"], 3) / "model.safetensors")
    assert at_3.keys() == final["model"].keys()
    assert all(not torch.equal(at_3[name], final["model"][name]) for name in at_3)


def test_zero3_on_two_ranks_resumes_bit_identically_in_a_new_process(zero):
    ws = zero["ws"]
    assert zero["latest"]["z3_b"] == step_folder_name(3)
    assert f"{step_folder_name(3)} at step 3" in zero["resumed"]["z3_b"]
    finals = [_assert_resumed_exactly(ws["z3_a"], ws["z3_b"], rank=r) for r in (0, 1)]
    # Each rank held its own half: the partitions differ, and both moved after step 3.
    shard = run_step_dir(ws["z3_b"], 3) / "optimizer_shard_{}.pt"
    for r, final in enumerate(finals):
        at_3 = torch.load(str(shard).format(r), weights_only=True)["fp32_flat_groups"][0]
        now = final["optimizer"]["state"]["zero"]["zero.fp32_flat_groups.0"]
        n = now.numel()  # rank 1's partition ends in padding that is never initialised
        assert not torch.equal(at_3[:n], now)
    assert not torch.equal(finals[0]["optimizer"]["state"]["zero"]["zero.fp32_flat_groups.0"][:10],
                           finals[1]["optimizer"]["state"]["zero"]["zero.fp32_flat_groups.0"][:10])


@pytest.mark.parametrize("run, stage, files", [
    ("z2_b", 2, {"model.safetensors", "optimizer_shard_0.pt", "trainer_state.pt", "rank_state_0.pt"}),
    ("z3_b", 3, {"optimizer_shard_0.pt", "optimizer_shard_1.pt", "trainer_state.pt", "rank_state_0.pt",
                 "rank_state_1.pt"}),
])
def test_zero_checkpoint_has_a_valid_manifest_and_loads_without_unpickling(zero, run, stage, files):
    from acceltrain.checkpoint import find_latest_checkpoint, verify_checkpoint

    root = ckpt_root(zero["ws"][run])
    folder = step_dir(root, 3)
    manifest = verify_checkpoint(folder)  # every file with its size and CRC32
    assert manifest["step"] == 3 and manifest["world_size"] == (1 if stage == 2 else 2)
    assert manifest["deepspeed"] == {"zero_stage": stage, "mixed_precision": None}
    assert set(manifest["files"]) == files
    assert not list(root.glob(".tmp_*"))
    assert find_latest_checkpoint(root, clean=False) == step_dir(root, 6)  # the resumed run's last save
    for name in files - {"model.safetensors"}:
        torch.load(folder / name, weights_only=True)  # no DeepSpeed objects: nothing to unpickle


def test_the_weights_alone_of_a_zero3_checkpoint_are_refused_naming_the_folder(zero):
    """classify's --export_best loads only a checkpoint's weights; ZeRO-3 has none outside its
    optimizer partitions (the recipe refuses that combination before training)."""
    from acceltrain.checkpoint import CheckpointError
    from acceltrain.recipe_kit import load_checkpoint_weights
    from tests.helpers import ToyTrainer

    folder = step_dir(ckpt_root(zero["ws"]["z3_b"]), 3)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_weights(ToyTrainer(max_steps=1, device="cpu"), folder)
    assert str(e.value).startswith(f"{folder}: DeepSpeed ZeRO-3 keeps the weights only in its optimizer partitions")
    assert "--export_best false" in str(e.value)


def test_a_different_zero_stage_is_refused_naming_it(zero):
    code, text = zero["refused"]["z2_as_z3"]
    assert code == 2, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: ") and (
        "saved with DeepSpeed ZeRO-2 (mixed precision no), this run is with DeepSpeed ZeRO-3") in last, last
    ws = zero["ws"]["z2_as_z3"]
    assert not (ws / "steps_rank0.jsonl").exists()  # refused before the first step
    assert sorted(p.name for p in ckpt_root(ws).iterdir()) == sorted([LATEST, step_folder_name(3)])


# ---------------------------------------------------------------- another number of processes
# 16 samples per step on either world size (1 process x accumulation 4, 2 ranks x accumulation 2)
# and no dropout: a resized run's new ranks draw new dropout streams (documented), the data order
# does not change. The uninterrupted runs save at step 3 (and 6) and dump the state after step 3,
# gathered per parameter by DeepSpeed's own API; their step-3 checkpoints resume on the other size.
NO_DROPOUT = ("--dropout", "0")
RESIZED = [(stage, world) for stage in (2, 3) for world in (2, 1)]  # (ZeRO stage, saved by)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    from acceltrain.checkpoint import point_link

    root = tmp_path_factory.mktemp("resized")
    common = (*NO_DROPOUT, "--interval", "3")
    for result in _finish(*(_start(root / f"z{s}_on_{w}", w, "--deepspeed", str(s), *common, "--accum", str(4 // w),
                                   "--dump-at", "3") for s, w in RESIZED)):
        _ok(result)
    started = []
    for s, w in RESIZED:
        src, dst = root / f"z{s}_on_{w}", root / f"z{s}_from_{w}"
        shutil.copytree(ckpt_root(src), ckpt_root(dst), symlinks=True)
        shutil.rmtree(run_step_dir(dst, 6))  # resume from step 3
        point_link(ckpt_root(dst), LATEST, run_step_dir(dst, 3))
        started.append(_start(dst, 3 - w, "--deepspeed", str(s), *common, "--accum", str(4 // w),
                              "--dump-loaded", str(dst / "loaded.pt")))
    return root, dict(zip(RESIZED, _finish(*started), strict=True))


@pytest.mark.parametrize("stage, saved_by", RESIZED, ids=[f"zero{s}-{w}to{3 - w}" for s, w in RESIZED])
def test_zero_checkpoint_resumes_on_another_number_of_processes(resized, stage, saved_by):
    from tests.integration.test_elastic import steps

    root, results = resized
    src, dst = root / f"z{stage}_on_{saved_by}", root / f"z{stage}_from_{saved_by}"
    world = 3 - saved_by
    text = _ok(results[stage, saved_by])
    assert "Traceback" not in text
    procs = lambda n: f"{n} process" + ("" if n == 1 else "es")  # noqa: E731
    assert (f"resumed on {procs(world)} from a {saved_by}-process checkpoint at step 3: accumulation "
            f"{4 // saved_by} -> {4 // world}, same 16 samples per step") in text, text[-4000:]
    # As loaded: the fp32 master weights and AdamW moments of every parameter equal what the saved
    # run held after step 3, bit for bit (both gathered by DeepSpeed, on different world sizes).
    saved = torch.load(src / "state_at_3.pt", weights_only=True)
    loaded = torch.load(dst / "loaded.pt", weights_only=True)
    assert saved["step"] == loaded["step"] == 3 and loaded["accumulation"] == 4 // world
    s_opt, l_opt = saved["optimizer"], loaded["optimizer"]
    assert s_opt["state"].keys() == l_opt["state"].keys() and len(s_opt["state"]) == 4
    for name, entries in s_opt["state"].items():
        assert entries.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
        for key, value in entries.items():
            assert torch.equal(l_opt["state"][name][key], value), (name, key)
        assert entries["exp_avg"].abs().sum() > 0  # three steps moved them: not a vacuous comparison
    assert s_opt["steps"] == l_opt["steps"] == [3.0] and s_opt["lr"] == l_opt["lr"]
    # DeepSpeed's counters: 3 steps of 16 samples; the engine accumulates for the new world size.
    assert l_opt["engine"] == [3, 48, 4 // world] and s_opt["engine"] == [3, 48, 4 // saved_by]
    # Training goes on with the saved run's global sample order, set for set, and its losses.
    a, b = steps(src, saved_by), steps(dst, world)
    assert sorted(b) == [4, 5, 6] and all(b[s]["ranks"] == world for s in b)
    for s in (4, 5, 6):
        assert b[s]["indices"] == a[s]["indices"] and len(b[s]["indices"]) == 16, s
        assert abs(b[s]["loss"] - a[s]["loss"]) <= 1e-5, (s, b[s]["loss"], a[s]["loss"])
        assert b[s]["lr"] == a[s]["lr"], s
    fa, fb = (torch.load(w / "final_rank0.pt", weights_only=True) for w in (src, dst))
    assert fa["step"] == fb["step"] == N and fa["model"].keys() == fb["model"].keys()
    for name, tensor in fa["model"].items():
        torch.testing.assert_close(fb["model"][name], tensor, atol=1e-5, rtol=0)
        assert not torch.equal(tensor, saved["optimizer"]["state"][name]["fp32"].reshape(tensor.shape)), name


def test_a_zero_checkpoint_is_refused_by_a_run_without_deepspeed(zero, tmp_path):
    from acceltrain import CheckpointingHook
    from acceltrain.checkpoint import CheckpointError
    from tests.helpers import ToyTrainer

    folder = run_step_dir(zero["ws"]["z2_as_z3"], 3)
    hook = CheckpointingHook(load=folder, exit_signals=[])
    trainer = ToyTrainer(max_steps=4, optimizer="adamw", device="cpu", workspace=tmp_path, hooks=[hook])
    with pytest.raises(CheckpointError, match=r"saved with DeepSpeed ZeRO-2 .*this run is without DeepSpeed"):
        trainer.train()
    assert trainer.step == 0
