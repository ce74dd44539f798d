"""Hooks: observe and extend the training loop (see :class:`BaseHook` for where each fires)."""

from .base import EVENTS, BaseHook
from .checkpointing import CheckpointingHook
from .early_stopping import EarlyStoppingHook
from .ema import EmaHook
from .guard import GuardError, GuardHook
from .images import ImageFileLoggerHook
from .logging import LoggingHook
from .memory import CudaMaxMemoryHook
from .progress import ProgressHook
from .sparsity import SparsityHook
from .throughput import ThroughputHook
from .wandb import WandbHook

__all__ = [
    "EVENTS",
    "BaseHook",
    "CheckpointingHook",
    "CudaMaxMemoryHook",
    "EarlyStoppingHook",
    "EmaHook",
    "GuardError",
    "GuardHook",
    "ImageFileLoggerHook",
    "LoggingHook",
    "ProgressHook",
    "SparsityHook",
    "ThroughputHook",
    "WandbHook",
]
