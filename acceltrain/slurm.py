"""SLURM jobs: render an sbatch script from a config, submit it, check on it, cancel it.

    acceltrain slurm render --config slurm.yaml recipes/pretrain.py --config recipes/configs/pretrain_124m.yaml
    acceltrain slurm submit --nodes 4 --gpus_per_node 8 --accelerate_config accelerate_configs/multi_node.yaml \\
        recipes/pretrain.py --output_dir runs/124m        # prints the job id
    acceltrain slurm status 1234
    acceltrain slurm cancel 1234 --signal USR1            # save, requeue, resume

The script runs one ``srun`` task per node; each runs ``accelerate launch`` with its own
``--machine_rank $SLURM_NODEID`` and the first node of the allocation as the main process.
Nothing from a config reaches the shell unquoted: values on ``#SBATCH`` lines are checked
against strict patterns, everything else is ``shlex.quote``-d, and setup commands are split
into words that are quoted one by one (the shell runs the program you name and nothing else).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import UserError

__all__ = ["SlurmConfig", "ShellExpr", "ArraySpec", "load_slurm_config", "render_sbatch", "read_yaml",
           "submit", "job_status", "cancel", "add_slurm_parser"]

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1: ``1e-3`` is a string, ``1:00:00`` the integer 3600 and ``010`` the
    octal 8. Here ``1e-3`` is a float and the other two stay strings (what a user means)."""


_Yaml12Loader.yaml_implicit_resolvers = {first: [(t, rx) for t, rx in resolvers if t not in (_INT, _FLOAT)]
                                         for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping with YAML 1.2 numbers (``read_yaml("s.yaml")``: ``time: 1:00:00`` -> ``"1:00:00"``,
    ``lr: 1e-3`` -> ``0.001``), or a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    if not isinstance(data, dict | None):
        raise UserError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data or {}


class ShellExpr(str):
    """A word acceltrain itself wrote for the shell to expand (``"$RUN_CONFIG"``). Never built
    from a config value: those are plain ``str`` and always quoted."""


def _q(word: str) -> str:
    return str(word) if isinstance(word, ShellExpr) else shlex.quote(str(word))


# Values on `#SBATCH` lines are parsed by sbatch (quotes, backslashes, `#`), and a newline would
# end the comment and start a shell line, so they are checked, not shell-quoted.
_PATTERNS = {
    "job_name": (r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", "letters, digits and ._+- (at most 100)"),
    "partition": (r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*", "names of letters, digits and _.- (comma-separated)"),
    "account": (r"[A-Za-z0-9_.-]+", "letters, digits and _.-"),
    "qos": (r"[A-Za-z0-9_.-]+", "letters, digits and _.-"),
    "mem": (r"[0-9]+[KMGT]?", "a number with an optional K/M/G/T suffix, e.g. 64G (0: all of the node's)"),
    "time": (r"(?:[0-9]+-)?[0-9]+(?::[0-9]+){0,2}|UNLIMITED|INFINITE", "minutes, [D-]HH:MM:SS or UNLIMITED"),
}
# Log paths may hold spaces (a sweep's output_dir): such a value goes on its #SBATCH line in double
# quotes, inside which sbatch keeps spaces, ' and $ literally. `"` and `\` are refused (sbatch reads
# them as quoting), `#` too (older sbatch ends the line there even inside quotes), and control
# characters (a newline would start a shell line).
_PATH_FIELDS = ("output", "error")
_PATH_FORBIDDEN = re.compile(r'["\\#]')
_PATH_EXPECTED = "a path without double quotes, backslashes, # or control characters"
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./%@+=,:-]+")
_SBATCH_LINE = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(?:=[^\s\"'\\#]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROGRAM = re.compile(r"[A-Za-z0-9_./+-]+")
_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")
_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "KILL", "CONT", "STOP", "QUIT")


def _field(default: Any, help: str) -> Any:
    """A field whose help text is both its documentation and its flag's ``--help``."""
    if isinstance(default, list | dict):
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class SlurmConfig:
    """One SLURM job: resources, environment, and the training command ``accelerate launch`` runs.

    Example:
        >>> cfg = SlurmConfig(nodes=4, gpus_per_node=8, script="recipes/pretrain.py",
        ...                   accelerate_config="accelerate_configs/multi_node.yaml")
        >>> cfg.validate(); print(render_sbatch(cfg))
    """

    job_name: str = _field("acceltrain", "Job name (letters, digits, ._+-)")
    nodes: int = _field(1, "Nodes; one srun task (one `accelerate launch`) per node")
    gpus_per_node: int = _field(0, "GPUs per node (0: a CPU job); processes = nodes x max(1, gpus_per_node)")
    cpus_per_task: int | None = _field(None, "CPUs for each node's task")
    mem: str | None = _field(None, "Memory per node, e.g. 64G (0: all)")
    time: str | None = _field(None, "Time limit: minutes or [D-]HH:MM:SS")
    partition: str | None = _field(None, "Partition(s)")
    account: str | None = _field(None, "Account to charge")
    qos: str | None = _field(None, "Quality of service")
    requeue: bool = _field(True, "Let SLURM (and the trainer's checkpoint hook) requeue the job")
    signal_seconds: int = _field(120, "SIGUSR1 to the training tasks this long before the time limit, so "
                                      "they save and requeue (0: none)")
    output: str | None = _field(None, "Log file (default slurm-%%x-%%j.out), appended to across requeues")
    error: str | None = _field(None, "Separate stderr file (default: the output file)")
    sbatch: list[str] = _field([], "Extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    env: dict[str, str] = _field({}, "KEY=VALUE to export (repeatable; literal values, no $ expansion)")
    setup: list[str] = _field([], "Command to run first, e.g. 'source .venv/bin/activate' (repeatable; "
                                  "its words are literal: no ; | $() ~)")
    accelerate_config: str | None = _field(None, "`accelerate launch --config_file`")
    main_process_port: int | None = _field(None, "Rendezvous port (default 20000 + job id %% 20000: jobs "
                                                 "sharing a node differ)")
    script: str | None = _field(None, "The training script")
    script_args: list[str] = _field([], "Its arguments")
    resume: bool = _field(True, "Append `--resume true` (the recipes' flag): a requeued job continues "
                                "from its latest checkpoint")

    @property
    def num_processes(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)

    def validate(self) -> None:
        """Check every field; a UserError names the first bad one."""
        for name, (pattern, expected) in _PATTERNS.items():
            value = getattr(self, name)
            if value is not None and not re.fullmatch(pattern, str(value)):
                raise UserError(f"slurm {name}: {value!r} is not valid; expected {expected}")
        for name in _PATH_FIELDS:
            value = None if getattr(self, name) is None else str(getattr(self, name))
            if value is not None and (not value or not value.isprintable() or _PATH_FORBIDDEN.search(value)):
                raise UserError(f"slurm {name}: {value!r} is not valid; expected {_PATH_EXPECTED}")
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_seconds", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"slurm {name} must be >= {low}, got {value}")
        if self.main_process_port is not None and not 1024 <= self.main_process_port <= 65535:
            raise UserError(f"slurm main_process_port must be in 1024..65535, got {self.main_process_port}")
        for line in self.sbatch:
            if not _SBATCH_LINE.fullmatch(line):
                raise UserError(f"slurm sbatch: {line!r} is not an option like --exclusive or --gres=gpu:8 "
                                "(one option, no spaces, quotes, backslashes or #)")
        for key in self.env:
            if not _ENV_NAME.fullmatch(key):
                raise UserError(f"slurm env: {key!r} is not a variable name")
        for command in self.setup:
            _setup_words(command)
        if not self.script:
            raise UserError("slurm: no training script; give it after the flags (or `script:` in the config)")
        if not Path(self.script).is_file():
            raise UserError(f"slurm script: {self.script}: no such file")
        if self.accelerate_config is not None:
            _check_accelerate_config(self.accelerate_config, self.num_processes)


def _setup_words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise UserError(f"slurm setup: {command!r}: {e}") from None
    if not words or not _PROGRAM.fullmatch(words[0]) or any(c in command for c in "\n\r\0"):
        raise UserError(f"slurm setup: {command!r} must be one line starting with a program name (letters, "
                        "digits, ._/+-); put anything needing ; | $() in a script and `source` it")
    return words


def _check_accelerate_config(path: str, num_processes: int) -> None:
    """Parse it with Accelerate's own loader, the one `accelerate launch` will use."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    if not Path(path).is_file():
        raise UserError(f"slurm accelerate_config: {path}: no such file")
    try:
        loaded = load_config_from_file(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"slurm accelerate_config: {path}: accelerate cannot load it ({first})") from None
    if loaded.distributed_type == DistributedType.NO and num_processes > 1:
        raise UserError(f"slurm accelerate_config: {path} runs one process (distributed_type NO), but the job "
                        f"has {num_processes} (nodes x gpus_per_node); use a multi-process config")


_SCALAR = (str, int, float)
_EXPECT = {  # field type -> (accepts value, what the error says was expected)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str | int) and not isinstance(v, bool), "a string"),
    "list": (lambda v: isinstance(v, list) and all(isinstance(x, _SCALAR) for x in v), "a list of strings"),
    "dict": (lambda v: isinstance(v, dict) and all(isinstance(x, _SCALAR) and not isinstance(x, bool)
                                                   for x in v.values()), "a mapping of NAME: value"),
}


def _check_types(source: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Values (from YAML or flags) against the field types; strings where the script wants them."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(SlurmConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(fields)}")
        kind = fields[key]
        if value is None and "None" in kind:
            out[key] = None
            continue
        accepts, expected = _EXPECT[re.split(r"[\[ ]", kind)[0]]
        if not accepts(value):
            raise UserError(f"{source}: {key}: expected {expected}, got {value!r}")
        if kind.startswith("str"):
            value = str(value)
        elif kind.startswith("list"):
            value = [str(v).lower() if isinstance(v, bool) else str(v) for v in value]  # YAML true: "true"
        elif kind.startswith("dict"):
            value = {str(k): str(v) for k, v in value.items()}
        out[key] = value
    return out


def load_slurm_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                      source: str = "flags") -> SlurmConfig:
    """A validated SlurmConfig from a YAML file and overrides (flags; they win, ``env`` merges).

    ``source`` names the overrides in error messages.

    Example:
        >>> load_slurm_config("slurm.yaml", {"nodes": 2, "script": "recipes/pretrain.py"})
    """
    values = _check_types(str(path), read_yaml(path)) if path else {}
    for key, value in _check_types(source, overrides or {}).items():
        values[key] = {**values.get("env", {}), **value} if key == "env" else value
    cfg = SlurmConfig(**values)
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class ArraySpec:
    """A job array: task ``i`` exports ``var=values[i]`` before launching."""

    values: Sequence[str]
    var: str = "ACCELTRAIN_ARRAY_VALUE"
    max_parallel: int | None = None
    log: str | None = None
    """A file name: when set, each task appends its output to ``$var/log`` (``var`` holds a folder)."""


def render_sbatch(cfg: SlurmConfig, *, array: ArraySpec | None = None) -> str:
    """The batch script for ``cfg`` (call ``cfg.validate()`` first; ``load_slurm_config`` does).

    Example:
        >>> print(render_sbatch(load_slurm_config("slurm.yaml")))
    """
    default_log = "slurm-%x-%A_%a.out" if array else "slurm-%x-%j.out"
    sbatch = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nodes}", "--ntasks-per-node=1"]
    sbatch += [f"--gpus-per-node={cfg.gpus_per_node}"] if cfg.gpus_per_node else []
    sbatch += [f"--cpus-per-task={cfg.cpus_per_task}"] if cfg.cpus_per_task else []
    for name in ("mem", "time", "partition", "account", "qos"):
        value = getattr(cfg, name)
        sbatch += [f"--{name}={value}"] if value is not None else []
    sbatch.append("--requeue" if cfg.requeue else "--no-requeue")
    # No `B:` prefix: the signal goes to the srun tasks (the trainer), not the batch shell. USR1 is
    # CheckpointingHook's default requeue_signal: only it requeues (TERM/INT save and stop).
    sbatch += [f"--signal=USR1@{cfg.signal_seconds}"] if cfg.signal_seconds else []
    sbatch += [f"--output={_sbatch_path(cfg.output or default_log)}", "--open-mode=append"]
    sbatch += [f"--error={_sbatch_path(cfg.error)}"] if cfg.error else []
    if array:
        limit = f"%{array.max_parallel}" if array.max_parallel else ""
        sbatch.append(f"--array=0-{len(array.values) - 1}{limit}")
    sbatch += cfg.sbatch
    lines = ["#!/bin/bash", "# Rendered by `acceltrain slurm`: one srun task per node, each running `accelerate launch`.",
             *(f"#SBATCH {option}" for option in sbatch), "set -e", ""]
    if cfg.env:
        lines += ["# Values are literal (quoted): no $ expansion.",
                  *(f"export {key}={_q(value)}" for key, value in cfg.env.items()), ""]
    if cfg.setup:
        lines += [" ".join(_q(w) for w in _setup_words(command)) for command in cfg.setup] + [""]
    if array:
        lines += ["ACCELTRAIN_ARRAY=(", *(f"  {_q(v)}" for v in array.values), ")",
                  f"export {array.var}=\"${{ACCELTRAIN_ARRAY[$SLURM_ARRAY_TASK_ID]}}\"",
                  f": \"${{{array.var}:?no entry for array index $SLURM_ARRAY_TASK_ID}}\""]
        lines += [f'exec >>"${array.var}"/{_q(array.log)} 2>&1'] if array.log else []
        lines.append("")
    port = str(cfg.main_process_port) if cfg.main_process_port else "$((20000 + SLURM_JOB_ID % 20000))"
    lines += [
        "# SLURM sets SLURM_RESTART_COUNT only on a requeued run; exported always, the trainer and",
        "# this log tell the first run (0) from a restart. SLURM_JOB_ID lets the trainer requeue itself.",
        'export SLURM_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"',
        'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"MAIN_PROCESS_PORT={port}",
        'echo "acceltrain: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT,'
        + (f' {array.var}=${array.var},' if array else "")
        + ' main process $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"',
        "",
        *_launch_lines(cfg),
    ]
    return "\n".join(lines) + "\n"


def _sbatch_path(path: str) -> str:
    """A validated log path for an #SBATCH line: as is, or double-quoted when it needs it."""
    return path if _PLAIN_VALUE.fullmatch(path) else f'"{path}"'


def _launch_lines(cfg: SlurmConfig) -> list[str]:
    # --kill-on-bad-exit: a node whose launcher fails takes the others down, rather than leaving
    # them blocked in a collective until its timeout. (After a signal-triggered save the other
    # ranks wait in a barrier while rank 0 runs `scontrol requeue`, so none exits early.)
    srun = ["srun", "--ntasks-per-node=1", '--nodes="$SLURM_NNODES"', "--kill-on-bad-exit=1"]
    # Since SLURM 22.05 srun does not inherit sbatch's --cpus-per-task.
    srun += [f"--cpus-per-task={cfg.cpus_per_task}"] if cfg.cpus_per_task else []
    launch = ['--main_process_ip "$MAIN_PROCESS_IP"', '--main_process_port "$MAIN_PROCESS_PORT"',
              f"--num_processes {cfg.num_processes}"]
    if cfg.accelerate_config:
        launch.append(f"--config_file {_q(cfg.accelerate_config)}")
    elif cfg.gpus_per_node and cfg.num_processes > 1:
        launch.append("--multi_gpu")
    args = [*cfg.script_args]
    if cfg.resume and not any(a == "--resume" or a.startswith("--resume=") for a in args):
        args += ["--resume", "true"]
    command = " ".join(_q(w) for w in [cfg.script, *args])  # type: ignore[list-item]
    # The node's rank must be expanded inside its task, so `bash -c` gets a fixed string of ours
    # and everything from the config as positional arguments ("$@"): nothing is parsed twice.
    # The launcher ignores SIGUSR1 (an ignored signal stays ignored across exec, and the trainer
    # installs its own handler): `scancel --signal=USR1` and --signal=USR1@T reach every process
    # of the step, and `accelerate launch` would otherwise die of it while the trainer saves.
    inner = 'trap "" USR1; exec accelerate launch --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" "$@"'
    return [
        "# One task per node; SIGUSR1 makes the trainer save, requeue this job and exit.",
        " ".join(srun) + " \\",
        f"  bash -c {_q(inner)} acceltrain-launch \\",
        "  " + " ".join(launch) + " \\",
        f"  {command}",
    ]


def _run(program: str, *args: str, input: str | None = None, check: str = "") -> subprocess.CompletedProcess:
    """Run a SLURM tool (an argv list, no shell). ``check``: on failure, a UserError saying this."""
    path = shutil.which(program)
    if path is None:
        raise UserError(f"{program} not found on PATH: this is not a SLURM login node "
                        "(`acceltrain slurm render` prints the script without submitting it)")
    proc = subprocess.run([path, *args], input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise UserError(f"{check}: {(proc.stderr.strip() or 'no output').splitlines()[0]}")
    return proc


def submit(script: str) -> str:
    """Submit a rendered script through ``sbatch`` (script on stdin); returns the job id."""
    return _run("sbatch", "--parsable", input=script, check="sbatch refused the job").stdout.strip().split(";")[0]


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise UserError(f"{job_id!r} is not a SLURM job id (digits, or N_M for an array task)")


def job_status(job_id: str) -> str:
    """The job's state: from ``squeue`` while it is queued or running, then ``sacct``, then
    ``scontrol`` (which remembers finished jobs for a while on clusters without accounting)."""
    _check_job_id(job_id)
    proc = _run("squeue", "--noheader", "--jobs", job_id, "--format", "%i %T %r %M %D %N")
    if proc.returncode == 0 and proc.stdout.strip():
        return "JOBID STATE REASON TIME NODES NODELIST\n" + proc.stdout.strip()
    # "Invalid job id specified": the job left the queue (asked for by id, squeue fails on it), so
    # look further. Any other failure (the controller is down) is squeue's error, not an unknown job.
    if proc.returncode != 0 and "invalid job id" not in proc.stderr.lower():
        raise UserError(f"squeue failed (exit {proc.returncode}): {(proc.stderr.strip() or 'no output').splitlines()[0]}")
    if shutil.which("sacct"):
        proc = _run("sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job_id, "--format",
                    "JobID,State,ExitCode,Elapsed,NodeList")
        if proc.returncode == 0 and proc.stdout.strip():
            return "JOBID|STATE|EXITCODE|ELAPSED|NODELIST\n" + proc.stdout.strip()
    proc = _run("scontrol", "show", "job", "--oneliner", job_id)
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv) if proc.returncode == 0 else {}
    if not fields:
        raise UserError(f"job {job_id}: not in the queue, and neither sacct nor scontrol knows it")
    keys = ("JobId", "JobState", "Reason", "ExitCode", "Restarts", "RunTime", "NodeList")
    return " ".join(f"{k}={fields[k]}" for k in keys if k in fields)


def cancel(job_id: str, signal: str | None = None) -> None:
    """``scancel`` the job, or send it ``signal`` (to its srun tasks, not the batch shell)."""
    _check_job_id(job_id)
    name = (signal or "").upper().removeprefix("SIG")
    if signal is not None and name not in _SIGNALS and not name.isdigit():
        raise UserError(f"--signal {signal!r}: expected one of {', '.join(_SIGNALS)} or a number")
    _run("scancel", *([f"--signal={name}"] if signal else []), job_id, check=f"scancel {job_id}")


# ---------------------------------------------------------------- command line
def _bool(text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return tuple(text.split("=", 1))  # type: ignore[return-value]


_FLAG_FIELDS = [f for f in dataclasses.fields(SlurmConfig) if f.name not in ("script", "script_args")]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per SlurmConfig field (``--nodes 4``, ``--env KEY=VALUE``); unset flags stay unset."""
    for f in _FLAG_FIELDS:
        kind = str(f.type).split("[")[0].split(" ")[0]
        kw = {"bool": {"type": _bool, "metavar": "{true,false}"}, "int": {"type": int},
              "list": {"action": "append", "metavar": f.name.upper()},
              "dict": {"action": "append", "type": _env_pair, "metavar": "KEY=VALUE"}}.get(kind, {})
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"], **kw)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave, as SlurmConfig overrides."""
    return {f.name: dict(v) if str(f.type).startswith("dict") else v
            for f in _FLAG_FIELDS if (v := getattr(args, f.name, None)) is not None}


def add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``acceltrain slurm render|submit|status|cancel``."""
    slurm = sub.add_parser("slurm", help="render, submit, watch and cancel SLURM jobs")
    actions = slurm.add_subparsers(dest="slurm_command", required=True, metavar="{render,submit,status,cancel}")
    for name, text in (("render", "print the sbatch script"), ("submit", "submit it with sbatch; print the job id")):
        p = actions.add_parser(name, help=text, description=f"{text.capitalize()}. Flags override --config.")
        p.add_argument("--config", dest="slurm_config", help="YAML of the fields below (flags override it)")
        add_config_flags(p)
        p.add_argument("command", nargs=argparse.REMAINDER, help="the training script and its arguments")
    status = actions.add_parser("status", help="state of a job (squeue, then sacct, then scontrol)")
    status.add_argument("job_id")
    stop = actions.add_parser("cancel", help="cancel a job, or send it a signal (--signal USR1: save and requeue)")
    stop.add_argument("job_id")
    stop.add_argument("--signal", help="send this signal to the job's tasks instead of cancelling it")
    slurm.set_defaults(handler=run_slurm)


def run_slurm(args: argparse.Namespace) -> int:
    """The ``acceltrain slurm`` subcommands."""
    if args.slurm_command == "status":
        print(job_status(args.job_id))
        return 0
    if args.slurm_command == "cancel":
        cancel(args.job_id, args.signal)
        return 0
    overrides = config_from_args(args)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        overrides.update(script=command[0], script_args=command[1:])
    cfg = load_slurm_config(args.slurm_config, overrides)
    script = render_sbatch(cfg)
    if args.slurm_command == "render":
        print(script, end="")
        return 0
    for log in (cfg.output, cfg.error):
        # SLURM does not create the log's folder: without it the job fails with no log at all.
        if log and "%" not in str(Path(log).parent):
            Path(log).parent.mkdir(parents=True, exist_ok=True)
    print(submit(script))
    return 0
