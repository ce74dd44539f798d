"""Experiment trackers across a restart, against the real packages: W&B offline (its run files
read back), MLflow on a local file store, TensorBoard event files. One run in each, the same run
id, every step once, the values of metrics.jsonl."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import step_folder_name

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

SCRIPT = ROOT / "tests" / "integration" / "scripts" / "tracked_run.py"
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    # MLflow 3 keeps its file store (no database to set up) only when asked to.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_DISABLE_GIT": "true",
            "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true", **extra}


def _run(tmp: Path, *args: str, expect: int, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(tmp / "run"), "--max_steps", "12", "--log_interval", "1",
           "--eval_interval", "5", "--report_to", "tensorboard", "wandb", "mlflow", "--run_name", "r1",
           "--tracker_project", "proj", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp, **env), cwd=ROOT, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def jsonl(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, []).append((record["step"], value))
    return out


def _wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log-style blocks of
    32 KiB holding length-prefixed chunks (full / first / middle / last). wandb 0.31 ships no reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding to the end of the block
            pos += block - pos % block if pos % block else 0
        elif kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_runs(run: Path) -> tuple[list[tuple[str, str, str]], dict[str, list[tuple[int, float]]]]:
    """((run id, project, name) of every session's run record, {key: [(step, value)]}) from the
    offline run files."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids: list[tuple[str, str, str]] = []
    history: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in _wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append((record.run.run_id, record.run.project, record.run.display_name))
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return ids, history


def mlflow_runs(tmp: Path, metrics: list[str]) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    """(the runs of experiment "proj", {key: [(step, value)]} of its first run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("proj")  # --tracker_project
    runs = client.search_runs([experiment.experiment_id])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]
               for key in metrics} if runs else {}
    return runs, history


def tensorboard_scalars(run: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


def assert_one_run_with_every_step_once(tmp: Path, first_ids: tuple[str, str], sessions: int) -> None:
    run = tmp / "run"
    logged = jsonl(run)
    steps = list(range(1, 13))
    assert [s for s, _ in logged["loss"]] == steps  # metrics.jsonl: each step once
    assert [s for s, _ in logged["eval/loss"]] == [5, 10, 12]

    ids, history = wandb_runs(run)
    assert ids == [(first_ids[0], "proj", "r1")] * sessions  # several sessions, one run; --tracker_project, --run_name
    for key in ("loss", "grad_norm", "lr", "eval/loss"):
        assert history[key] == logged[key], key  # steps once each, values exactly metrics.jsonl's

    runs, history = mlflow_runs(tmp, ["loss", "grad_norm", "eval/loss"])
    assert [r.info.run_id for r in runs] == [first_ids[1]]
    assert runs[0].data.tags["mlflow.runName"] == "r1"
    assert runs[0].data.params["max_steps"] == "12" and runs[0].data.params["report_to"] == "tensorboard,wandb,mlflow"
    for key in ("loss", "grad_norm", "eval/loss"):
        assert history[key] == logged[key], key

    scalars = tensorboard_scalars(run, "loss")
    assert [s for s, _ in scalars] == steps
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged["loss"]], rel=1e-6)  # float32 there


def _first_ids(tmp: Path) -> tuple[str, str]:
    wandb_ids, _ = wandb_runs(tmp / "run")
    mlflow, _ = mlflow_runs(tmp, [])
    assert len(wandb_ids) == 1 and len(mlflow) == 1
    return wandb_ids[0][0], mlflow[0].info.run_id


def test_sigterm_at_6_crash_after_10_resume_to_12_is_one_run_in_wandb_mlflow_and_tensorboard(tmp_path):
    # A preemption (SIGTERM: saved at step 6, exit 143), then a crash after step 10 whose last
    # checkpoint is step 8 (steps 9-10 logged, then trained again), then the run to the end.
    _run(tmp_path, "--save_interval", "4", expect=143, STOP_AT="6", STOP_HOW="sigterm")
    assert [s for s, _ in jsonl(tmp_path / "run")["loss"]] == [1, 2, 3, 4, 5, 6]
    first = _first_ids(tmp_path)
    proc = _run(tmp_path, "--save_interval", "4", "--resume", "true", expect=1, STOP_AT="10", STOP_HOW="crash")
    assert f"{step_folder_name(6)} at step 6" in proc.stderr and "crash after step 10" in proc.stderr
    proc = _run(tmp_path, "--save_interval", "4", "--resume", "true", "--log_level", "info", expect=0)
    assert f"{step_folder_name(8)} at step 8" in proc.stderr
    assert "steps 9-10 were logged before the restart: their replay is not logged again" in proc.stderr
    assert_one_run_with_every_step_once(tmp_path, first, sessions=3)
