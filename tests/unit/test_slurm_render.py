"""acceltrain/slurm.py without a cluster: hostile values through every field, the rendered
script run by bash with fake srun/scontrol/accelerate, config loading and one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from acceltrain.cli import main
from acceltrain.config import UserError
from acceltrain.slurm import load_slurm_config, read_yaml, render_sbatch
from tests.conftest import ROOT
from tests.helpers import cli_error

# Each would run `touch pwned` if it reached a shell unquoted (or, with the newline, started
# a shell line after an #SBATCH comment).
EVIL = ["x; touch pwned", "$(touch pwned)", "`touch pwned`", "x\ntouch pwned", "it's \"quoted\" \\ & | > pwned"]
ARGV_LOG = "FAKE_ARGV_LOG"

_FAKE = """#!{python}
import json, os, signal, sys
name = os.path.basename(sys.argv[0])
record = {{"prog": name, "argv": sys.argv[1:], "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("EVIL", "SLURM_RESTART", "ACCELTRAIN_"))}}}}
with open(os.environ["{log}"], "a") as f:
    f.write(json.dumps(record) + "\\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("node-a"); print("node-b")
if name == "srun":  # drop srun's own options, run the task as srun would
    rest = sys.argv[1:]
    while rest and rest[0].startswith("--"):
        rest.pop(0)
    os.execvp(rest[0], rest)
"""


def fake_slurm_bin(root: Path) -> Path:
    """A folder of executables (srun, scontrol, accelerate, record) that log their argv as JSON."""
    bin_dir = root / "fakebin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "accelerate", "record"):
        path = bin_dir / name
        path.write_text(_FAKE.format(python=sys.executable, log=ARGV_LOG))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_rendered(script: str, sandbox: Path, **env: str) -> list[dict]:
    """Run ``script`` with bash in ``sandbox`` as node 1 of 2; returns what the fakes recorded."""
    log = sandbox / "argv.jsonl"
    bin_dir = sandbox / "fakebin" if (sandbox / "fakebin").is_dir() else fake_slurm_bin(sandbox)
    (sandbox / "job.sh").write_text(script)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", ARGV_LOG: str(log), "SLURM_JOB_ID": "1234",
                "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node-[a-b]", **env}
    proc = subprocess.run(["bash", "job.sh"], cwd=sandbox, env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(sandbox.rglob("pwned*")), "a value from the config ran as a command"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    return tmp_path


@pytest.mark.parametrize("evil", EVIL)
def test_quoted_fields_reach_the_programs_literally(sandbox: Path, evil: str):
    # Files with hostile names: the training script and the accelerate config.
    script = sandbox / f"{evil.replace('/', '_')}.py"
    script.write_text("")
    accel = sandbox / f"cfg {evil.replace('/', '_')}.yaml"
    accel.write_text((ROOT / "accelerate_configs" / "multi_cpu.yaml").read_text())
    cfg = load_slurm_config(None, {
        "nodes": 2, "script": script.name, "script_args": [evil, "--lr", evil], "accelerate_config": accel.name,
        "env": {"EVIL_VALUE": evil},
        # A setup command is one line (a newline is rejected: test_..._are_checked).
        "setup": [f"record {shlex.quote(evil)} --flag={shlex.quote(evil)}"] if "\n" not in evil else [],
    })
    calls = run_rendered(render_sbatch(cfg), sandbox)
    if "\n" not in evil:
        setup, = (c for c in calls if c["prog"] == "record")
        assert setup["argv"] == [evil, f"--flag={evil}"]
    launch, = (c for c in calls if c["prog"] == "accelerate")
    assert launch["argv"] == [
        "launch", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node-a",
        "--main_process_port", str(20000 + 1234 % 20000), "--num_processes", "2", "--config_file", accel.name,
        script.name, evil, "--lr", evil, "--resume", "true"]
    assert launch["env"]["EVIL_VALUE"] == evil and launch["env"]["SLURM_RESTART_COUNT"] == "0"
    # The launcher starts with SIGUSR1 ignored, so only the trainer (its own handler) acts on it.
    assert launch["usr1_ignored"]
    srun, = (c for c in calls if c["prog"] == "srun")
    assert srun["argv"][:4] == ["--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=1", "bash"]


@pytest.mark.parametrize("field", ["job_name", "partition", "account", "qos", "mem", "time"])
@pytest.mark.parametrize("evil", EVIL)
def test_sbatch_line_fields_reject_anything_but_their_pattern(sandbox: Path, field: str, evil: str):
    with pytest.raises(UserError, match=f"slurm {field}: "):
        load_slurm_config(None, {field: evil, "script": "train.py"})


def sbatch_option(script: str, name: str) -> str:
    """The value sbatch reads for ``--name=`` from the script's #SBATCH lines (its quote rules:
    quotes group and are dropped, a backslash escapes, an unquoted # starts a comment)."""
    for line in script.splitlines():
        if not line.startswith("#SBATCH "):
            continue
        text, word, quote, i = line[len("#SBATCH "):].lstrip(), "", "", 0
        while i < len(text) and (quote or not text[i].isspace()):
            c = text[i]
            if c == "\\":
                word, i = word + text[i + 1], i + 2
                continue
            if quote and c == quote:
                quote = ""
            elif not quote and c in "\"'":
                quote = c
            elif not quote and c == "#":
                break
            else:
                word += c
            i += 1
        assert not quote, f"unmatched quote in {line!r}"
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
    raise AssertionError(f"no --{name} line")


@pytest.mark.parametrize("field", ["output", "error"])
@pytest.mark.parametrize("evil", EVIL)
def test_log_paths_are_double_quoted_or_rejected(sandbox: Path, field: str, evil: str):
    # Only what sbatch cannot hold inside double quotes is refused: ", \, # and control characters.
    if any(c in evil for c in '"\\#\n'):
        with pytest.raises(UserError, match=f"slurm {field}: .* is not valid; expected a path without"):
            load_slurm_config(None, {field: evil, "script": "train.py"})
        return
    text = render_sbatch(load_slurm_config(None, {field: evil, "script": "train.py"}))
    assert f'#SBATCH --{field}="{evil}"\n' in text and sbatch_option(text, field) == evil
    run_rendered(text, sandbox)  # bash reads the #SBATCH line as a comment: nothing runs


def test_a_log_path_with_a_space_is_quoted_and_a_plain_one_is_not(sandbox: Path, capsys):
    text = render_sbatch(load_slurm_config(None, {"output": "my runs/a b/slurm-%j.out", "error": "logs/err-%j.txt",
                                                  "script": "train.py"}))
    assert '#SBATCH --output="my runs/a b/slurm-%j.out"\n' in text and "#SBATCH --error=logs/err-%j.txt\n" in text
    assert sbatch_option(text, "output") == "my runs/a b/slurm-%j.out"
    msg = cli_error(capsys, "slurm", "render", "--output", "runs/#1.out", "train.py")
    assert msg == "error: slurm output: 'runs/#1.out' is not valid; expected a path without double quotes, " \
                  "backslashes, # or control characters"


@pytest.mark.parametrize("evil", EVIL)
def test_extra_sbatch_lines_env_names_and_setup_programs_are_checked(sandbox: Path, evil: str):
    for overrides, message in (({"sbatch": [f"--comment={evil}"]}, "slurm sbatch"),
                               ({"sbatch": [evil]}, "slurm sbatch"),
                               ({"env": {evil: "1"}}, "slurm env"),
                               ({"setup": [evil]}, "slurm setup")):
        with pytest.raises(UserError, match=message):
            load_slurm_config(None, {**overrides, "script": "train.py"})


def test_a_setup_command_runs_as_words_not_as_shell_code(sandbox: Path):
    cfg = load_slurm_config(None, {"script": "train.py", "setup": ["record 'a b' c;d $HOME ~ *"]})
    setup, = (c for c in run_rendered(render_sbatch(cfg), sandbox) if c["prog"] == "record")
    assert setup["argv"] == ["a b", "c;d", "$HOME", "~", "*"]


def test_render_defaults_one_cpu_node(sandbox: Path):
    text = render_sbatch(load_slurm_config(None, {"script": "train.py"}))
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n" in text
    assert "#SBATCH --signal=USR1@120\n" in text and "B:" not in text
    assert "#SBATCH --requeue\n" in text and "#SBATCH --open-mode=append\n" in text
    assert "--gpus-per-node" not in text and "--multi_gpu" not in text
    launch, = (c for c in run_rendered(text, sandbox) if c["prog"] == "accelerate")
    assert launch["argv"][-3:] == ["train.py", "--resume", "true"]


def test_gpus_without_an_accelerate_config_ask_for_multi_gpu_and_flags_reach_sbatch(sandbox: Path):
    cfg = load_slurm_config(None, {"script": "train.py", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 16,
                                   "requeue": False, "signal_seconds": 0, "main_process_port": 29400,
                                   "sbatch": ["--exclusive", "--constraint=a100|h100"], "resume": False})
    text = render_sbatch(cfg)
    for line in ("--gpus-per-node=4", "--cpus-per-task=16", "--no-requeue", "--exclusive", "--constraint=a100|h100"):
        assert f"#SBATCH {line}\n" in text
    assert "--signal" not in text
    calls = run_rendered(text, sandbox)
    launch, = (c for c in calls if c["prog"] == "accelerate")
    assert launch["argv"][8:] == ["29400", "--num_processes", "8", "--multi_gpu", "train.py"]
    srun, = (c for c in calls if c["prog"] == "srun")
    assert "--cpus-per-task=16" in srun["argv"]  # srun does not inherit it since SLURM 22.05


def test_yaml_numbers_follow_yaml_1_2(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("time: 1:00:00\nlr: 1e-3\nwd: 0.1\nnodes: 2\nmem: 64G\nname: 010\ninf: .inf\n")
    got = read_yaml(path)  # PyYAML alone: time 3600, lr '1e-3', name 8 (octal)
    assert got == {"time": "1:00:00", "lr": 0.001, "wd": 0.1, "nodes": 2, "mem": "64G", "name": "010", "inf": float("inf")}


def test_config_file_and_flags_compose(sandbox: Path):
    (sandbox / "s.yaml").write_text("nodes: 2\ntime: 1:00:00\nenv: {A: 1, B: two}\nscript: train.py\n"
                                    "script_args: [--lr, 1e-3, --compile, true, --resume=false]\n")
    cfg = load_slurm_config(sandbox / "s.yaml", {"nodes": 3, "env": {"B": "three"}})
    assert (cfg.nodes, cfg.time, cfg.env, cfg.script) == (3, "1:00:00", {"A": "1", "B": "three"}, "train.py")
    assert cfg.script_args == ["--lr", "0.001", "--compile", "true", "--resume=false"]
    assert render_sbatch(cfg).rstrip().endswith("--compile true --resume=false")  # no second --resume


@pytest.mark.parametrize("yaml_text, message", [
    ("nodes: 2\ngpus: 8\n", "unknown key 'gpus'"),
    ("nodes: '2'\n", "nodes: expected an integer"),
    ("requeue: maybe\n", "requeue: expected true or false"),
    ("env: [A]\n", "env: expected a mapping"),
    ("nodes: [1\n", "not valid YAML"),
])
def test_bad_config_file_is_one_line_exit_2(sandbox: Path, capsys, yaml_text: str, message: str):
    (sandbox / "s.yaml").write_text(yaml_text)
    assert message in cli_error(capsys, "slurm", "render", "--config", "s.yaml", "train.py")


def test_bad_flags_and_inputs_are_one_line_exit_2(sandbox: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    assert "nodes must be >= 1, got 0" in cli_error(capsys, "slurm", "render", "--nodes", "0", "train.py")
    assert "missing.py: no such file" in cli_error(capsys, "slurm", "render", "missing.py")
    assert "no training script" in cli_error(capsys, "slurm", "render")
    (sandbox / "accel.yaml").write_text("distributed_type: NOPE\n")
    msg = cli_error(capsys, "slurm", "render", "--accelerate_config", "accel.yaml", "train.py")
    assert "accel.yaml: accelerate cannot load it" in msg and "NOPE" in msg
    (sandbox / "accel.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n")
    assert "runs one process" in cli_error(capsys, "slurm", "render", "--nodes", "2", "--accelerate_config",
                                           "accel.yaml", "train.py")
    monkeypatch.setenv("PATH", str(sandbox / "empty"))
    assert "sbatch not found on PATH" in cli_error(capsys, "slurm", "submit", "train.py")
    assert "squeue not found on PATH" in cli_error(capsys, "slurm", "status", "12")
    assert "not a SLURM job id" in cli_error(capsys, "slurm", "cancel", "12; touch pwned")


def test_render_prints_the_script_and_script_args_keep_their_own_flags(sandbox: Path, capsys):
    assert main(["slurm", "render", "--job_name", "t1", "train.py", "--config", "x.yaml", "--nodes", "9"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --job-name=t1\n" in out and "#SBATCH --nodes=1\n" in out
    assert out.rstrip().endswith("train.py --config x.yaml --nodes 9 --resume true")


def test_submit_status_cancel_call_the_slurm_tools_with_argv_lists(sandbox: Path, capsys, monkeypatch):
    bin_dir = fake_slurm_bin(sandbox)
    for name, body in (("sbatch", "import sys; sys.stdin.read(); print('4242;cluster')"),
                       ("squeue", "print('4242 RUNNING None 0:05 1 node-a')"),
                       ("scancel", "pass")):
        (bin_dir / name).write_text(_FAKE.format(python=sys.executable, log=ARGV_LOG) + body + "\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv(ARGV_LOG, str(sandbox / "argv.jsonl"))
    assert main(["slurm", "submit", "train.py"]) == 0
    assert main(["slurm", "status", "4242"]) == 0
    assert main(["slurm", "cancel", "4242", "--signal", "SIGUSR1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4242" and "4242 RUNNING" in out[2]
    calls = [json.loads(line) for line in (sandbox / "argv.jsonl").read_text().splitlines()]
    assert [c["argv"] for c in calls] == [
        ["--parsable"], ["--noheader", "--jobs", "4242", "--format", "%i %T %r %M %D %N"], ["--signal=USR1", "4242"]]


def test_status_reports_squeue_failing_instead_of_an_unknown_job(sandbox: Path, capsys, monkeypatch):
    bin_dir = sandbox / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert cli_error(capsys, "slurm", "status", "4242") == (
        "error: squeue failed (exit 1): slurm_load_jobs error: Unable to contact slurm controller (connect failure)")


def test_status_of_a_job_squeue_no_longer_knows_asks_scontrol(sandbox: Path, capsys, monkeypatch):
    bin_dir = sandbox / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"),
                       ("sacct", "exit 0"),  # no accounting: nothing printed
                       ("scontrol", "echo 'JobId=4242 JobState=COMPLETED Reason=None ExitCode=0:0 Restarts=1'")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["slurm", "status", "4242"]) == 0
    assert capsys.readouterr().out.strip() == "JobId=4242 JobState=COMPLETED Reason=None ExitCode=0:0 Restarts=1"
