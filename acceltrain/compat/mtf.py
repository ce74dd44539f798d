"""Coming from the Model Training Framework: its documented names over acceltrain.

Change ``from model_training_framework[.config|.trainer|.slurm|.utils] import X`` to
``from acceltrain.compat.mtf import X``. Nothing here is a second implementation: grids and
names are :mod:`acceltrain.sweep`'s, config composition is ``sweep.compose_configs``, jobs are
:mod:`acceltrain.slurm`'s, ``GenericTrainer`` is a :class:`~acceltrain.BaseTrainer` with
acceltrain's checkpointing (exact, phase-aware resume) and evaluation, and
``GitManager.branch_context`` is a temporary ``git worktree`` (:mod:`acceltrain.gitmanager`).

Example:
    >>> from acceltrain.compat.mtf import ModelTrainingFramework, ParameterGrid, ExecutionMode
    >>> grid = ParameterGrid("lr", "learning rates").add_parameter("training.learning_rate", [1e-3, 1e-4])
    >>> fw = ModelTrainingFramework(".", training_script="train.py")
    >>> fw.run_grid_search([grid], base_config_path="base.yaml", execution_mode=ExecutionMode.LOCAL)
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..gitmanager import GitManager, GitOperationError
from ..sweep import NamingStrategy
from .mtf_config import (
    CheckpointConfig,
    ConfigurationError,
    ConfigurationManager,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParameterGrid,
    ParameterGridSearch,
    PerformanceConfig,
    PreemptionConfig,
    SchedulerConfig,
    SLURMConfig,
    TrainingConfig,
    ValidationError,
)
from .mtf_slurm import (
    BatchSubmissionResult,
    ExecutionMode,
    JobStatus,
    JobSubmissionError,
    SLURMError,
    SLURMLauncher,
)
from .mtf_trainer import (
    CheckpointTimeoutError,
    GenericTrainer,
    GenericTrainerConfig,
    PreemptionTimeoutError,
    ResumeState,
    RNGState,
    TrainerError,
    TrainerPhase,
    TrainingCallback,
    TrainMicroState,
    ValMicroState,
)

__all__ = [
    "BatchSubmissionResult", "CheckpointConfig", "CheckpointTimeoutError", "ConfigurationError",
    "ConfigurationManager", "DataConfig", "Error", "ExecutionMode", "ExperimentConfig", "GenericTrainer",
    "GenericTrainerConfig", "GitManager", "GitOperationError", "GridSearchResult", "JobStatus", "JobSubmissionError",
    "LoggingConfig", "ModelConfig", "ModelTrainingFramework", "NamingStrategy", "OptimizerConfig", "ParameterGrid",
    "ParameterGridSearch", "PerformanceConfig", "PreemptionConfig", "PreemptionTimeoutError", "RNGState", "Result",
    "ResumeState", "SLURMConfig", "SLURMError", "SLURMLauncher", "SchedulerConfig", "Success", "TrainMicroState",
    "TrainerError", "TrainerPhase", "TrainingCallback", "TrainingConfig", "ValMicroState", "ValidationError",
    "ensure_directory_exists", "get_logger", "get_project_root", "setup_logging", "validate_project_structure",
]


@dataclass
class GridSearchResult:
    """What ``run_grid_search`` did."""

    grid_search_id: str
    execution_mode: ExecutionMode
    total_experiments: int
    experiments: list[ExperimentConfig]
    output_dir: Path
    submission: BatchSubmissionResult | None = None
    job_ids: list[str] = field(default_factory=list)
    successful: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    start_time: float = 0.0
    end_time: float = 0.0

    @property
    def experiment_names(self) -> list[str]:
        return [e.experiment_name for e in self.experiments]


class ModelTrainingFramework:
    """Grid searches run here or on SLURM, with configs from ``config_dir``.

    Args:
        project_root: The project's folder (relative config paths and ``train.py`` are found there).
        config_dir: Config files (default ``project_root/configs``).
        slurm_template_path: A custom batch-script template (see :class:`SLURMLauncher`).
        training_script: What each experiment runs, ``--config <its folder>/sweep_config.yaml``
            (default ``project_root/train.py``). The document leaves it to the template; here
            it is named.
    """

    def __init__(self, project_root: str | Path, config_dir: str | Path | None = None,
                 slurm_template_path: str | Path | None = None, *, training_script: str | Path | None = None):
        self.project_root = Path(project_root)
        self.config_manager = ConfigurationManager(self.project_root, config_dir)
        self.slurm_template_path = slurm_template_path
        self.training_script = Path(training_script) if training_script else self.project_root / "train.py"
        self._launcher: SLURMLauncher | None = None

    def get_config_manager(self) -> ConfigurationManager:
        return self.config_manager

    def get_slurm_launcher(self, output_dir: str | Path | None = None) -> SLURMLauncher:
        out = Path(output_dir) if output_dir is not None else self.project_root / "experiments"
        if self._launcher is None or self._launcher.output_dir != out:
            self._launcher = SLURMLauncher(self.slurm_template_path, out, training_script=self.training_script)
        return self._launcher

    def run_grid_search(self, parameter_grids: list[ParameterGrid],
                        base_config: dict[str, Any] | str | Path | None = None,
                        base_config_path: str | Path | None = None,
                        execution_mode: ExecutionMode = ExecutionMode.SLURM, output_dir: Path | None = None,
                        max_concurrent_jobs: int | None = None,
                        naming_strategy: NamingStrategy = NamingStrategy.DESCRIPTIVE) -> GridSearchResult:
        """Expand the grids over the base config and run (``LOCAL``), submit as one job array
        (``SLURM``) or only list (``DRY_RUN``) the experiments."""
        if base_config is None and base_config_path is None:
            raise ConfigurationError("run_grid_search: give base_config or base_config_path")
        if isinstance(base_config, str | Path):
            base_config_path, base_config = base_config, None
        base = self.config_manager.load_config(base_config_path, validate=False) if base_config_path else {}
        base = self.config_manager.compose_configs(base, [base_config or {}])
        search = ParameterGridSearch(base)
        for grid in parameter_grids:
            search.add_grid(grid)
        search.set_naming_strategy(naming_strategy)
        experiments = list(search.generate_experiments())
        out = Path(output_dir) if output_dir is not None else self.project_root / "experiments"
        result = GridSearchResult(f"grid_{int(time.time())}", ExecutionMode(execution_mode), len(experiments),
                                  experiments, out, start_time=time.time())
        launcher = self.get_slurm_launcher(out)
        submission = launcher.submit_experiment_batch(experiments, execution_mode, max_concurrent_jobs)
        result.submission, result.job_ids = submission, submission.job_ids
        result.successful, result.failed = submission.successful_submissions, submission.failed_submissions
        result.end_time = time.time()
        return result


# ---------------------------------------------------------------------- utils
def setup_logging(level: str = "INFO", log_file: str | Path | None = None) -> logging.Logger:
    """Configure the root logger: a stream to stderr, and ``log_file`` when given."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    numeric = logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ConfigurationError(f"setup_logging level {level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logging.basicConfig(level=numeric, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def get_project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the current one) holding
    ``pyproject.toml``, ``setup.py`` or ``.git``; else ``start`` itself."""
    here = Path(start or Path.cwd()).resolve()
    for folder in [here, *here.parents]:
        if any((folder / marker).exists() for marker in ("pyproject.toml", "setup.py", ".git")):
            return folder
    return here


def validate_project_structure(root: str | Path) -> bool:
    """True when ``root`` is a folder with a ``configs/`` folder in it."""
    root = Path(root)
    return root.is_dir() and (root / "configs").is_dir()


def ensure_directory_exists(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


T = TypeVar("T")
E = TypeVar("E")


@dataclass(frozen=True)
class Success(Generic[T]):
    value: T


@dataclass(frozen=True)
class Error(Generic[E]):
    error: E


Result = Success[T] | Error[E]
