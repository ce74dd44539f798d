"""benchmarks/gpu_check.py --cpu-smoke end to end, as the GPU machine would run it: without the
`datasets` and `deepspeed` packages (that machine has neither), writing the JSON the README and
the lead read. No timing is asserted (the machine may be loaded); the run takes ~15 s of CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

# What the GPU machine lacks, made unimportable (sys.modules[name] = None makes `import name` fail).
_WITHOUT = ("import runpy, sys\n"
            "for name in ('datasets', 'deepspeed'):\n"
            "    sys.modules[name] = None\n"
            "sys.argv = ['gpu_check.py', *sys.argv[1:]]\n"
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")


def test_cpu_smoke_runs_end_to_end_without_datasets_or_deepspeed_and_writes_the_schema(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELTRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT, "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(out.read_text())
    assert result["schema"] == 1 and result["mode"] == "cpu-smoke" and result["device"] == "cpu" and result["complete"]
    assert set(result) >= {"machine", "pytest_gpu", "throughput", "host_syncs", "checkpoint", "targets", "skipped",
                           "peak_flops", "seconds", "targets_wanted"}
    tests = result["pytest_gpu"]
    # every CUDA test collected (none errored) and skipped with the reason
    assert tests["status"] == "ran" and tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 10
    assert tests["skips"] == ["deepspeed is not installed (pip install '.[deepspeed]')",
                              "needs a CUDA GPU (torch.cuda.is_available() is False)"]
    (row,) = result["throughput"]["rows"]
    assert row["preset"] == "tiny" and row["mode"] == "eager"
    assert row["raw_tokens_per_s"] > 0 and row["recipe_tokens_per_s"] > 0 and row["ratio_total"] > 0
    assert 0 < row["recipe_mfu_measured"] < 1 and row["recipe_mfu_datasheet"] is None
    syncs = result["host_syncs"]
    assert syncs["status"] == "ran" and syncs["quiet_steps"] == [0, 0, 0] and syncs["logging_step"] == 3
    ckpt = result["checkpoint"]
    assert ckpt["status"] == "ran" and 0 < ckpt["blocked_s"] <= ckpt["complete_s"] and ckpt["size_gib"] > 0
    # GPU figures are not claimed from a CPU run
    assert set(result["targets"].values()) == {None}
    assert any("compiled" in line for line in result["skipped"])
    assert "target compiled_124m_vs_raw >= 0.98: not measured" in proc.stdout
