"""acceltrain: a hook-driven trainer on Hugging Face Accelerate.

The ``mini.trainer`` API: ``from acceltrain import BaseTrainer, ProgressHook, ...``.
"""

__version__ = "0.1.0"

from .export import save_pretrained
from .hooks import (
    EVENTS,
    BaseHook,
    CheckpointingHook,
    CudaMaxMemoryHook,
    EmaHook,
    EvaluationHook,
    ExportHook,
    GuardError,
    GuardHook,
    ImageFileLoggerHook,
    LoggingHook,
    ProgressHook,
    StepInfo,
    ThroughputHook,
    WandbHook,
)
from .hooks.early_stopping import EarlyStoppingHook
from .hooks.sparsity import SparsityHook
from .lr_finder import LRFinder, find_lr
from .non_finite import NonFiniteError
from .one_call import Trainer, TrainerConfig, train_model
from .schedules import build_schedule, reduce_lr, scale_lr, surge_lr
from .trainer import BaseTrainer
from .utils import count_parameters, format_params, key_average, map_nested_tensor, seed_everything

__all__ = [
    "EVENTS",
    "BaseHook",
    "BaseTrainer",
    "CheckpointingHook",
    "CudaMaxMemoryHook",
    "EarlyStoppingHook",
    "EmaHook",
    "EvaluationHook",
    "GuardError",
    "GuardHook",
    "ExportHook",
    "ImageFileLoggerHook",
    "LRFinder",
    "LoggingHook",
    "NonFiniteError",
    "ProgressHook",
    "SparsityHook",
    "StepInfo",
    "ThroughputHook",
    "Trainer",
    "TrainerConfig",
    "WandbHook",
    "__version__",
    "build_schedule",
    "count_parameters",
    "find_lr",
    "format_params",
    "key_average",
    "map_nested_tensor",
    "reduce_lr",
    "save_pretrained",
    "scale_lr",
    "seed_everything",
    "surge_lr",
    "train_model",
]
