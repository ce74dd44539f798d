"""Experiment trackers by name (``--report_to``), started through Accelerate's tracker classes,
each one reattaching to its own run after a restart.

A run's identity in each tracker (the W&B run id, the MLflow run id, the TensorBoard folder, ...)
is returned by :func:`start_trackers` and kept in the checkpoint by :class:`~acceltrain.hooks.LoggingHook`;
a resumed run hands it back, so a preempted and requeued job stays one run in the tracker::

    trackers, ids = start_trackers(["wandb"], workspace=ws, project="p", run_name="r", resume={})
    ...                                                    # ids == {"wandb": {"id": "3f2a9c0d1e4b"}}
    trackers, ids = start_trackers(["wandb"], workspace=ws, project="p", run_name="r", resume=ids)
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, UserError

__all__ = ["TRACKERS", "parse_report_to", "installed", "start_trackers", "loggable_config"]

#: Every tracker ``--report_to`` accepts: the module it needs and how to install it. Reattaching
#: after a restart is tested for tensorboard, wandb and mlflow (README, Limits).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'acceltrain[wandb]'"),
    "mlflow": ("mlflow", "pip install 'acceltrain[mlflow]'"),
    "aim": ("aim", "pip install 'acceltrain[aim]'"),
    "comet_ml": ("comet_ml", "pip install 'acceltrain[comet_ml]'"),
    "clearml": ("clearml", "pip install 'acceltrain[clearml]'"),
    "dvclive": ("dvclive", "pip install 'acceltrain[dvclive]'"),
}

def installed(name: str) -> bool:
    """Whether the module tracker ``name`` needs can be imported (without importing it)."""
    module = TRACKERS[name][0]
    if module in sys.modules:  # None there means "known missing" (how tests simulate it)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """The tracker names ``--report_to`` asks for, checked, in order and without repeats.

    Accepts a name, a comma-separated string or a list of them; ``"none"`` (or an empty value)
    is no tracker, ``"all"`` every installed one.

    Raises:
        ConfigError: an unknown name, or ``none``/``all`` mixed with names.
        UserError: a tracker whose package is not installed (the message says what to install).

    Example:
        >>> parse_report_to("tensorboard,wandb")
        ['tensorboard', 'wandb']
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return [n for n in TRACKERS if installed(n)]
    if "none" in names or "all" in names:
        raise ConfigError(f"report_to {','.join(names)}: 'none' and 'all' stand alone, not in a list")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"report_to {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}, all or none")
    names = list(dict.fromkeys(names))
    for name in names:
        if not installed(name):
            raise UserError(f"report_to {name}: {TRACKERS[name][0]} is not installed; {TRACKERS[name][1]}")
    return names


def loggable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with values every tracker stores as hyperparameters: lists and other objects
    become strings (TensorBoard's ``add_hparams`` refuses anything but bool/int/float/str)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else
            ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in config.items()}


def start_trackers(names: Sequence[str], *, workspace: Path | None, project: str, run_name: str | None,
                   resume: dict[str, dict[str, Any]], config: dict[str, Any] | None = None,
                   ) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """Start Accelerate's tracker for each name (call on the main process only).

    A tracker named in ``resume`` (the identities an earlier start returned) reattaches to that
    run; the others start a new one and store ``config`` as its hyperparameters (a resumed run
    already has them, and MLflow refuses to change a parameter). Trackers that need a folder
    write under ``workspace``; without a workspace they are skipped.

    Returns:
        ``(trackers, identities)``: started ``accelerate.tracking.GeneralTracker`` objects, and
        for each name a small dict of strings that finds its run again.
    """
    # Built here rather than through Accelerator.init_trackers, which restarts every tracker
    # already attached to the accelerator; the classes and their start() are Accelerate's.
    trackers: list[Any] = []
    identities: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in ("tensorboard", "aim", "dvclive") and workspace is None:
            continue
        previous = resume.get(name) or {}
        tracker, identity = _STARTERS[name](workspace=workspace, project=project, run_name=run_name, previous=previous)
        if config and not previous:
            tracker.store_init_configuration(loggable_config(config))
        trackers.append(tracker)
        identities[name] = identity
    return trackers, identities


def _tensorboard(*, workspace: Path, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("tensorboard", workspace)  # workspace/tensorboard, the same folder on resume
    tracker.start()
    return tracker, {"log_dir": str(Path(tracker.logging_dir))}


def _wandb(*, workspace: Path | None, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import WandBTracker

    kwargs: dict[str, Any] = {"name": run_name} if run_name else {}
    if workspace is not None:
        kwargs["dir"] = str(workspace)
    if previous.get("id"):  # the same run, or an error: never a silent second run
        kwargs.update(id=previous["id"], resume="must")
    else:  # our own id (W&B's alphabet), so it is known before the first checkpoint
        kwargs["id"] = uuid.uuid4().hex[:12]
    tracker = WandBTracker(project, **kwargs)
    tracker.start()
    return tracker, {"id": tracker.run.id}


def _mlflow(*, workspace: Path | None, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import MLflowTracker

    tracker = MLflowTracker(experiment_name=project, run_id=previous.get("run_id"), run_name=run_name)
    tracker.start()
    return tracker, {"run_id": tracker.active_run.info.run_id}


def _aim(*, workspace: Path, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import AimTracker

    kwargs = {"run_hash": previous["run_hash"]} if previous.get("run_hash") else {"experiment": project}
    tracker = AimTracker(run_name or project, logging_dir=str(workspace), **kwargs)
    tracker.start()
    return tracker, {"run_hash": tracker.writer.hash}


def _comet_ml(*, workspace: Path | None, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import CometMLTracker

    kwargs = {"experiment_key": previous["experiment_key"]} if previous.get("experiment_key") else {}
    tracker = CometMLTracker(project, **kwargs)
    tracker.start()
    if run_name and not previous:
        tracker.writer.set_name(run_name)
    return tracker, {"experiment_key": tracker.writer.get_key()}


def _clearml(*, workspace: Path | None, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import ClearMLTracker

    kwargs: dict[str, Any] = {"project_name": project, "task_name": run_name or project}
    if previous.get("task_id"):
        kwargs["continue_last_task"] = previous["task_id"]
    tracker = ClearMLTracker(**kwargs)
    tracker.start()
    return tracker, {"task_id": str(tracker.task.id)}


def _dvclive(*, workspace: Path, project: str, run_name: str | None, previous: dict) -> tuple[Any, dict]:
    from accelerate.tracking import DVCLiveTracker

    folder = workspace / "dvclive"
    tracker = DVCLiveTracker(dir=str(folder), resume=bool(previous))
    tracker.start()
    return tracker, {"dir": str(folder)}


_STARTERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "aim": _aim, "comet_ml": _comet_ml,
             "clearml": _clearml, "dvclive": _dvclive}
