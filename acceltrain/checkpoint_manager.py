"""``CheckpointManager``: list, rank, load and clean acceltrain checkpoint folders.

It reads the folders :class:`acceltrain.hooks.CheckpointingHook` writes, through the discovery
functions of :mod:`acceltrain.checkpoint` (``list_checkpoints``, ``verify_checkpoint``,
``find_latest_checkpoint``): only folders whose manifest checks out are listed or loaded, and
weights are read from safetensors (no pickle). The metric a checkpoint is ranked by is the one
its hook recorded in the manifest (``CheckpointingHook(metric="eval/loss")``).

Example:
    >>> manager = CheckpointManager(checkpoint_dir="runs/x/checkpoints", monitor="eval/loss")
    >>> manager.get_best_checkpoint_path()
    'runs/x/checkpoints/checkpoint_step_300'
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    MANIFEST,
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    restore_tied,
    verify_checkpoint,
)
from .checkpoint_names import BEST, CHECKPOINTS_SUBDIR, checkpoint_step
from .hooks import CheckpointingHook
from .hooks.base import BaseHook

__all__ = ["CheckpointManager"]

logger = logging.getLogger("acceltrain")
#: Lightning-style metric names and what acceltrain's EvaluationHook logs for them.
METRIC_ALIASES = {"val_loss": "eval/loss", "val_accuracy": "eval/accuracy", "val_perplexity": "eval/perplexity"}


class CheckpointManager:
    """Manage the checkpoints of one run.

    Args:
        checkpoint_dir: The folder holding ``checkpoint_step_N`` folders.
        save_top_k: Best checkpoints :meth:`get_callback` keeps.
        monitor: The manifest metric to rank by (``val_loss`` means ``eval/loss``).
        mode: ``"min"`` or ``"max"``.
        drive_backup: Copy the best checkpoint to ``drive_backup_path`` after training
            (:meth:`get_backup_callback`).
        drive_backup_path: Where (on Colab, under ``/content/drive``).
    """

    def __init__(self, checkpoint_dir: str | Path = f"./{CHECKPOINTS_SUBDIR}", save_top_k: int = 3, monitor: str = "val_loss",
                 mode: str = "min", drive_backup: bool = False, drive_backup_path: str | Path | None = None) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if drive_backup and not drive_backup_path:
            raise ValueError("drive_backup_path: needed with drive_backup=True")
        self.checkpoint_dir = Path(checkpoint_dir).resolve()  # paths come back absolute, as best_model_path
        self.save_top_k, self.mode = save_top_k, mode
        self.monitor = METRIC_ALIASES.get(monitor, monitor)
        self.drive_backup, self.drive_backup_path = drive_backup, drive_backup_path

    # ------------------------------------------------------------------ hooks
    def get_callback(self) -> CheckpointingHook:
        """A ``CheckpointingHook`` writing here: the newest checkpoint (for resume) and the ``save_top_k`` best."""
        return CheckpointingHook(interval=1000, path=self.checkpoint_dir.resolve(), keep_previous=1,
                                 keep_best=self.save_top_k, metric=self.monitor, mode=self.mode)

    def get_backup_callback(self) -> BaseHook | None:
        """A hook copying the best checkpoint to ``drive_backup_path`` after training (None without drive_backup)."""
        if not self.drive_backup:
            return None
        manager = self

        class DriveBackupHook(BaseHook):
            def on_after_train(self, trainer: Any) -> None:
                if trainer.is_main_process:
                    manager.backup()

        return DriveBackupHook()

    def backup(self) -> Path | None:
        """Copy the best (else the newest) checkpoint folder to ``drive_backup_path``; its new path."""
        source = self.get_best_checkpoint_path() or self._latest()
        if source is None or self.drive_backup_path is None:
            return None
        target = Path(self.drive_backup_path) / Path(source).name
        shutil.copytree(source, target, dirs_exist_ok=True)
        return target

    # ------------------------------------------------------------------ queries
    def _valid(self) -> list[Path]:
        valid = []
        for folder in list_checkpoints(self.checkpoint_dir):
            try:
                verify_checkpoint(folder)
            except CheckpointError as e:
                logger.warning("skipping checkpoint %s", e)
                continue
            valid.append(folder)
        return valid

    def metric_of(self, folder: str | Path) -> float | None:
        """The monitored metric stored in a checkpoint's manifest (None if it has none)."""
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        value = manifest.get("metrics", {}).get(self.monitor)
        return float(value) if value is not None and math.isfinite(value) else None

    def _ranked(self) -> list[Path]:
        scored = [(m if self.mode == "min" else -m, -checkpoint_step(f), f) for f in self._valid()
                  if (m := self.metric_of(f)) is not None]
        return [f for *_, f in sorted(scored)]

    def _latest(self) -> str | None:
        latest = find_latest_checkpoint(self.checkpoint_dir, clean=False)
        return str(latest) if latest is not None else None

    def list_checkpoints(self, sort_by: str = "step") -> list[str]:
        """Valid checkpoint folders, by ``step`` (oldest first) or by ``metric`` (best first; those without it last)."""
        if sort_by not in ("step", "metric"):
            raise ValueError(f"sort_by must be 'step' or 'metric', got {sort_by!r}")
        valid = self._valid()
        if sort_by == "metric":
            ranked = self._ranked()
            valid = ranked + [f for f in valid if f not in ranked]
        return [str(f) for f in valid]

    def get_best_checkpoint_path(self) -> str | None:
        """The valid checkpoint with the best monitored metric (None if none recorded it)."""
        ranked = self._ranked()
        return str(ranked[0]) if ranked else None

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint_path: str | Path | None = None) -> dict[str, Any]:
        """``{"path", "step", "metrics", "state_dict", "trainer_state"}`` of a checkpoint (default: the
        best, else the newest), verified against its manifest and read without unpickling code."""
        from safetensors.torch import load_file

        path = checkpoint_path or self.get_best_checkpoint_path() or self._latest()
        if path is None:
            raise CheckpointError(f"{self.checkpoint_dir}: no valid checkpoint")
        folder = Path(path)
        manifest = verify_checkpoint(folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no model.safetensors (a sharded FSDP/ZeRO-3 checkpoint: export it "
                                  "with trainer.save_pretrained instead)")
        trainer_state = folder / "trainer_state.pt"
        return {"path": str(folder), "step": manifest["step"], "metrics": manifest.get("metrics", {}),
                "state_dict": load_file(str(weights)),
                "trainer_state": torch.load(trainer_state, weights_only=True) if trainer_state.is_file() else None}

    def load_model_from_checkpoint(self, model_class: type[torch.nn.Module] | torch.nn.Module | Callable[[], Any],
                                   checkpoint_path: str | Path | None = None) -> torch.nn.Module:
        """The checkpoint's weights in a model: an instance, or a class / factory called with no arguments."""
        model = model_class if isinstance(model_class, torch.nn.Module) else model_class()
        state = self.load_checkpoint(checkpoint_path)["state_dict"]
        target, inner = model, getattr(model, "model", None)
        if isinstance(inner, torch.nn.Module) and not set(state) & set(model.state_dict()):
            target = inner  # an adapter around the trained model (Transformer Builder's UniversalModelAdapter)
        restore_tied(target, state)
        target.load_state_dict(state, strict=True)
        return model

    # ------------------------------------------------------------------ cleaning
    def cleanup_old_checkpoints(self, keep_top_k: int = 3) -> list[str]:
        """Delete every checkpoint but the ``keep_top_k`` best and the newest (needed to resume); the removed paths."""
        if keep_top_k < 0:
            raise ValueError(f"keep_top_k must be >= 0, got {keep_top_k}")
        folders = list_checkpoints(self.checkpoint_dir)
        keep = set(self._ranked()[:keep_top_k])
        latest = find_latest_checkpoint(self.checkpoint_dir, clean=False)
        if latest is not None:
            keep.add(latest)
        removed = []
        for folder in folders:
            if folder not in keep:
                shutil.rmtree(folder)
                removed.append(str(folder))
        best = self._ranked()
        link = self.checkpoint_dir / BEST
        if link.is_symlink() and not link.exists():  # it pointed at a removed folder
            link.unlink()
            if best:
                link.symlink_to(best[0].name)
        return removed

    def print_checkpoint_info(self) -> None:
        """One line per valid checkpoint: step, monitored metric, size; the best is marked."""
        best = self.get_best_checkpoint_path()
        folders = self._valid()
        print(f"{len(folders)} checkpoint(s) in {self.checkpoint_dir} (monitor {self.monitor}, mode {self.mode})")
        for folder in folders:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
            metric = self.metric_of(folder)
            shown = f"{metric:.4f}" if metric is not None else "-"
            print(f"  step {checkpoint_step(folder):>7}  {self.monitor} {shown:>10}  {size:8.2f} MiB"
                  f"{'  (best)' if str(folder) == best else ''}")

