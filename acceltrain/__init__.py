"""acceltrain: a hook-driven trainer on Hugging Face Accelerate.

The ``mini.trainer`` API: ``from acceltrain import BaseTrainer, ProgressHook, ...``.
"""

__version__ = "0.1.0"

from .evaluation import EvaluationHook
from .export import ExportHook, save_pretrained
from .hooks import (
    EVENTS,
    BaseHook,
    CheckpointingHook,
    CudaMaxMemoryHook,
    EmaHook,
    GuardError,
    GuardHook,
    ImageFileLoggerHook,
    LoggingHook,
    ProgressHook,
    ThroughputHook,
    WandbHook,
)
from .trainer import BaseTrainer, NonFiniteError
from .utils import count_parameters, format_params, key_average, map_nested_tensor, seed_everything

__all__ = [
    "EVENTS",
    "BaseHook",
    "BaseTrainer",
    "CheckpointingHook",
    "CudaMaxMemoryHook",
    "EmaHook",
    "EvaluationHook",
    "GuardError",
    "GuardHook",
    "ExportHook",
    "ImageFileLoggerHook",
    "LoggingHook",
    "NonFiniteError",
    "ProgressHook",
    "ThroughputHook",
    "WandbHook",
    "__version__",
    "count_parameters",
    "format_params",
    "key_average",
    "map_nested_tensor",
    "save_pretrained",
    "seed_everything",
]
