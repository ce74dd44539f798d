"""The run folder of a recipe (``output_dir``, the trainer's ``workspace``): one run per folder,
resume checks before anything is written, the resolved config, and the shared cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import MANIFEST, CheckpointError, find_latest_checkpoint, list_checkpoints
from ..checkpoint_names import CHECKPOINTS_SUBDIR
from ..config import UserError
from ..elastic import plan_resize
from ..utils import folder_problem

__all__ = ["cache_root", "guard_output_dir", "check_resume", "write_run_config"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where tokenizers and packed corpora are cached: ``cache_dir``, ``$ACCELTRAIN_CACHE``,
    ``$XDG_CACHE_HOME/acceltrain`` or ``~/.cache/acceltrain`` (shared by runs, so a second run
    with the same data and tokenizer settings does no tokenization).

    Raises:
        UserError: that folder cannot be one this process writes into (a file, under a file, not
            writable), naming where the path came from.
    """
    if cache_dir:
        path, what = Path(cache_dir), "--cache_dir"
    elif os.environ.get("ACCELTRAIN_CACHE"):
        path, what = Path(os.environ["ACCELTRAIN_CACHE"]), "$ACCELTRAIN_CACHE"
    else:
        path, what = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "acceltrain", "the cache folder"
    problem = folder_problem(path)
    if problem:
        raise UserError(f"{what} {path}: {problem}")
    return path


def guard_output_dir(output_dir: Path, *, resume: bool, overwrite: bool, is_main: bool,
                     verify: bool = True) -> bool:
    """Refuse to mix runs in one folder; returns whether there is a checkpoint to resume from.

    A folder holding checkpoints, logs or an export of an earlier run needs ``resume``
    (continue it; without a checkpoint it starts again, appending to its logs) or ``overwrite``
    (delete that run's checkpoints, logs and export first). Without either the run stops with a
    one-line error before anything is written.

    With ``resume`` (and ``verify``), checkpoints of which none checks out are an error, not a
    fresh start (:func:`check_resume`, which recipes call themselves with ``verify=False``).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    found = list_checkpoints(output_dir / CHECKPOINTS_SUBDIR)
    outputs = [name for name in _RUN_OUTPUTS if (output_dir / name).exists()]
    if not found and not outputs:
        return False
    if resume:
        if found and verify:
            check_resume(output_dir / CHECKPOINTS_SUBDIR, is_main=is_main)
        return bool(found)
    if not overwrite:
        what = f"checkpoints of an earlier run (up to {found[-1].name})" if found else \
            f"an earlier run's {', '.join(outputs)}"
        raise UserError(f"{output_dir}: holds {what}; pass --resume true to continue it or --overwrite true "
                        "to start over")
    if is_main:
        for name in (CHECKPOINTS_SUBDIR, *_RUN_OUTPUTS):
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return False


def check_resume(root: Path, *, is_main: bool, resize: dict[str, Any] | None = None,
                 deepspeed: dict[str, Any] | None | bool = False) -> Any:
    """Check before anything is written that ``--resume`` can be honoured; every rank must call it.

    Checkpoints of which none checks out are an error on every rank (exit 2), never a silent
    fresh start. With ``resize`` (``world``, ``micro_batch``, ``accumulation``,
    ``allow_global_batch_change``), the newest checkpoint must also continue on this number of
    processes (:func:`acceltrain.elastic.plan_resize`); with ``deepspeed`` (this run's
    :func:`~acceltrain.checkpoint_deepspeed.live_setup`, None without DeepSpeed; ``False`` skips the
    check), it must have been saved with the same DeepSpeed stage and precision. A refusal leaves
    the run folder untouched.

    Returns:
        The :class:`~acceltrain.elastic.ResizePlan` (the same on every rank), or None for the same
        world size or no checkpoint.
    """
    problem = plan = None
    if is_main:  # one rank reads the files; the others hear the verdict
        try:
            folder = find_latest_checkpoint(root, clean=False, required="--resume true")
            manifest = json.loads((folder / MANIFEST).read_text()) if folder is not None else None
            if manifest is not None and deepspeed is not False:
                from ..checkpoint_deepspeed import setup_mismatch

                problem = setup_mismatch(folder, manifest.get("deepspeed"), deepspeed)
            if manifest is not None and resize is not None and problem is None:
                plan = plan_resize(manifest, folder=folder, **resize)
        except CheckpointError as e:
            problem = f"{e}; repair or move them away, or pass --overwrite true to start over" \
                if "can be resumed from" in str(e) else str(e)
        except UserError as e:
            problem = str(e)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate.utils import broadcast_object_list

        box = [problem, plan]
        broadcast_object_list(box, from_process=0)
        problem, plan = box
    if problem is not None:
        raise UserError(problem)
    return plan


# What a run writes into its folder besides checkpoints (config.yaml is rewritten by every run):
# the export, the logs, and the trackers that keep their files in the workspace (W&B's offline
# runs, DVCLive, Aim's repository).
_RUN_OUTPUTS = ("final", "merged", "tensorboard", "metrics.jsonl", "wandb", "dvclive", ".aim")


def write_run_config(workspace: Path, cfg: Any) -> None:
    """Write the resolved config as ``workspace/config.yaml`` (call on the main process)."""
    import yaml

    from ..config import config_to_dict

    workspace.mkdir(parents=True, exist_ok=True)
    # Atomically: a run killed mid-write leaves the previous config.yaml, not half of the new one.
    tmp = workspace / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, workspace / "config.yaml")
