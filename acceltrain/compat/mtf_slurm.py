"""The Model Training Framework's ``SLURMLauncher`` over :mod:`acceltrain.slurm` and the sweep's
run folders (:mod:`acceltrain.sweep`): one experiment is one job, a batch is one job array.

Each experiment gets ``output_dir/<experiment_name>/`` with ``sweep_config.yaml`` (the full
experiment config), ``sweep_run.json`` (name, command, git commit, job id) and ``git.diff``;
the job runs ``python TRAINING_SCRIPT --config <that folder>/sweep_config.yaml``.

A custom template (``slurm_template_path``) is a batch script with ``{{name}}`` placeholders:
``experiment_name``, ``job_name``, ``output_dir`` (the experiment's folder), ``config_path``,
``script_path``, ``python``, and the slurm section's ``time_limit``, ``nodes``,
``ntasks_per_node``, ``cpus_per_task``, ``mem``, ``gres``, ``partition``. Every value is
shell-quoted; an unset one or an unknown name is an error naming it. In a job array the
per-experiment names (``experiment_name``, ``output_dir``, ``config_path``) become the array
task's values, so they may not appear on ``#SBATCH`` lines (which the shell never expands).
Import these names from :mod:`acceltrain.compat.mtf`.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import UserError
from ..gitmanager import GitManager, GitOperationError
from ..slurm import _run as _slurm_tool
from ..slurm import cancel, job_status, render_sbatch, submit
from ..sweep import (
    CONFIG_FILE,
    LOG_FILE,
    RECORD_FILE,
    Run,
    Sweep,
    _slurm_config,
    _update_record,
    _write_run,
    run_local,
)

if TYPE_CHECKING:
    from .mtf_config import ExperimentConfig

__all__ = ["BatchSubmissionResult", "ExecutionMode", "GitManager", "GitOperationError", "JobStatus",
           "JobSubmissionError", "SLURMError", "SLURMLauncher"]


class SLURMError(UserError):
    """A SLURM operation failed (the message has the tool's first line of error)."""


class JobSubmissionError(SLURMError):
    """``sbatch`` refused a job, or a job could not be rendered."""


class ExecutionMode(str, Enum):
    SLURM = "slurm"  # submit to SLURM
    LOCAL = "local"  # run here, one after another
    DRY_RUN = "dry_run"  # write nothing, run nothing: list what would run


class JobStatus(str, Enum):
    """A job's state; for an array, the state of the whole array (running while any task runs)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    UNKNOWN = "UNKNOWN"


_ACTIVE = {"RUNNING": JobStatus.RUNNING, "COMPLETING": JobStatus.RUNNING, "CONFIGURING": JobStatus.RUNNING,
           "SUSPENDED": JobStatus.RUNNING, "STAGE_OUT": JobStatus.RUNNING, "PENDING": JobStatus.PENDING,
           "REQUEUED": JobStatus.PENDING, "REQUEUE_HOLD": JobStatus.PENDING, "REQUEUE_FED": JobStatus.PENDING,
           "RESIZING": JobStatus.RUNNING}
_DONE = {"FAILED": JobStatus.FAILED, "NODE_FAIL": JobStatus.FAILED, "OUT_OF_MEMORY": JobStatus.FAILED,
         "BOOT_FAIL": JobStatus.FAILED, "DEADLINE": JobStatus.FAILED, "TIMEOUT": JobStatus.TIMEOUT,
         "CANCELLED": JobStatus.CANCELLED, "PREEMPTED": JobStatus.PREEMPTED, "COMPLETED": JobStatus.COMPLETED}


def _states(report: str) -> list[str]:
    """The state words of ``acceltrain.slurm.job_status``'s report (squeue, sacct or scontrol)."""
    lines = report.strip().splitlines()
    if lines and lines[0].startswith("JOBID|"):  # sacct: JOBID|STATE|...
        return [line.split("|")[1].split()[0] for line in lines[1:] if "|" in line]
    if lines and lines[0].startswith("JOBID "):  # squeue: JOBID STATE ...
        return [line.split()[1] for line in lines[1:] if len(line.split()) > 1]
    return re.findall(r"JobState=(\w+)", report)


def aggregate_status(states: Sequence[str]) -> JobStatus:
    """One status for a job's (or an array's) task states: active wins, then failures, then done."""
    active = {_ACTIVE[s] for s in states if s in _ACTIVE}
    if active:
        return JobStatus.RUNNING if JobStatus.RUNNING in active else JobStatus.PENDING
    done = {_DONE.get(s, JobStatus.UNKNOWN) for s in states}
    for status in (JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELLED, JobStatus.PREEMPTED, JobStatus.UNKNOWN):
        if status in done:
            return status
    return JobStatus.COMPLETED if done == {JobStatus.COMPLETED} else JobStatus.UNKNOWN


@dataclass
class BatchSubmissionResult:
    """What ``submit_experiment_batch`` did: the array's job id and a task id per experiment."""

    job_ids: list[str] = field(default_factory=list)  # "ARRAY_i", in the order given
    successful_submissions: list[str] = field(default_factory=list)  # experiment names
    failed_submissions: list[tuple[str, str]] = field(default_factory=list)  # (experiment name, error)
    array_job_id: str | None = None
    total_experiments: int = 0

    @property
    def success_rate(self) -> float:
        return len(self.successful_submissions) / self.total_experiments if self.total_experiments else 0.0


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_PER_RUN = ("experiment_name", "output_dir", "config_path")
_SLURM_KEYS = ("time_limit", "nodes", "ntasks_per_node", "cpus_per_task", "mem", "gres", "partition")


class SLURMLauncher:
    """Submit experiments to SLURM: one job each, or one job array for a batch.

    Args:
        slurm_template_path: A batch-script template with ``{{name}}`` placeholders (see the
            module docstring); None renders acceltrain's own script (``acceltrain slurm``'s).
        output_dir: Where each experiment's folder goes.
        git_manager: Its repository's commit is recorded with each experiment (the run records
            always hold the training script's git facts).
        training_script: What each job runs, ``--config <experiment folder>/sweep_config.yaml``.
        python: The interpreter the jobs use (default: this one).

    Example:
        >>> launcher = SLURMLauncher(None, "experiments", training_script="train.py")
        >>> result = launcher.submit_experiment_batch(list(search.generate_experiments()))
        >>> launcher.get_job_status(result.array_job_id)
    """

    def __init__(self, slurm_template_path: str | Path | None = None, output_dir: str | Path = "experiments",
                 git_manager: GitManager | None = None, *, training_script: str | Path = "train.py",
                 python: str = sys.executable):
        self.template_path = Path(slurm_template_path) if slurm_template_path is not None else None
        if self.template_path is not None and not self.template_path.is_file():
            raise SLURMError(f"slurm_template_path {self.template_path}: no such file")
        self.output_dir = Path(output_dir)
        self.git_manager = git_manager
        self.training_script = str(training_script)
        self.python = python

    # ------------------------------------------------------------------ building
    def _sweep(self, experiments: Sequence[ExperimentConfig], max_parallel: int | None) -> Sweep:
        if not experiments:
            raise JobSubmissionError("no experiments to submit")
        names = [e.experiment_name for e in experiments]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise JobSubmissionError(f"experiment_name {duplicate!r} appears twice: each needs its own folder")
        if not Path(self.training_script).is_file():
            raise JobSubmissionError(f"training_script {self.training_script}: no such file")
        runs = [Run(i, e.experiment_name, {}, e.to_dict()) for i, e in enumerate(experiments)]
        return Sweep("SLURMLauncher", self.training_script, runs, self.output_dir, [],
                     self._slurm_values(experiments[0]), max_parallel)

    def _slurm_values(self, experiment: ExperimentConfig) -> dict[str, Any]:
        """The experiment's slurm section as acceltrain SlurmConfig fields."""
        s = experiment.slurm
        # resume=False: no `--resume true` for the script (acceltrain's recipes' flag); a
        # GenericTrainer resumes from its checkpoint_dir by itself.
        values: dict[str, Any] = {"job_name": re.sub(r"[^A-Za-z0-9._+-]", "-", experiment.experiment_name),
                                  "resume": False}
        if s is None:
            return values
        gpus = re.fullmatch(r"gpu(?::[A-Za-z0-9_-]+)?:(\d+)", str(s.gres)) if s.gres else None
        if s.ntasks_per_node not in (None, 1) and not (gpus and int(gpus.group(1)) == s.ntasks_per_node):
            raise JobSubmissionError(
                f"{experiment.experiment_name}: slurm.ntasks_per_node {s.ntasks_per_node}: acceltrain runs one task "
                "per node (accelerate launch starts a process per GPU); set gres: gpu:N instead")
        sbatch = [str(a) for a in s.additional_args or []]
        if s.gres and not gpus:
            sbatch.append(f"--gres={s.gres}")
        values.update({k: v for k, v in {"job_name": s.job_name or values["job_name"], "nodes": s.nodes,
                                         "cpus_per_task": s.cpus_per_task, "mem": s.mem, "time": s.time_limit,
                                         "partition": s.partition, "sbatch": sbatch,
                                         "gpus_per_node": int(gpus.group(1)) if gpus else None}.items()
                       if v is not None})
        return values

    def _template(self, sweep: Sweep, array: bool) -> str:
        text = self.template_path.read_text()
        first = sweep.runs[0]
        exp_slurm = first.config.get("slurm") or {}
        values: dict[str, str | None] = {"job_name": sweep.slurm.get("job_name"), "python": self.python,
                                         "script_path": sweep.script}
        values.update({k: None if exp_slurm.get(k) is None else str(exp_slurm.get(k)) for k in _SLURM_KEYS})
        if array:
            values.update(experiment_name='"$ACCELTRAIN_RUN_NAME"', output_dir='"$ACCELTRAIN_RUN_DIR"',
                          config_path=f'"$ACCELTRAIN_RUN_DIR"/{CONFIG_FILE}')
        else:
            folder = sweep.run_dir(first)
            values.update(experiment_name=shlex.quote(first.name), output_dir=shlex.quote(str(folder)),
                          config_path=shlex.quote(str(folder / CONFIG_FILE)))
        lines = text.splitlines()
        for n, line in enumerate(lines):
            for name in _PLACEHOLDER.findall(line):
                if name not in values:
                    raise JobSubmissionError(f"{self.template_path}:{n + 1}: unknown placeholder {{{{{name}}}}}; "
                                             f"known: {', '.join(sorted(values))}")
                if values[name] is None:
                    raise JobSubmissionError(f"{self.template_path}:{n + 1}: {{{{{name}}}}} has no value: set "
                                             f"slurm.{name} in the experiment config")
                if array and name in _PER_RUN and line.lstrip().startswith("#SBATCH"):
                    raise JobSubmissionError(f"{self.template_path}:{n + 1}: {{{{{name}}}}} differs per array task "
                                             "and #SBATCH lines are not expanded; use %A/%a or {{job_name}}")
        for name, value in values.items():
            if value is not None and any(not c.isprintable() for c in value):
                raise JobSubmissionError(f"{name} {value!r}: control characters cannot go into a batch script")

        def fill(match: re.Match) -> str:
            name = match.group(1)
            value = values[name]
            return value if name in _PER_RUN else shlex.quote(value)

        rendered = [_PLACEHOLDER.sub(fill, line) for line in lines]
        if array:
            last = max((i for i, line in enumerate(rendered) if line.startswith("#SBATCH")), default=0)
            limit = f"%{sweep.max_parallel}" if sweep.max_parallel else ""
            entries = [f"  {shlex.quote(str(sweep.run_dir(r)))}" for r in sweep.runs]
            names = [f"  {shlex.quote(r.name)}" for r in sweep.runs]
            rendered[last + 1:last + 1] = [
                f"#SBATCH --array=0-{len(sweep.runs) - 1}{limit}",
                "ACCELTRAIN_RUN_DIRS=(", *entries, ")", "ACCELTRAIN_RUN_NAMES=(", *names, ")",
                'export ACCELTRAIN_RUN_DIR="${ACCELTRAIN_RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"',
                'export ACCELTRAIN_RUN_NAME="${ACCELTRAIN_RUN_NAMES[$SLURM_ARRAY_TASK_ID]}"',
            ]
        return "\n".join(rendered) + "\n"

    def render(self, experiments: Sequence[ExperimentConfig], *, max_concurrent_jobs: int | None = None) -> str:
        """The batch script: one job for one experiment, else one array; writes nothing."""
        sweep = self._sweep(experiments, max_concurrent_jobs)
        array = len(experiments) > 1
        if self.template_path is not None:
            return self._template(sweep, array)
        if array:
            from ..sweep import render_array

            return render_array(sweep)
        cfg = _slurm_config(sweep)
        cfg.env = {**cfg.env, "ACCELTRAIN_RUN_DIR": str(sweep.run_dir(sweep.runs[0]))}
        return render_sbatch(cfg)

    # ------------------------------------------------------------------ the documented API
    def submit_experiment(self, experiment_config: ExperimentConfig,
                          execution_mode: ExecutionMode = ExecutionMode.SLURM) -> str:
        """Submit one experiment; returns its job id (``SLURM``), ``"local"`` after running it
        here (``LOCAL``), or ``"dry_run"`` (``DRY_RUN``: nothing written)."""
        return self._submit([experiment_config], execution_mode, None).job_ids[0]

    def submit_experiment_batch(self, experiments: list[ExperimentConfig],
                                execution_mode: ExecutionMode = ExecutionMode.SLURM,
                                max_concurrent_jobs: int | None = None) -> BatchSubmissionResult:
        """Submit the experiments as one job array (``max_concurrent_jobs`` tasks at a time)."""
        return self._submit(experiments, execution_mode, max_concurrent_jobs)

    def _submit(self, experiments: Sequence[ExperimentConfig], mode: ExecutionMode | str,
                max_parallel: int | None) -> BatchSubmissionResult:
        mode = ExecutionMode(mode)
        script = self.render(experiments, max_concurrent_jobs=max_parallel)  # errors before anything is written
        sweep = self._sweep(experiments, max_parallel)
        result = BatchSubmissionResult(total_experiments=len(experiments))
        names = [r.name for r in sweep.runs]
        if mode is ExecutionMode.DRY_RUN:
            result.job_ids, result.successful_submissions = ["dry_run"] * len(names), names
            return result
        if mode is ExecutionMode.LOCAL:
            run_local(sweep, rerun=True)
            for run in sweep.runs:
                status = json.loads((sweep.run_dir(run) / RECORD_FILE).read_text())["status"]
                if status == "finished":
                    result.successful_submissions.append(run.name)
                else:
                    result.failed_submissions.append((run.name, f"{status}: see {sweep.run_dir(run) / LOG_FILE}"))
            result.job_ids = ["local"] * len(names)
            return result
        extra = {"git_manager_commit": self.git_manager.current_commit()} if self.git_manager else {}
        for i, run in enumerate(sweep.runs):
            how = f"array task {i}" if len(sweep.runs) > 1 else "job"
            _write_run(sweep, run, "submitted", f"{how} of {self.output_dir / 'slurm_job.sbatch'}", **extra)
        (self.output_dir / "slurm_job.sbatch").write_text(script)
        try:
            job = submit(script)
        except UserError as e:
            for run in sweep.runs:
                _update_record(sweep.run_dir(run), status="not submitted")
            raise JobSubmissionError(str(e)) from None
        result.array_job_id = job
        result.job_ids = [f"{job}_{i}" for i in range(len(names))] if len(names) > 1 else [job]
        result.successful_submissions = names
        for run, job_id in zip(sweep.runs, result.job_ids, strict=True):
            _update_record(sweep.run_dir(run), slurm_job=job_id)
        return result

    def get_job_status(self, job_id: str) -> JobStatus:
        """The job's (or the whole array's) status, from squeue, then sacct or scontrol."""
        try:
            report = job_status(str(job_id))
        except UserError as e:
            if "neither sacct nor scontrol knows it" in str(e):
                return JobStatus.UNKNOWN
            raise SLURMError(str(e)) from None
        states = _states(report)
        if not states:
            return JobStatus.UNKNOWN
        return aggregate_status(states)

    def get_array_status(self, job_id: str) -> dict[str, JobStatus]:
        """Each task's status of a job array, by task id (``JOB_i``)."""
        proc = _slurm_tool("scontrol", "show", "job", "--oneliner", str(job_id))
        out: dict[str, JobStatus] = {}
        for line in proc.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "ArrayJobId" in fields and "ArrayTaskId" in fields and fields["ArrayTaskId"].isdigit():
                state = fields.get("JobState", "")
                out[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = aggregate_status([state])
        return out

    def cancel_job(self, job_id: str) -> bool:
        """``scancel`` the job; False (not an exception) when SLURM refuses."""
        try:
            cancel(str(job_id))
        except UserError:
            return False
        return True
