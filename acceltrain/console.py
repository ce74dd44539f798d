"""What a run prints: acceltrain's logger at ``--log_level``, and no third-party progress bars or
import-time lines unless ``debug``."""

from __future__ import annotations

import logging
from typing import Any

from .config import ConfigError

__all__ = ["configure_output", "quiet_progress_bars", "LEVELS"]

#: ``--log_level`` values: Python's logging level names.
LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_output(log_level: str = "warning") -> None:
    """Set what a run prints: acceltrain's logger at ``log_level`` (Python's names), and below
    ``debug`` no third-party progress bars (transformers' "Writing model shards" / "Loading
    weights", datasets', the Hub's) and no DeepSpeed accelerator-detection line, which DeepSpeed
    prints to stdout whenever it is merely installed and something asks which device it would use.

    Call it before anything imports DeepSpeed (``RecipeTrainer`` does, first thing).

    Raises:
        ConfigError: a level that is not one of Python's names.
    """
    name = str(log_level).strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"log_level {log_level!r}: expected one of {', '.join(LEVELS)} (Python's logging levels)")
    level = getattr(logging, name.upper())
    debug = level <= logging.DEBUG
    ours = logging.getLogger("acceltrain")
    ours.setLevel(level)
    if level < logging.WARNING and not ours.handlers and not logging.getLogger().handlers:
        # Python's last-resort handler prints warnings only: info and debug lines need one.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    # A filter, not a level: DeepSpeed's logger factory resets the level when it is imported.
    deepspeed = logging.getLogger("DeepSpeed")
    for old in [f for f in deepspeed.filters if isinstance(f, _DeepSpeedDetectionFilter)]:
        deepspeed.removeFilter(old)
    if not debug:
        deepspeed.addFilter(_DeepSpeedDetectionFilter())
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    datasets = _datasets()
    if debug:
        if datasets is not None:
            datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    else:
        quiet_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    # Their info lines only with debug; above warning as quiet as ours.
    third_party = logging.INFO if debug else max(level, logging.WARNING)
    hf_logging.set_verbosity(third_party)
    if datasets is not None:
        datasets.logging.set_verbosity(third_party)


def _datasets() -> Any:
    """``datasets``, or None where it is not installed (the GPU image of benchmarks/gpu_check.sh
    has none, and a run reading no Hub data does not need it)."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets


class _DeepSpeedDetectionFilter:
    """Drops DeepSpeed's accelerator-detection messages ("Setting accelerator to CPU ..."), not
    its warnings about a DeepSpeed run."""

    def filter(self, record: Any) -> bool:
        return record.filename != "real_accelerator.py" or record.levelno >= logging.ERROR


def quiet_progress_bars() -> None:
    """Turn off the per-file progress bars of ``datasets`` and ``transformers`` (reading a table,
    loading or writing weights): in logs they are noise between the recipe's own lines."""
    from transformers.utils import logging as hf_logging

    datasets = _datasets()
    if datasets is not None:
        datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
