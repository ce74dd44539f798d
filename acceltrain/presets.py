"""Training presets by goal and task (Transformer Builder's list), and a recommendation from model size and hardware.

A preset is a set of :func:`acceltrain.one_call.train_model` arguments with a description and
a rough time estimate. :func:`recommend` sizes a run from the parameter count and the memory of
the device: AdamW training in fp32 keeps about 16 bytes per parameter (weights 4, gradients 4,
two moments 8) before activations, which decides between plain data parallel, gradient
checkpointing, FSDP2 and CPU offload.

Example:
    >>> presets = ConfigPresets()
    >>> presets.get("small").to_dict()["batch_size"]
    16
    >>> recommend(124_000_000, device_memory_gib=24.0, num_devices=1).accelerate_config
    'accelerate_configs/single_gpu.yaml'
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["TrainingPreset", "PRESETS", "ConfigPresets", "Recommendation", "recommend", "BYTES_PER_PARAM"]

BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW's two moments


@dataclasses.dataclass(frozen=True)
class TrainingPreset:
    """One preset: ``train_model`` arguments plus what it is for."""

    name: str
    description: str
    estimated_time_hours: float
    model_params: int
    max_epochs: int
    batch_size: int
    learning_rate: float
    max_length: int
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    early_stopping_patience: int | None = 3
    task: str = "causal_lm"

    def to_dict(self) -> dict[str, Any]:
        """The ``train_model`` / ``TrainingCoordinator.train`` keyword arguments of this preset."""
        return {"max_epochs": self.max_epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "max_length": self.max_length, "accumulate_grad_batches": self.gradient_accumulation_steps,
                "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay,
                "early_stopping_patience": self.early_stopping_patience}


PRESETS: dict[str, TrainingPreset] = {p.name: p for p in (
    TrainingPreset("tiny", "Debug / testing: a few minutes to an hour", 1.0, 10_000_000, 3, 32, 5e-4, 128),
    TrainingPreset("small", "Educational: GPT-2 small scale", 4.0, 125_000_000, 5, 16, 3e-4, 512, 2),
    TrainingPreset("medium", "Production: GPT-2 medium scale", 12.0, 350_000_000, 5, 8, 2e-4, 1024, 4),
    TrainingPreset("large", "Research: GPT-2 large scale", 48.0, 774_000_000, 3, 4, 1.5e-4, 1024, 8),
    TrainingPreset("code_generation", "Code tasks: long contexts, low LR", 8.0, 125_000_000, 5, 8, 2e-4, 1024, 4),
    TrainingPreset("chat", "Dialogue systems: instruction / chat data", 6.0, 125_000_000, 3, 16, 1e-4, 512, 2),
    TrainingPreset("summarization", "Text summarization: long inputs", 6.0, 125_000_000, 4, 8, 1e-4, 1024, 4,
                   task="summarization"),
)}


class ConfigPresets:
    """Transformer Builder's preset API over :data:`PRESETS`."""

    def __init__(self) -> None:
        self.presets = dict(PRESETS)

    def get(self, name: str) -> TrainingPreset:
        if name not in self.presets:
            raise KeyError(f"preset {name!r}: unknown; available: {', '.join(self.presets)}")
        return self.presets[name]

    def list(self) -> list[str]:
        return list(self.presets)

    def customize(self, name: str, **overrides: Any) -> TrainingPreset:
        """A copy of preset ``name`` with fields replaced (``max_epochs=10``, ``batch_size=32``, ...)."""
        fields = {f.name for f in dataclasses.fields(TrainingPreset)} - {"name"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a preset field (fields: {', '.join(sorted(fields))})")
        return dataclasses.replace(self.get(name), **overrides)

    def print_all_presets(self) -> None:
        for p in self.presets.values():
            print(f"{p.name:<16} ~{p.estimated_time_hours:g} h, ~{p.model_params / 1e6:g}M params: {p.description}")

    def get_recommendation(self, goal: str = "learning", time_budget_hours: float = 4.0) -> str:
        """A preset name for a goal (``debug``, ``learning``, ``production``, ``research``, or a task
        preset's name) within a time budget: the largest general preset that fits it."""
        if goal in ("code_generation", "chat", "summarization"):
            return goal
        ladder = {"debug": ["tiny"], "learning": ["tiny", "small"], "production": ["tiny", "small", "medium"],
                  "research": ["tiny", "small", "medium", "large"]}
        if goal not in ladder:
            raise ValueError(f"goal must be one of {[*ladder, 'code_generation', 'chat', 'summarization']}, got {goal!r}")
        fitting = [n for n in ladder[goal] if self.presets[n].estimated_time_hours <= time_budget_hours]
        return fitting[-1] if fitting else "tiny"


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """How to run a model of a given size on given hardware."""

    preset: str
    batch_size: int
    gradient_accumulation_steps: int
    mixed_precision: str | None
    gradient_checkpointing: bool
    accelerate_config: str
    reason: str


def _detect() -> tuple[float | None, int]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30, torch.cuda.device_count()
    return None, 0


def recommend(model_params: int, *, task: str = "causal_lm", device_memory_gib: float | None = None,
              num_devices: int | None = None, target_batch_size: int = 32) -> Recommendation:
    """A preset and launch for ``model_params`` parameters on the given (default: this machine's) GPUs.

    ``device_memory_gib=None`` and ``num_devices=0`` (or no GPU found) means the CPU. The
    training state is ``16 * model_params`` bytes; on one device it must fit in 60% of the
    memory (the rest for activations), else gradient checkpointing up to 75%, else FSDP2 over
    several devices (state / devices), else ZeRO-3 with CPU offload. The per-device batch is
    halved from ``target_batch_size`` until the activations' share fits, with accumulation
    making up the rest.

    Raises:
        ValueError: ``model_params`` < 1 or an unknown task.
    """
    if model_params < 1:
        raise ValueError(f"model_params must be >= 1, got {model_params}")
    tasks = ("causal_lm", "classification", "summarization", "code_generation", "chat")
    if task not in tasks:
        raise ValueError(f"task must be one of {list(tasks)}, got {task!r}")
    if device_memory_gib is None and num_devices is None:
        device_memory_gib, num_devices = _detect()
    num_devices = num_devices or 0
    size = ("tiny" if model_params < 50e6 else "small" if model_params < 250e6 else "medium" if model_params < 550e6
            else "large")
    preset = task if task in ("summarization", "code_generation", "chat") else size
    state_gib = BYTES_PER_PARAM * model_params / 2**30
    if num_devices == 0 or not device_memory_gib:
        batch = 8 if model_params < 50e6 else 2
        return Recommendation(preset, batch, max(1, target_batch_size // batch), None, model_params >= 50e6,
                              "accelerate_configs/cpu.yaml", f"no GPU: {state_gib:.1f} GiB of training state in RAM")
    per_device = state_gib / (num_devices if state_gib > 0.6 * device_memory_gib and num_devices > 1 else 1)
    if state_gib <= 0.6 * device_memory_gib:
        config, checkpointing, share = ("accelerate_configs/ddp.yaml" if num_devices > 1
                                        else "accelerate_configs/single_gpu.yaml"), False, 0.6
        reason = f"{state_gib:.1f} GiB of state fits one device ({device_memory_gib:g} GiB)"
    elif state_gib <= 0.75 * device_memory_gib:
        config, checkpointing, share = ("accelerate_configs/ddp.yaml" if num_devices > 1
                                        else "accelerate_configs/single_gpu.yaml"), True, 0.75
        reason = f"{state_gib:.1f} GiB of state fits one device only with gradient checkpointing"
    elif num_devices > 1 and per_device <= 0.6 * device_memory_gib:
        config, checkpointing, share = "accelerate_configs/fsdp2.yaml", True, 0.6
        reason = f"{state_gib:.1f} GiB of state sharded over {num_devices} devices: {per_device:.1f} GiB each"
    else:
        config, checkpointing, share = "accelerate_configs/deepspeed_zero3_offload.yaml", True, 0.9
        reason = f"{state_gib:.1f} GiB of state exceeds the devices' memory: ZeRO-3 with the optimizer in CPU RAM"
    free = max(0.0, device_memory_gib - min(per_device, share * device_memory_gib))
    batch = target_batch_size
    # ~2 MiB of activations per sample per 10M parameters at 512 tokens (bf16): a coarse rule.
    while batch > 1 and batch * 2 * (model_params / 10e6) / 1024 > free:
        batch //= 2
    return Recommendation(preset, batch, max(1, target_batch_size // (batch * max(1, num_devices))), "bf16",
                          checkpointing, config, reason)
