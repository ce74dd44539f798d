"""Pieces the recipes share: output-folder safety, caches, precision, optimizer groups, model cards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints
from .config import UserError

__all__ = ["cache_root", "guard_output_dir", "choose_precision", "adamw_with_decay_groups", "model_card"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where tokenizers and packed corpora are cached: ``cache_dir``, ``$ACCELTRAIN_CACHE``,
    ``$XDG_CACHE_HOME/acceltrain`` or ``~/.cache/acceltrain`` (shared by runs, so a second run
    with the same data and tokenizer settings does no tokenization)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("ACCELTRAIN_CACHE"):
        return Path(os.environ["ACCELTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "acceltrain"


def guard_output_dir(output_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> bool:
    """Refuse to mix runs in one folder; returns whether there is a checkpoint to resume from.

    A folder holding checkpoints of an earlier run needs ``resume`` (continue it) or
    ``overwrite`` (delete that run's checkpoints, logs and export first). Without either the
    run stops with a one-line error before anything is written.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    found = list_checkpoints(output_dir / "checkpoints")
    if not found:
        return False
    if resume:
        return True
    if not overwrite:
        raise UserError(
            f"{output_dir}: holds checkpoints of an earlier run (up to {found[-1].name}); "
            "pass --resume true to continue it or --overwrite true to start over"
        )
    if is_main:
        for name in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    return False


def choose_precision(requested: str) -> str | None:
    """``"auto"`` is bf16 on a GPU that supports it and fp32 elsewhere (bf16 matmuls are slower
    than fp32 on most CPUs); ``"no"`` is fp32; ``"bf16"`` / ``"fp16"`` as asked."""
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return None if requested == "no" else requested


def adamw_with_decay_groups(model: torch.nn.Module, *, lr: float, weight_decay: float,
                            betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW that decays matrices (2-D and up: linear and embedding weights) but not biases or
    norm gains, the GPT-2/nanoGPT convention; fused kernels where the device has them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def model_card(*, title: str, summary: str, facts: dict[str, Any], usage: str) -> str:
    """A README.md for an exported model: what it is, a table of facts, how to load it."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return (f"---\nlibrary_name: transformers\ntags: [acceltrain]\n---\n\n# {title}\n\n{summary}\n\n"
            f"| | |\n|---|---|\n{rows}\n\n## Usage\n\n```python\n{usage.strip()}\n```\n")
