"""Hooks: observe and extend the training loop (see :class:`BaseHook` for where each fires)."""

from .base import EVENTS, BaseHook, StepInfo
from .checkpointing import CheckpointingHook
from .early_stopping import EarlyStoppingHook
from .ema import EmaHook
from .evaluation import EvaluationHook
from .export import ExportHook
from .guard import GuardError, GuardHook
from .images import ImageFileLoggerHook
from .logging import LoggingHook
from .memory import CudaMaxMemoryHook
from .progress import ProgressHook
from .sample import SampleHook
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
    "EvaluationHook",
    "ExportHook",
    "GuardError",
    "GuardHook",
    "ImageFileLoggerHook",
    "LoggingHook",
    "ProgressHook",
    "SampleHook",
    "SparsityHook",
    "StepInfo",
    "ThroughputHook",
    "WandbHook",
]
