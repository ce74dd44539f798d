"""Parameter sweeps: a grid of dotted keys over a base config, run here one by one or as a SLURM array.

    acceltrain sweep sweep.yaml --dry_run          # list the runs; writes nothing (or --dry-run)
    acceltrain sweep sweep.yaml                    # run them one after another, a process each
    acceltrain sweep sweep.yaml --slurm            # one SLURM job array, a task per run
    acceltrain sweep sweep.yaml --slurm --render   # print that array script; writes nothing

A sweep file (paths are relative to the directory you run from, like every acceltrain path)::

    script: recipes/pretrain.py        # each run: python SCRIPT --config RUN/sweep_config.yaml [script_args]
    base: recipes/configs/pretrain_tiny.yaml    # optional base config
    config: {max_steps: 200}           # optional, merged over base (dotted keys allowed)
    grid:                              # or a list of such mappings: the union of their runs
      lr: [1e-3, 3e-3]
      n_layers: [2, 4, 8]              # a dotted key (model.n_layers) would set {model: {n_layers: ...}}
    naming: descriptive                # descriptive (lr=0.001_n_layers=2), hash, sequential (run_000)
    output_dir: runs/lr-depth          # run folders: output_dir/<name>
    output_key: output_dir             # the config key set to the run folder (null: none)
    slurm: {gpus_per_node: 1, time: "2:00:00"}  # SlurmConfig fields, for --slurm
    max_parallel: 4                    # array tasks running at once

Each run folder records ``sweep_config.yaml`` (the full resolved config), ``sweep_run.json``
(name, parameters, command, git commit and status) and ``git.diff`` (``git diff HEAD``: the
uncommitted changes the run ran with); ``--slurm`` also keeps the array script in
``output_dir/slurm_array.sbatch``. Git is only read: no branch is switched, nothing in the
working tree or index is written. A local sweep skips runs that already finished (``--rerun``
runs them again), so re-running it after a failure continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from .config import UserError
from .slurm import ArraySpec, ShellExpr, SlurmConfig, load_slurm_config, read_yaml, render_sbatch, submit

__all__ = ["NamingStrategy", "ParameterGrid", "ParameterGridSearch", "Run", "Sweep", "compose_configs", "load_sweep",
           "set_dotted", "git_record", "run_local", "render_array", "add_sweep_parser"]

CONFIG_FILE, RECORD_FILE, DIFF_FILE, LOG_FILE = "sweep_config.yaml", "sweep_run.json", "git.diff", "sweep_run.log"
ARRAY_FILE = "slurm_array.sbatch"
_KEYS = ("script", "script_args", "base", "config", "grid", "naming", "output_dir", "output_key", "slurm",
         "max_parallel")


class NamingStrategy(str, Enum):
    """How a run's folder is named."""

    DESCRIPTIVE = "descriptive"  # lr=0.001_n_layers=2
    HASH = "hash"  # 10 hex digits of the parameters: stable across sweeps that share a point
    SEQUENTIAL = "sequential"  # run_000, run_001, ... in grid order
    HASH_BASED = "hash"  # the Model Training Framework's name for HASH (an alias: the same member)


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``config["a"]["b"] = value`` for ``key="a.b"``, creating mappings on the way.

    Example:
        >>> cfg = {"model": {"d": 64}}; set_dotted(cfg, "model.n_layers", 2); cfg
        {'model': {'d': 64, 'n_layers': 2}}
    """
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"{key!r} is not a dotted key like model.n_layers")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{key}: {'.'.join(parts[:i + 1])} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if "." in key:
            set_dotted(out, key, value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose_configs(base: Mapping[str, Any], overrides: Sequence[Mapping[str, Any]] = (),
                    parameter_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``base`` with each of ``overrides`` merged over it in turn, then ``parameter_overrides``.

    Mappings merge key by key at every depth; any other value (a list included) replaces what
    was there whole. A dotted key (``"model.n_layers"``) sets that nested value. Nothing given
    is mutated.

    Example:
        >>> compose_configs({"model": {"d": 64, "n": 2}, "tags": ["a"]}, [{"model": {"n": 4}, "tags": ["b"]}],
        ...                 {"optimizer.lr": 0.1})
        {'model': {'d': 64, 'n': 4}, 'tags': ['b'], 'optimizer': {'lr': 0.1}}
    """
    out = _merge(base, {})
    for i, override in enumerate([*overrides, parameter_overrides or {}]):
        if not isinstance(override, Mapping):
            raise UserError(f"override {i}: expected a mapping, got {type(override).__name__}")
        out = _merge(out, override)
    return out


@dataclass
class ParameterGrid:
    """Dotted keys and the values each takes; iterating yields every combination, last key fastest.

    Example:
        >>> grid = ParameterGrid().add_parameter("lr", [1e-3, 3e-3]).add_parameter("model.n_layers", [2, 4, 8])
        >>> len(grid), next(iter(grid))
        (6, {'lr': 0.001, 'model.n_layers': 2})
    """

    parameters: dict[str, list[Any]] = field(default_factory=dict)

    def add_parameter(self, key: str, values: Sequence[Any]) -> ParameterGrid:
        if not isinstance(values, list | tuple) or not values:
            raise UserError(f"grid {key}: expected a non-empty list of values, got {values!r}")
        for other in self.parameters:
            if other.startswith(key + ".") or key.startswith(other + "."):
                raise UserError(f"grid: {key} and {other} overlap (one sets a value inside the other)")
        self.parameters[key] = list(values)
        return self

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.parameters.values()) if self.parameters else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keys = list(self.parameters)
        for values in itertools.product(*self.parameters.values()):
            yield dict(zip(keys, values, strict=True))


@dataclass(frozen=True)
class Run:
    """One point of the sweep: its name, the grid values, and the full resolved config."""

    index: int
    name: str
    params: dict[str, Any]
    config: dict[str, Any]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


class ParameterGridSearch:
    """A base config and grids, expanded into named runs (the union of the grids, duplicates once).

    Example:
        >>> search = ParameterGridSearch({"lr": 0.01}, naming="sequential")
        >>> search.add_grid(ParameterGrid({"lr": [1e-3, 3e-3]}))
        >>> [(r.name, r.config["lr"]) for r in search.runs()]
        [('run_000', 0.001), ('run_001', 0.003)]
    """

    def __init__(self, base_config: Mapping[str, Any] | None = None, grids: Sequence[ParameterGrid] = (),
                 naming: NamingStrategy | str = NamingStrategy.DESCRIPTIVE):
        self.base_config = dict(base_config or {})
        self.grids = list(grids)
        self.naming = _naming(naming)

    def add_grid(self, grid: ParameterGrid) -> None:
        self.grids.append(grid)

    def points(self) -> list[dict[str, Any]]:
        seen, out = set(), []
        for grid in self.grids:
            for params in grid:
                key = json.dumps(params, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    out.append(params)
        return out

    def runs(self) -> list[Run]:
        points = self.points()
        if not points:
            raise UserError("the sweep has no runs: give a grid with at least one key")
        names = self._names(points)
        return [Run(i, name, params, _merge(self.base_config, params))
                for i, (name, params) in enumerate(zip(names, points, strict=True))]

    def _names(self, points: list[dict[str, Any]]) -> list[str]:
        if self.naming is NamingStrategy.SEQUENTIAL:
            width = max(3, len(str(len(points) - 1)))
            return [f"run_{i:0{width}d}" for i in range(len(points))]
        if self.naming is NamingStrategy.HASH:
            return [_hash(p) for p in points]
        keys = {k for p in points for k in p}
        # The last part of a dotted key names it, unless two keys end the same way.
        last = [k.rsplit(".", 1)[-1] for k in keys]
        label = {k: (k if last.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1]) for k in keys}
        names = []
        for p in points:
            name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(f"{label[k]}={_fmt(v)}" for k, v in p.items()))
            names.append(name if len(name) <= 120 else f"{name[:108]}_{_hash(p)}")
        # Distinct points can still clean up to the same name ("a/b" and "a-b"): tell them apart.
        return [f"{n}_{_hash(p)}" if names.count(n) > 1 else n for n, p in zip(names, points, strict=True)]


def _naming(value: NamingStrategy | str) -> NamingStrategy:
    try:
        return NamingStrategy(value)
    except ValueError:
        raise UserError(f"naming {value!r}: expected one of {', '.join(n.value for n in NamingStrategy)}") from None


@dataclass
class Sweep:
    """A loaded sweep file: what to run, where, and how."""

    source: str
    script: str
    runs: list[Run]
    output_dir: Path
    script_args: list[str] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)
    max_parallel: int | None = None

    def run_dir(self, run: Run) -> Path:
        return self.output_dir / run.name

    def command(self, run: Run, python: str = sys.executable) -> list[str]:
        return [python, self.script, "--config", str(self.run_dir(run) / CONFIG_FILE), *self.script_args]


def load_sweep(path: str | Path, *, naming: str | None = None, output_dir: str | None = None) -> Sweep:
    """Read and check a sweep file; ``naming`` / ``output_dir`` override its values.

    Example:
        >>> sweep = load_sweep("sweep.yaml", naming="hash")
        >>> [run.name for run in sweep.runs]
    """
    spec = read_yaml(path)
    unknown = [k for k in spec if k not in _KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(_KEYS)}")
    script = spec.get("script")
    if not isinstance(script, str) or not Path(script).is_file():
        raise UserError(f"{path}: script: expected the path of an existing training script, got {script!r}")
    args = spec.get("script_args") or []
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise UserError(f"{path}: script_args: expected a list of strings, got {args!r}")
    if not isinstance(spec.get("base") or "", str) or not isinstance(spec.get("output_key") or "", str):
        raise UserError(f"{path}: base and output_key must be strings")
    base = read_yaml(spec["base"]) if spec.get("base") else {}
    inline = spec.get("config") or {}
    if not isinstance(inline, dict):
        raise UserError(f"{path}: config: expected a mapping, got {inline!r}")
    grids = spec.get("grid")
    grids = [grids] if isinstance(grids, dict) else grids
    if not grids or not isinstance(grids, list) or not all(isinstance(g, dict) and g for g in grids):
        raise UserError(f"{path}: grid: expected a mapping of key: [values, ...] (or a list of them)")
    search = ParameterGridSearch(compose_configs(base, [inline]), naming=naming or spec.get("naming", "descriptive"))
    for g in grids:
        grid = ParameterGrid()
        for key, values in g.items():
            grid.add_parameter(str(key), values)
        search.add_grid(grid)
    out = Path(output_dir or spec.get("output_dir") or Path("runs") / Path(path).stem)
    output_key = spec.get("output_key", "output_dir")
    runs = search.runs()
    if output_key:
        if any(output_key in r.params for r in runs):
            raise UserError(f"{path}: grid sets {output_key}, which the sweep sets to each run's folder")
        runs = [Run(r.index, r.name, r.params, _merge(r.config, {output_key: str(out / r.name)})) for r in runs]
    slurm = spec.get("slurm") or {}
    limit = spec.get("max_parallel")
    if not isinstance(slurm, dict) or (limit is not None and (not isinstance(limit, int) or limit < 1)):
        raise UserError(f"{path}: slurm must be a mapping and max_parallel an integer >= 1")
    return Sweep(str(path), script, runs, out, [str(a) for a in args], slurm, limit)


def git_record(directory: str | Path) -> tuple[dict[str, Any], str | None]:
    """What git says about the code in ``directory``: commit, branch, uncommitted diff, untracked
    files. Read-only (``GIT_OPTIONAL_LOCKS=0``: not even the index's stat cache is rewritten).
    Outside a repository the record says so instead of failing.

    Example:
        >>> info, diff = git_record("recipes")  # ({'commit': '3aff856...', 'dirty': True, ...}, 'diff --git ...')
    """
    git = shutil.which("git")
    if git is None:
        return {"repository": None, "note": "git not found on PATH: no commit recorded"}, None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([git, "-C", str(directory), *args], capture_output=True, text=True, env=env,
                              timeout=60)

    top = run("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return {"repository": None, "note": f"not a git repository: {Path(directory).resolve()}"}, None
    info: dict[str, Any] = {"repository": top.stdout.strip()}
    head = run("rev-parse", "HEAD")
    if head.returncode != 0:
        return {**info, "commit": None, "note": "the repository has no commits yet"}, None
    diff = run("diff", "HEAD").stdout
    # From the top, so the names are relative to the repository (git -C with an absolute path wins).
    untracked = run("-C", info["repository"], "ls-files", "--others", "--exclude-standard").stdout.splitlines()
    info.update(commit=head.stdout.strip(), branch=run("rev-parse", "--abbrev-ref", "HEAD").stdout.strip(),
                dirty=bool(diff), untracked=untracked[:200], untracked_count=len(untracked))
    return info, diff


def _write_run(sweep: Sweep, run: Run, status: str, command: Any, **extra: Any) -> Path:
    """The run's folder: resolved config, record (with git facts) and diff."""
    folder = sweep.run_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(run.config, sort_keys=False))
    git, diff = git_record(Path(sweep.script).parent)
    (folder / DIFF_FILE).write_text(diff or "")
    record = {"name": run.name, "index": run.index, "params": run.params, "sweep": sweep.source,
              "command": command, "status": status, "git": git, **extra}
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return folder


def _update_record(folder: Path, **fields: Any) -> None:
    record = json.loads((folder / RECORD_FILE).read_text())
    (folder / RECORD_FILE).write_text(json.dumps({**record, **fields}, indent=1, default=str) + "\n")


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / RECORD_FILE).read_text()).get("status") == "finished"
    except (OSError, json.JSONDecodeError):
        return False


def run_local(sweep: Sweep, *, rerun: bool = False) -> int:
    """Run every run in a subprocess, one after another; returns how many failed.

    Output goes to each run's ``sweep_run.log``; a line per run is printed here.
    """
    failed = 0
    for run in sweep.runs:
        head = f"[{run.index + 1}/{len(sweep.runs)}] {run.name}"
        if not rerun and _finished(sweep.run_dir(run)):
            print(f"{head}: finished earlier, skipped (--rerun runs it again)", flush=True)
            continue
        folder = _write_run(sweep, run, "running", sweep.command(run), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        start = time.perf_counter()
        status = "interrupted"
        try:
            with open(folder / LOG_FILE, "w") as log:
                code = subprocess.run(sweep.command(run), stdout=log, stderr=subprocess.STDOUT).returncode
            status = "finished" if code == 0 else "failed"
        finally:
            seconds = round(time.perf_counter() - start, 2)
            _update_record(folder, status=status, seconds=seconds,
                           **({"returncode": code} if status != "interrupted" else {}))
        if code == 0:
            print(f"{head}: ok ({seconds:.1f} s)", flush=True)
        else:
            failed += 1
            tail = (folder / LOG_FILE).read_text().strip().splitlines()[-5:]
            print(f"{head}: failed with exit {code} ({seconds:.1f} s); {folder / LOG_FILE} ends:", flush=True)
            print("\n".join(f"    {line}" for line in tail), flush=True)
    return failed


def _slurm_config(sweep: Sweep) -> SlurmConfig:
    if {"script", "script_args"} & set(sweep.slurm):
        raise UserError(f"{sweep.source}: slurm: set script and script_args at the top level of the sweep")
    values = {"job_name": "sweep", "output": f"{sweep.output_dir}/slurm-%A_%a.out", **sweep.slurm,
              "script": sweep.script}
    cfg = load_slurm_config(None, values, source=f"{sweep.source}: slurm")
    # Set after validation, so this word of ours stays an expression for the shell to expand.
    cfg.script_args = ["--config", ShellExpr(f'"$ACCELTRAIN_RUN_DIR"/{CONFIG_FILE}'), *sweep.script_args]
    return cfg


def render_array(sweep: Sweep) -> str:
    """The sbatch script of the sweep as one job array: task ``i`` runs ``sweep.runs[i]``.

    Example:
        >>> print(render_array(load_sweep("sweep.yaml")))  # #SBATCH --array=0-5 ...
    """
    array = ArraySpec([str(sweep.run_dir(r)) for r in sweep.runs], var="ACCELTRAIN_RUN_DIR",
                      max_parallel=sweep.max_parallel, log=LOG_FILE)
    return render_sbatch(_slurm_config(sweep), array=array)


def submit_array(sweep: Sweep) -> str:
    """Write every run folder and the array script (``output_dir/slurm_array.sbatch``), submit
    it; returns the job id. Each record then names its array task (``JOB_INDEX``)."""
    script = render_array(sweep)
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found on PATH: this is not a SLURM login node (--render prints the script)")
    for run in sweep.runs:
        _write_run(sweep, run, "submitted", f"array task {run.index} of {sweep.output_dir / ARRAY_FILE}")
    (sweep.output_dir / ARRAY_FILE).write_text(script)
    try:
        job = submit(script)
    except UserError:
        for run in sweep.runs:
            _update_record(sweep.run_dir(run), status="not submitted")
        raise
    for run in sweep.runs:
        _update_record(sweep.run_dir(run), slurm_job=f"{job}_{run.index}")
    return job


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``acceltrain sweep``."""
    p = sub.add_parser("sweep", help="run a grid of configs, here or as a SLURM job array",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("sweep_file", help="the sweep YAML (script, base/config, grid, naming, output_dir, slurm)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their commands; write nothing")
    p.add_argument("--slurm", action="store_true", help="submit one SLURM job array instead of running here")
    p.add_argument("--render", action="store_true", help="print the job array's sbatch script; write nothing")
    p.add_argument("--naming", choices=[n.value for n in NamingStrategy], help="override the file's naming")
    p.add_argument("--output_dir", help="override the file's output_dir")
    p.add_argument("--rerun", action="store_true", help="also run again the runs that finished earlier")
    p.set_defaults(handler=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    """``acceltrain sweep``: exit 0 when every run finished, 1 when some failed, 2 on bad input."""
    sweep = load_sweep(args.sweep_file, naming=args.naming, output_dir=args.output_dir)
    if args.dry_run:
        print(f"{len(sweep.runs)} runs in {sweep.output_dir}:")
        for run in sweep.runs:
            print(f"  {run.name}  " + "  ".join(f"{k}={_fmt(v)}" for k, v in run.params.items()))
        print("command: " + shlex.join(sweep.command(sweep.runs[0])).replace(sweep.runs[0].name, "<name>"))
        return 0
    if args.render:
        print(render_array(sweep), end="")
        return 0
    if args.slurm:
        job = submit_array(sweep)
        print(job)
        return 0
    failed = run_local(sweep, rerun=args.rerun)
    print(f"{len(sweep.runs) - failed} of {len(sweep.runs)} runs finished" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0
