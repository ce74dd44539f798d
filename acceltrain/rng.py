"""Capture and restore this process's random generators (Python, NumPy, torch, CUDA).

As tensors and plain values, so a checkpoint's ``rank_state_{rank}.pt`` loads with
``weights_only=True``; used by checkpoints and by the LR finder (which puts them back after
its range test).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """This process's generator states, as tensors and plain values (no pickle needed)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only: every rank of a node sees every GPU, and reading
        # them all would open a CUDA context on each GPU from each rank (and pin the checkpoint
        # to that GPU count). A process that never touched CUDA has no CUDA stream to keep.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA generator, into the current device,
    only where CUDA is available). Older checkpoints kept one state per visible
    GPU: the current device's entry is taken."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda, device = state["cuda"], torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # the older layout: one state per visible device
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)
