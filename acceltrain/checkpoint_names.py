"""How checkpoint folders are named: the one place that spells it.

A run's checkpoints live in ``<workspace>/checkpoints`` (``CheckpointingHook``'s default path)::

    checkpoints/
        checkpoint_step_200/        one complete checkpoint (see :mod:`acceltrain.checkpoint`)
        .tmp_checkpoint_step_300/   a save in progress (or torn): never loaded, removed on resume
        checkpoint_latest ->        symlink to the newest complete save
        checkpoint_best ->          symlink to the best by the hook's metric (``keep_best``)

Everything that writes, finds or tests these names goes through this module, so a change of
naming is a change here.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CHECKPOINTS_SUBDIR", "STEP_PREFIX", "TMP_PREFIX", "LATEST", "BEST", "STEP_GLOB", "TMP_GLOB",
           "step_folder_name", "tmp_folder_name", "parse_step", "checkpoint_step"]

#: The folder under a run's workspace that holds its checkpoints.
CHECKPOINTS_SUBDIR = "checkpoints"
#: A step folder is ``STEP_PREFIX`` followed by the step number (no padding).
STEP_PREFIX = "checkpoint_step_"
#: A save in progress is its step folder's name behind this prefix (hidden, never a valid step folder).
TMP_PREFIX = ".tmp_"
#: The symlink to the newest complete checkpoint.
LATEST = "checkpoint_latest"
#: The symlink to the best checkpoint by the ``CheckpointingHook`` metric.
BEST = "checkpoint_best"
#: Globs for step folders and for interrupted saves.
STEP_GLOB = STEP_PREFIX + "*"
TMP_GLOB = TMP_PREFIX + STEP_GLOB

_STEP_NAME = re.compile("^" + re.escape(STEP_PREFIX) + r"(\d+)$")


def step_folder_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` (``checkpoint_step_200``)."""
    return f"{STEP_PREFIX}{int(step)}"


def tmp_folder_name(step: int) -> str:
    """The folder name a save of ``step`` is written under before its rename."""
    return TMP_PREFIX + step_folder_name(step)


def parse_step(name: str) -> int | None:
    """The step of a step-folder name, else None (``parse_step("checkpoint_step_12") == 12``)."""
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder (by its name), else None."""
    return parse_step(Path(path).name)
