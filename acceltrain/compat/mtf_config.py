"""The Model Training Framework's configuration names: ``ExperimentConfig`` and its sections,
``ParameterGrid``/``ParameterGridSearch`` over :mod:`acceltrain.sweep`, and ``ConfigurationManager``
(load / save / compose, with :func:`acceltrain.sweep.compose_configs`). Import them from
:mod:`acceltrain.compat.mtf`."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..config import UserError
from ..slurm import read_yaml
from ..sweep import NamingStrategy, _naming, compose_configs
from ..sweep import ParameterGrid as _Grid
from ..sweep import ParameterGridSearch as _Search

__all__ = ["CheckpointConfig", "ConfigurationError", "ConfigurationManager", "DataConfig", "ExperimentConfig",
           "LoggingConfig", "ModelConfig", "NamingStrategy", "OptimizerConfig", "ParameterGrid", "ParameterGridSearch",
           "PerformanceConfig", "PreemptionConfig", "SLURMConfig", "SchedulerConfig", "TrainingConfig",
           "ValidationError", "load_mapping"]


class ConfigurationError(UserError):
    """A configuration file or value cannot be used (the message names the file or field)."""


class ValidationError(ConfigurationError):
    """A configuration does not match the ExperimentConfig schema (the message names the field)."""


class _Section:
    """A config section: the documented fields with their defaults, set by keyword.

    A strict section refuses unknown fields with a message naming them; a free one (``model``)
    keeps them as attributes too, since every model takes its own parameters.
    """

    _section: ClassVar[str] = ""
    _fields: ClassVar[dict[str, Any]] = {}
    _strict: ClassVar[bool] = True

    def __init__(self, **values: Any):
        for key, default in self._fields.items():
            setattr(self, key, copy.deepcopy(values.pop(key, default)))
        if values and self._strict:
            key = next(iter(values))
            raise ValidationError(f"{self._section}.{key}: unknown field; known fields: {', '.join(self._fields)}")
        self._extra = list(values)
        for key, value in values.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in [*self._fields, *self._extra]}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def _section(name: str, fields: dict[str, Any], *, strict: bool = True, doc: str = "") -> type[_Section]:
    cls = type(f"{name.capitalize()}Config", (_Section,), {"_section": name, "_fields": fields, "_strict": strict,
                                                          "__doc__": doc or f"The ``{name}:`` section."})
    return cls


# The fields and defaults of the document's "Complete Configuration Example".
ModelConfig = _section("model", {"name": "model"}, strict=False,
                       doc="The ``model:`` section: ``name`` and any parameters the model takes.")
TrainingConfig = _section("training", {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3,
                                       "gradient_accumulation_steps": 1, "max_grad_norm": None})
DataConfig = _section("data", {"dataset_name": "", "train_split": "train", "val_split": "validation",
                               "test_split": "test", "preprocessing": {}})
OptimizerConfig = _section("optimizer", {"name": "adamw", "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8})
SchedulerConfig = _section("scheduler", {"name": "cosine", "warmup_steps": 0, "min_lr": 0.0})
SLURMConfig = _section("slurm", {"job_name": None, "time_limit": None, "nodes": 1, "ntasks_per_node": 1,
                                 "cpus_per_task": None, "mem": None, "gres": None, "partition": None,
                                 "additional_args": []})
SLURMConfig.__name__ = SLURMConfig.__qualname__ = "SLURMConfig"
LoggingConfig = _section("logging", {"log_level": "INFO", "use_wandb": False, "wandb_project": None,
                                     "wandb_entity": None, "log_every_n_steps": 10})
CheckpointConfig = _section("checkpoint", {"save_every_n_epochs": 1, "save_top_k": 3, "monitor": "val_loss",
                                           "mode": "min", "checkpoint_dir": "./checkpoints"})
PreemptionConfig = _section("preemption", {"timeout_minutes": 5, "grace_period_seconds": 60, "max_preemptions": 3})
PerformanceConfig = _section("performance", {"num_workers": 0, "pin_memory": False, "prefetch_factor": None,
                                             "persistent_workers": False})

_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "training": TrainingConfig, "data": DataConfig, "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig, "slurm": SLURMConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig,
    "preemption": PreemptionConfig, "performance": PerformanceConfig,
}
_REQUIRED = ("experiment_name", "model", "training", "data", "optimizer")


@dataclass(kw_only=True)
class ExperimentConfig:
    """One experiment: name, the sections, and bookkeeping fields (the document's schema).

    Example:
        >>> ExperimentConfig.from_dict(yaml.safe_load(open("configs/base.yaml"))).training.learning_rate
    """

    experiment_name: str
    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig | None = None
    slurm: SLURMConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    created_by: str | None = None
    created_at: str | None = None
    version: str = "1.0"
    seed: int | None = None
    deterministic: bool = True
    benchmark: bool = False
    custom_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
        """Build and check one from a mapping; a ValidationError names the first bad field."""
        if not isinstance(data, Mapping):
            raise ValidationError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValidationError(f"{source}: {unknown[0]}: unknown field; known fields: {', '.join(known)}")
        missing = [k for k in _REQUIRED if data.get(k) is None]
        if missing:
            raise ValidationError(f"{source}: {missing[0]}: required field is missing")
        if not isinstance(data["experiment_name"], str) or not data["experiment_name"]:
            raise ValidationError(f"{source}: experiment_name: expected a non-empty string, "
                                  f"got {data['experiment_name']!r}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS and value is not None:
                if isinstance(value, _Section):
                    value = value.to_dict()
                if not isinstance(value, Mapping):
                    raise ValidationError(f"{source}: {key}: expected a mapping, got {value!r}")
                try:
                    value = _SECTIONS[key](**value)
                except ValidationError as e:
                    raise ValidationError(f"{source}: {e}") from None
            values[key] = copy.deepcopy(value)
        if not isinstance(values.get("tags", []), list):
            raise ValidationError(f"{source}: tags: expected a list, got {values['tags']!r}")
        if not isinstance(values.get("custom_params", {}), dict):
            raise ValidationError(f"{source}: custom_params: expected a mapping, got {values['custom_params']!r}")
        exp = cls(**values)
        exp.validate(source=source)
        return exp

    def validate(self, *, source: str = "config") -> None:
        """Check the values a run depends on (positive sizes, known modes)."""
        t = self.training
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            value = getattr(t, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(f"{source}: training.{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(t.learning_rate, int | float) or isinstance(t.learning_rate, bool) or t.learning_rate <= 0:
            raise ValidationError(f"{source}: training.learning_rate: expected a number > 0, got {t.learning_rate!r}")
        if self.checkpoint.mode not in ("min", "max"):
            raise ValidationError(f"{source}: checkpoint.mode: expected 'min' or 'max', got {self.checkpoint.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, _Section) else copy.deepcopy(value)
        return out


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML (YAML 1.2 numbers: ``1e-4`` is a float) or JSON file's mapping, or a one-line
    ConfigurationError naming the file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise ConfigurationError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigurationError(f"{path}: not valid JSON (line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
        return data
    try:
        return read_yaml(path)
    except UserError as e:
        raise ConfigurationError(str(e)) from None


class ParameterGrid(_Grid):
    """A named grid of (dotted) keys and their values; combinations vary the last key fastest.

    Example:
        >>> grid = ParameterGrid("lr_sweep", "learning rates and depths")
        >>> grid.add_parameter("training.learning_rate", [1e-3, 1e-4])
        >>> grid.add_nested_parameter("model.num_layers", [2, 4, 8])
        >>> grid.get_parameter_count()
        6
    """

    def __init__(self, name: str, description: str = ""):
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"ParameterGrid name: expected a non-empty string, got {name!r}")
        super().__init__()
        self.name, self.description = name, description

    def add_parameter(self, key: str, values: Sequence[Any]) -> ParameterGrid:
        try:
            super().add_parameter(key, values)
        except ConfigurationError:
            raise
        except UserError as e:
            raise ConfigurationError(str(e)) from None
        return self

    def add_nested_parameter(self, key_path: str, values: Sequence[Any]) -> ParameterGrid:
        """Same as :meth:`add_parameter`: dotted keys are nested everywhere in acceltrain."""
        return self.add_parameter(key_path, values)

    def get_parameter_count(self) -> int:
        return len(self)

    def generate_permutations(self) -> Iterator[dict[str, Any]]:
        return iter(self)


class ParameterGridSearch(_Search):
    """Grids over a base experiment config, expanded into ExperimentConfigs.

    Each experiment is named ``<base experiment_name>_<suffix>``; the suffix follows the naming
    strategy: ``NamingStrategy.DESCRIPTIVE`` ``lr=0.001_num_layers=2`` (parameter names, the last
    part of a dotted key, and values), ``HASH_BASED`` 10 hex digits of a SHA-256 of the
    parameters, ``SEQUENTIAL`` ``run_000``, ``run_001``, ...

    Example:
        >>> search = ParameterGridSearch(base)
        >>> search.create_grid("lr").add_parameter("training.learning_rate", [1e-3, 1e-4])
        >>> search.set_naming_strategy(NamingStrategy.SEQUENTIAL)
        >>> [e.experiment_name for e in search.generate_experiments()]
        ['base_run_000', 'base_run_001']
    """

    def __init__(self, base_config: Mapping[str, Any] | ExperimentConfig):
        if isinstance(base_config, ExperimentConfig):
            base_config = base_config.to_dict()
        super().__init__(base_config)
        self.parameter_grids = self.grids

    def create_grid(self, name: str, description: str = "") -> ParameterGrid:
        grid = ParameterGrid(name, description)
        self.add_grid(grid)
        return grid

    def set_naming_strategy(self, strategy: NamingStrategy | str) -> None:
        try:
            self.naming = _naming(strategy)
        except UserError as e:
            raise ConfigurationError(str(e)) from None

    def get_total_experiments(self) -> int:
        return len(self.points())

    def generate_experiments(self) -> Iterator[ExperimentConfig]:
        base_name = self.base_config.get("experiment_name") or "experiment"
        for run in self.runs():
            config = {**run.config, "experiment_name": f"{base_name}_{run.name}"}
            yield ExperimentConfig.from_dict(config, source=f"experiment {run.name}")


class ConfigurationManager:
    """Load, save, check and compose configuration files (YAML or JSON).

    A relative path is looked up as given (from the current directory), then in ``config_dir``
    (default ``project_root/configs``), then in ``project_root``.

    Example:
        >>> cm = ConfigurationManager(Path("."))
        >>> cfg = cm.compose_configs("base.yaml", ["small.yaml"], {"training.learning_rate": 3e-4})
    """

    def __init__(self, project_root: str | Path, config_dir: str | Path | None = None):
        self.project_root = Path(project_root)
        self.config_dir = Path(config_dir) if config_dir is not None else self.project_root / "configs"
        self._cache: dict[Path, tuple[float, dict[str, Any]]] = {}

    def resolve(self, config_path: str | Path) -> Path:
        path = Path(config_path)
        candidates = [path] if path.is_absolute() else [path, self.config_dir / path, self.project_root / path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ConfigurationError(f"{config_path}: config file not found (looked in "
                                 f"{', '.join(str(c.parent) for c in candidates)})")

    def load_config(self, config_path: str | Path, validate: bool = True, use_cache: bool = True) -> dict[str, Any]:
        """The file's mapping; ``validate`` checks it against :class:`ExperimentConfig`."""
        path = self.resolve(config_path)
        mtime = path.stat().st_mtime_ns
        cached = self._cache.get(path.resolve()) if use_cache else None
        if cached is not None and cached[0] == mtime:
            data = copy.deepcopy(cached[1])
        else:
            data = load_mapping(path)
            self._cache[path.resolve()] = (mtime, copy.deepcopy(data))
        if validate:
            ExperimentConfig.from_dict(data, source=str(path))
        return data

    def validate_config(self, config: Mapping[str, Any]) -> ExperimentConfig:
        return ExperimentConfig.from_dict(config)

    def save_config(self, config: Mapping[str, Any] | ExperimentConfig, output_path: str | Path,
                    format: str = "yaml") -> None:
        """Write ``config`` as YAML or JSON (to a temporary name, then renamed: never half a file)."""
        if format not in ("yaml", "json"):
            raise ConfigurationError(f"save_config format: expected 'yaml' or 'json', got {format!r}")
        data = config.to_dict() if isinstance(config, ExperimentConfig) else dict(config)
        text = json.dumps(data, indent=2) + "\n" if format == "json" else yaml.safe_dump(data, sort_keys=False)
        path = Path(output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _as_mapping(self, value: str | Path | Mapping[str, Any] | ExperimentConfig) -> dict[str, Any]:
        if isinstance(value, ExperimentConfig):
            return value.to_dict()
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, str | Path):
            return self.load_config(value, validate=False)
        raise ConfigurationError(f"expected a config path or mapping, got {type(value).__name__}")

    def compose_configs(self, base_config: str | Path | Mapping[str, Any],
                        overrides: list[str | Path | Mapping[str, Any]] | None = None,
                        parameter_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``base_config``, then each override merged over it (mappings deep-merged, lists and
        other values replaced), then ``parameter_overrides`` (dotted keys)."""
        return compose_configs(self._as_mapping(base_config), [self._as_mapping(o) for o in overrides or []],
                               parameter_overrides)
