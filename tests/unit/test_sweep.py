"""acceltrain/sweep.py: grids, names, nested keys, local runs and their records, git facts,
the SLURM array script (run by bash with fake SLURM tools), and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from acceltrain.cli import main
from acceltrain.config import UserError
from acceltrain.sweep import ParameterGrid, ParameterGridSearch, git_record, load_sweep, set_dotted
from tests.unit.test_slurm_render import ARGV_LOG, cli_error, fake_slurm_bin, run_rendered, sbatch_option

ECHO = Path(__file__).resolve().parents[1] / "integration" / "scripts" / "sweep_echo.py"
NAMES_2X3 = ["lr=0.001_n_layers=2", "lr=0.001_n_layers=4", "lr=0.001_n_layers=8",
             "lr=0.003_n_layers=2", "lr=0.003_n_layers=4", "lr=0.003_n_layers=8"]


def write_sweep(folder: Path, **overrides: Any) -> Path:
    """A 2x3 sweep over sweep_echo.py with a nested base config, in ``folder``."""
    shutil.copy(ECHO, folder / "echo.py")
    (folder / "base.yaml").write_text("seed: 1\nmodel: {d_model: 64, n_layers: 1}\n")
    spec = {"script": "echo.py", "base": "base.yaml", "config": {"max_steps": 10},
            "grid": {"lr": [1e-3, 3e-3], "model.n_layers": [2, 4, 8]}, **overrides}
    # Written by hand so `1e-3` is spelled as users spell it (PyYAML alone reads it as a string).
    text = yaml.safe_dump(spec, sort_keys=False).replace("0.001", "1e-3").replace("0.003", "3e-3")
    (folder / "sweep.yaml").write_text(text)
    return folder / "sweep.yaml"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_2x3_grid_gives_6_runs_with_nested_values_over_the_base():
    base = {"seed": 1, "model": {"d_model": 64, "n_layers": 1}}
    grid = ParameterGrid().add_parameter("lr", [1e-3, 3e-3]).add_parameter("model.n_layers", [2, 4, 8])
    runs = ParameterGridSearch(base, [grid]).runs()
    assert len(grid) == 6 and [r.name for r in runs] == NAMES_2X3
    assert runs[4].params == {"lr": 0.003, "model.n_layers": 4}
    assert runs[4].config == {"seed": 1, "model": {"d_model": 64, "n_layers": 4}, "lr": 0.003}
    assert base == {"seed": 1, "model": {"d_model": 64, "n_layers": 1}}  # not mutated


def test_naming_strategies():
    grid = ParameterGrid({"lr": [1e-3, 3e-3], "model.n_layers": [2, 4, 8]})
    sequential = [r.name for r in ParameterGridSearch({}, [grid], naming="sequential").runs()]
    assert sequential == [f"run_{i:03d}" for i in range(6)]
    hashed = [r.name for r in ParameterGridSearch({"x": 1}, [grid], naming="hash").runs()]
    assert len(set(hashed)) == 6 and all(re.fullmatch(r"[0-9a-f]{10}", h) for h in hashed)
    # A point's hash depends on its parameters only: the same in another sweep, in another order.
    other = ParameterGridSearch({}, [ParameterGrid({"model.n_layers": [8], "lr": [3e-3]})], naming="hash").runs()
    assert other[0].name == hashed[5]
    # Keys that end alike keep their full dotted name; values become safe folder names.
    grid = ParameterGrid({"model.dropout": [0.1], "data.dropout": [0.0], "tag": ["a/b c", "a-b-c"]})
    names = [r.name for r in ParameterGridSearch({}, [grid]).runs()]
    assert names[0].startswith("model.dropout=0.1_data.dropout=0.0_tag=a-b-c_")  # two clean to a-b-c
    assert len(set(names)) == 2 and all("/" not in n and " " not in n for n in names)
    assert [r.name for r in ParameterGridSearch({}, [ParameterGrid({"flag": [True, None]})]).runs()] == [
        "flag=true", "flag=null"]


def test_union_of_grids_runs_a_shared_point_once():
    grids = [ParameterGrid({"lr": [1, 2]}), ParameterGrid({"lr": [2, 3]})]
    assert [r.params["lr"] for r in ParameterGridSearch({}, grids).runs()] == [1, 2, 3]


def test_set_dotted_refuses_to_walk_through_a_value():
    cfg = {"model": 3}
    with pytest.raises(UserError, match="model is 3, not a mapping"):
        set_dotted(cfg, "model.n_layers", 2)
    set_dotted(cfg, "a.b.c", [1])
    assert cfg == {"model": 3, "a": {"b": {"c": [1]}}}


def test_dry_run_lists_the_runs_and_writes_nothing(here: Path, capsys):
    write_sweep(here)
    before = sorted(p.name for p in here.iterdir())
    assert main(["sweep", "sweep.yaml", "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "6 runs in runs/sweep:"
    assert [line.split()[0] for line in out[1:7]] == NAMES_2X3
    assert out[1].split()[1:] == ["lr=0.001", "model.n_layers=2"]
    assert out[7].endswith("echo.py --config runs/sweep/<name>/sweep_config.yaml")
    assert sorted(p.name for p in here.iterdir()) == before
    assert main(["sweep", "sweep.yaml", "--dry_run", "--naming", "sequential", "--output_dir", "o"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "run_000"


def test_dry_run_accepts_both_spellings(here: Path, capsys):
    write_sweep(here)
    outputs = []
    for flag in ("--dry_run", "--dry-run"):
        assert main(["sweep", "sweep.yaml", flag]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("6 runs in runs/sweep:")
    assert not (here / "runs").exists()


def test_an_output_dir_with_spaces_gets_a_quoted_default_log(here: Path, capsys):
    write_sweep(here, naming="sequential", output_dir="my runs/lr sweep")
    assert main(["sweep", "sweep.yaml", "--render"]) == 0
    script = capsys.readouterr().out
    assert '#SBATCH --output="my runs/lr sweep/slurm-%A_%a.out"\n' in script
    assert sbatch_option(script, "output") == "my runs/lr sweep/slurm-%A_%a.out"
    (here / "my runs/lr sweep/run_002").mkdir(parents=True)  # --slurm writes the run folders first
    launch, = (c for c in run_rendered(script, here, SLURM_ARRAY_TASK_ID="2") if c["prog"] == "accelerate")
    assert launch["argv"][-5:-2] == ["echo.py", "--config", "my runs/lr sweep/run_002/sweep_config.yaml"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout


def test_local_runs_record_config_commit_and_diff_without_touching_the_tree(here: Path, capsys):
    write_sweep(here)
    (here / "code").mkdir()  # the script in a subfolder: git facts are about the whole repository
    shutil.move(here / "echo.py", here / "code" / "echo.py")
    write_sweep(here, script="code/echo.py")
    (here / "echo.py").unlink()
    git(here, "init", "-q", "-b", "main")
    git(here, "add", "code/echo.py", "base.yaml", "sweep.yaml")
    git(here, "commit", "-q", "-m", "first")
    (here / "base.yaml").write_text("seed: 1\nmodel: {d_model: 64, n_layers: 1}\nextra: edited\n")  # uncommitted
    (here / "notes.txt").write_text("untracked\n")
    state = lambda: (git(here, "rev-parse", "HEAD"), git(here, "branch", "--show-current"),  # noqa: E731
                     git(here, "status", "--porcelain", "--", ".", ":!runs"), git(here, "stash", "list"),
                     (here / "base.yaml").read_text())
    before = state()
    assert main(["sweep", "sweep.yaml"]) == 0
    assert state() == before
    out = capsys.readouterr().out
    assert "6 of 6 runs finished" in out and "[6/6] lr=0.003_n_layers=8: ok" in out
    for name in NAMES_2X3:
        folder = here / "runs" / "sweep" / name
        config = yaml.safe_load((folder / "sweep_config.yaml").read_text())
        assert config["output_dir"] == f"runs/sweep/{name}" and config["extra"] == "edited"
        assert json.loads((folder / "result.json").read_text())["config"] == config  # what the script read
        record = json.loads((folder / "sweep_run.json").read_text())
        assert record["status"] == "finished" and record["returncode"] == 0
        assert record["git"]["commit"] == before[0].strip() and record["git"]["branch"] == "main"
        assert record["git"]["dirty"] and "notes.txt" in record["git"]["untracked"]
        assert "+extra: edited" in (folder / "git.diff").read_text()
        assert "lr=" in (folder / "sweep_run.log").read_text()
    assert json.loads((here / "runs/sweep/lr=0.003_n_layers=4/result.json").read_text())["config"]["model"] == {
        "d_model": 64, "n_layers": 4}


def test_outside_git_the_record_says_so(here: Path):
    info, diff = git_record(here)
    assert info["repository"] is None and "not a git repository" in info["note"] and diff is None


def test_a_failed_run_exits_1_and_a_second_pass_runs_only_what_did_not_finish(here: Path, capsys):
    write_sweep(here, grid={"fail": [False, True]}, naming="sequential")
    assert main(["sweep", "sweep.yaml"]) == 1
    out = capsys.readouterr().out
    assert "[2/2] run_001: failed with exit 3" in out and "sweep_echo: lr=None" in out and "1 failed" in out
    record = json.loads((here / "runs/sweep/run_001/sweep_run.json").read_text())
    assert (record["status"], record["returncode"]) == ("failed", 3)
    assert main(["sweep", "sweep.yaml"]) == 1
    out = capsys.readouterr().out
    assert "run_000: finished earlier, skipped" in out and "run_001: failed" in out
    assert main(["sweep", "sweep.yaml", "--rerun"]) == 1
    assert "run_000: ok" in capsys.readouterr().out


def test_array_script_runs_the_indexed_run_with_everything_quoted(here: Path, capsys, monkeypatch):
    evil_dir = "out $(touch pwned); `x`"
    write_sweep(here, naming="sequential", output_dir=evil_dir, max_parallel=2,
                slurm={"output": "slurm-%A_%a.out", "env": {"EVIL": "$(touch pwned)"}})
    bin_dir = fake_slurm_bin(here)
    (bin_dir / "sbatch").write_text(f"#!{sys.executable}\nimport os, sys\n"
                                    "open(os.environ['FAKE_SBATCH_SCRIPT'], 'w').write(sys.stdin.read())\nprint(77)\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_SCRIPT", str(here / "submitted.sh"))
    assert main(["sweep", "sweep.yaml", "--slurm"]) == 0
    assert capsys.readouterr().out.strip() == "77"
    script = (here / "submitted.sh").read_text()
    assert "#SBATCH --array=0-5%2\n" in script and (here / evil_dir / "slurm_array.sbatch").read_text() == script
    run4 = here / evil_dir / "run_004"
    assert json.loads((run4 / "sweep_run.json").read_text())["slurm_job"] == "77_4"
    calls = run_rendered(script, here, SLURM_ARRAY_TASK_ID="4")
    launch, = (c for c in calls if c["prog"] == "accelerate")
    assert launch["argv"][-5:] == ["echo.py", "--config", f"{evil_dir}/run_004/sweep_config.yaml", "--resume", "true"]
    assert launch["env"]["EVIL"] == "$(touch pwned)"
    assert f"ACCELTRAIN_RUN_DIR={evil_dir}/run_004" in (run4 / "sweep_run.log").read_text()
    # An index the array does not have stops the task before it launches anything.
    proc = subprocess.run(["bash", "job.sh"], cwd=here, capture_output=True, text=True, env={
        **os.environ, "SLURM_ARRAY_TASK_ID": "9", ARGV_LOG: str(here / "argv9.jsonl")})
    assert proc.returncode != 0 and "no entry for array index 9" in proc.stderr
    assert not (here / "argv9.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    ({"gird": {"lr": [1]}}, "unknown key 'gird'"),
    ({"grid": {"lr": 0.1}}, "grid lr: expected a non-empty list of values, got 0.1"),
    ({"grid": {"lr": []}}, "grid lr: expected a non-empty list"),
    ({"grid": {}}, "grid: expected a mapping"),
    ({"grid": {"model": [1], "model.n_layers": [2]}}, "model.n_layers and model overlap"),
    ({"grid": {"seed.x": [1]}}, "seed.x: seed is 1, not a mapping"),
    ({"grid": {"output_dir": ["a", "b"]}}, "grid sets output_dir"),
    ({"script": "missing.py"}, "script: expected the path of an existing training script"),
    ({"naming": "fancy"}, "naming 'fancy': expected one of descriptive, hash, sequential"),
    ({"base": "missing.yaml"}, "missing.yaml: config file not found"),
    ({"max_parallel": 0}, "max_parallel an integer >= 1"),
    ({"base": ["a.yaml"]}, "base and output_key must be strings"),
])
def test_bad_sweep_files_are_one_line_exit_2(here: Path, capsys, change: dict, message: str):
    write_sweep(here, **change)
    assert message in cli_error(capsys, "sweep", "sweep.yaml", "--dry_run")
    assert not (here / "runs").exists()


def test_bad_slurm_sections_name_the_sweep(here: Path, capsys):
    write_sweep(here, slurm={"nodes": 0})
    assert "slurm nodes must be >= 1" in cli_error(capsys, "sweep", "sweep.yaml", "--render")
    write_sweep(here, slurm={"gpus": 8})
    assert "sweep.yaml: slurm: unknown key 'gpus'" in cli_error(capsys, "sweep", "sweep.yaml", "--render")
    write_sweep(here, slurm={"script": "x.py"})
    assert "set script and script_args at the top level" in cli_error(capsys, "sweep", "sweep.yaml", "--render")
    assert not (here / "runs").exists()


def test_slurm_without_sbatch_writes_nothing(here: Path, capsys, monkeypatch):
    write_sweep(here)
    monkeypatch.setenv("PATH", str(here / "empty"))
    assert "sbatch not found on PATH" in cli_error(capsys, "sweep", "sweep.yaml", "--slurm")
    assert not (here / "runs").exists()


def test_load_sweep_overrides(here: Path):
    write_sweep(here)
    sweep = load_sweep("sweep.yaml", naming="hash", output_dir="elsewhere")
    assert sweep.output_dir == Path("elsewhere") and all(len(r.name) == 10 for r in sweep.runs)
    assert sweep.runs[0].config["output_dir"] == f"elsewhere/{sweep.runs[0].name}"


def test_compose_configs_deep_merges_replaces_lists_and_sets_dotted_keys():
    from acceltrain.sweep import compose_configs

    base = {"model": {"d": 64, "n": 2}, "tags": ["a", "b"], "lr": 0.1}
    out = compose_configs(base, [{"model": {"n": 4}, "tags": ["c"]}, {"lr": 0.2}], {"model.act": "gelu"})
    assert out == {"model": {"d": 64, "n": 4, "act": "gelu"}, "tags": ["c"], "lr": 0.2}
    assert base == {"model": {"d": 64, "n": 2}, "tags": ["a", "b"], "lr": 0.1}  # not mutated
    with pytest.raises(UserError, match=r"^override 0: expected a mapping, got list$"):
        compose_configs({}, [[1]])


def test_a_sweep_file_composes_its_config_over_the_base(here: Path):
    path = write_sweep(here, config={"max_steps": 10, "model": {"layers": [4, 4]}})
    (here / "base.yaml").write_text("seed: 1\nmodel: {d_model: 64, n_layers: 1, layers: [1, 2, 3]}\n")
    run = load_sweep(path).runs[0]
    assert run.config["model"] == {"d_model": 64, "n_layers": 2, "layers": [4, 4]}  # merged; the list replaced


def test_hash_based_is_the_model_training_frameworks_name_for_hash():
    from acceltrain.sweep import NamingStrategy

    assert NamingStrategy.HASH_BASED is NamingStrategy.HASH and NamingStrategy("hash") is NamingStrategy.HASH_BASED
