"""SELGIS's command line on ``acceltrain``: ``version``, ``device`` and ``train --config selgis.yaml``.

``acceltrain train --config FILE`` runs SELGIS's synthetic demo when FILE is a SELGIS config
(no ``recipe:`` key, and SELGIS's own field names); any other config runs its recipe as before.
``acceltrain train`` with no config runs acceltrain's pretraining demo (SELGIS's bare
``selgis train`` runs a synthetic demo: give it a config file to get that).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from .selgis_config import SelgisConfig, TransformerConfig, load_selgis_config

__all__ = ["device_report", "is_selgis_config", "run_selgis_train"]

# Names a recipe config may share with SELGIS; the others mark a file as SELGIS's.
_SHARED = {"batch_size", "eval_batch_size", "output_dir", "seed", "device", "gradient_accumulation_steps",
           "weight_decay", "learning_rate", "max_length", "warmup_ratio", "min_lr", "logging_steps", "eval_steps",
           "save_steps", "bf16", "fp16", "patience"}


def device_report() -> str:
    """What ``acceltrain device`` prints: the device training would use and the GPUs."""
    import torch

    lines = []
    if torch.cuda.is_available():
        lines.append(f"device: cuda ({torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda})")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("device: mps (Apple GPU)")
    else:
        lines.append(f"device: cpu ({torch.get_num_threads()} threads); no CUDA or MPS GPU available")
    return "\n".join(lines)


def _read(path: Path) -> Any:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def is_selgis_config(path: str | Path) -> bool:
    """True for a YAML/JSON mapping with no ``recipe`` key whose keys look like SELGIS's."""
    path = Path(path)
    try:
        data = _read(path)
    except (OSError, ValueError, yaml.YAMLError):
        return False  # the recipe path reports the file's problem
    if not isinstance(data, dict) or "recipe" in data or not data:
        return False
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    return set(data) <= fields or bool(set(data) & (fields - _SHARED))


def _overrides(cfg: SelgisConfig, overrides: list[str]) -> SelgisConfig:
    values: dict[str, Any] = {}
    it = iter(overrides)
    for flag in it:
        name = flag[2:] if flag.startswith("--") else None
        if name is None or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"{flag}: not a {type(cfg).__name__} field")
        value = next(it, None)
        if value is None:
            raise ConfigError(f"{flag}: needs a value")
        values[name] = yaml.safe_load(value)
    return dataclasses.replace(cfg, **values) if values else cfg


def run_selgis_train(config: str, overrides: list[str]) -> int:
    """SELGIS's synthetic demo with the file's settings: a small MLP learns a 4-class rule on
    random features (``batch_size`` / ``eval_batch_size`` build the loaders); prints the final
    metrics and saves ``output_dir/model.safetensors``."""
    import torch

    from .selgis import Trainer

    if "-h" in overrides or "--help" in overrides:
        print(f"usage: acceltrain train --config {config} [--FIELD VALUE ...]  (SELGIS config fields)")
        for f in dataclasses.fields(SelgisConfig):
            print(f"  --{f.name:<26} {f.metadata.get('help', '')} (default: {f.default!r})")
        return 0
    cfg = _overrides(load_selgis_config(config), overrides)
    if isinstance(cfg, TransformerConfig):
        raise ConfigError(f"{config}: TransformerConfig fields need a model: the CLI demo trains a small MLP; "
                          "use TransformerTrainer from Python")
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(640, 16, generator=gen)
    y = (x[:, :4].argmax(1)).long()  # (N,) one of 4 classes
    train = torch.utils.data.TensorDataset(x[:512], y[:512])
    held = torch.utils.data.TensorDataset(x[512:], y[512:])
    train_dl = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True)
    eval_dl = torch.utils.data.DataLoader(held, batch_size=cfg.eval_batch_size)
    torch.manual_seed(cfg.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    trainer = Trainer(model, cfg, train_dl, eval_dl)
    metrics = trainer.train()
    path = trainer.save_model(Path(cfg.output_dir) / "model.safetensors")
    if trainer.is_main_process:
        shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"final: {shown}")
        print(f"Saved {path}")
    trainer.close()
    return 0
